"""llama.cpp's decode and prompt speed on a GGUF file, through the server embedded in the prebuilt ``xllamacpp``
wheel (PyPI), for ``runtime_speed.py --model``. Standard library + xllamacpp only: it runs in its own venv,

    python -m venv scripts/bench/work/.venv-llamacpp
    scripts/bench/work/.venv-llamacpp/bin/pip install xllamacpp==2026.10.11549

    scripts/bench/work/.venv-llamacpp/bin/python scripts/bench/llamacpp_speed.py --gguf FILE --threads 2 \
        --prompt-ids 1 2 3 ... --new-tokens 64 --repeats 3 --out result.json

The prompt is given as token ids (the same ids our runs feed transformers), greedy (temperature 0), end of
sequence ignored, no prompt cache between runs. Speeds are llama.cpp's own ``timings`` (prompt and decode
tokens/s, wall time); the process CPU time per decoded token is added, from two runs that differ only in
their number of new tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-ids", type=int, nargs="+", required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = {"variant": "llama.cpp (xllamacpp)", "gguf": args.gguf, "threads": args.threads,
              "python": platform.python_version()}
    try:
        import xllamacpp

        result["xllamacpp_version"] = getattr(xllamacpp, "__version__", "?")
        params = xllamacpp.CommonParams()
        params.model.path = args.gguf
        params.n_ctx = max(512, len(args.prompt_ids) + args.new_tokens + 8)
        params.n_parallel = 1
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
        server = xllamacpp.Server(params)

        def run(new_tokens: int) -> tuple[dict, float]:
            request = {"prompt": args.prompt_ids, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0,
                       "cache_prompt": False}
            cpu = time.process_time()
            response = server.handle_completions(request)
            if isinstance(response, str):
                response = json.loads(response)
            if "timings" not in response:
                raise RuntimeError(f"llama.cpp server answered without timings: {str(response)[:300]}")
            return response["timings"], time.process_time() - cpu

        run(4)  # warm-up
        decode, prompt, cpu_ms = [], [], []
        for _ in range(args.repeats):
            timings, cpu_full = run(args.new_tokens)
            _, cpu_one = run(1)
            decode.append(timings["predicted_per_second"])
            prompt.append(timings["prompt_per_second"])
            cpu_ms.append(1e3 * (cpu_full - cpu_one) / (args.new_tokens - 1))
        result.update(status="ok", decode_tokens_per_s=statistics.median(decode), decode_runs=decode,
                      prefill_tokens_per_s=statistics.median(prompt), prefill_runs=prompt,
                      decode_cpu_ms_per_token=statistics.median(cpu_ms), new_tokens=args.new_tokens,
                      prompt_tokens=len(args.prompt_ids))
    except Exception as exc:  # recorded exactly, for the report
        result.update(status="error", error=f"{type(exc).__name__}: {exc}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
