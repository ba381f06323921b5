#!/usr/bin/env python3
"""hfcompress's GPU check (issue 18): everything that needs a GPU, in one run of at most ~5 minutes.

Steps (each timed; a failure is recorded with its exact error and the run goes on; a step whose input failed is
skipped, saying why):

1. ``env``      nvidia-smi, versions of torch/transformers/... and of what the wheels installed;
2. ``model``    a random-init Llama (~400 M parameters in bf16 on the GPU; built from a config, nothing downloaded);
3. ``gptq``     GPTQ int4 (group 128) of it on the GPU through ``hfcompress.quantize`` + ``save_checkpoint``;
4. ``runtime``  ``load_compressed(..., device="cuda")``: logits against the dequantized model (relative L2, max/mean
                |diff|, KL, top-1 agreement), and decode tokens/s against plain bf16 transformers (``measure_speed``:
                ``torch.cuda.synchronize`` around every timing), weight bytes and peak GPU memory;
5. ``distill``  20 bf16 (autocast) steps of ``DistillationTrainer`` (chunked loss) from the random teacher into a
                4-layer student;
6. ``pytest``   ``python -m pytest -m cuda tests`` (the tests that compare our CPU references with the real CUDA
                kernels, and whole checkpoints on the GPU);
7. ``bnb``      bitsandbytes int8 and nf4 through ``hfcompress.quantize`` on the GPU (when bitsandbytes imports);
8. ``kernels``  one linear layer at batch 1 and 16: bf16 ``linear``, tinygemm int4, int8 dequantized in the
                GEMM, and ``aten._weight_int8pack_mm`` (CUDA events);
9. ``compile``  ``load_compressed(..., compile_decode=True)`` on the GPU (static cache, ``torch.compile`` with CUDA
                graphs): compile time, the same greedy tokens as the eager packed model, decode tokens/s against it;
10. ``awq``     AWQ int4 of the same model on the GPU (if the time budget allows).

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``$OUT``, else ``./gpu_check_out``) after
every step, so a run cut short still leaves its report. ``--dry-run`` (or ``HFCOMPRESS_GPU_CHECK_DRY=1``) runs the
same code on the CPU with tiny sizes (pytest skipped): that is what the CPU test-suite exercises.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "compressed-tensors", "greenlet",
            "bitsandbytes", "datasets", "numpy", "pydantic", "huggingface-hub")


@dataclass(frozen=True)
class Sizes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    calib_samples: int
    calib_len: int
    prompt: int
    new_tokens: int
    timing_repeats: int
    eval_batch: int
    eval_len: int
    distill_steps: int
    distill_batch: int
    distill_len: int
    student_layers: int
    bench_n: int
    bench_k: int
    budget_s: float  # steps that would start after this many seconds are skipped


GPU_SIZES = Sizes(hidden=1536, intermediate=4096, layers=12, heads=12, kv_heads=4, vocab=32000, calib_samples=64,
                  calib_len=512, prompt=64, new_tokens=128, timing_repeats=3, eval_batch=4, eval_len=256,
                  distill_steps=20, distill_batch=8, distill_len=512, student_layers=4, bench_n=4096, bench_k=4096,
                  budget_s=290.0)
DRY_SIZES = Sizes(hidden=64, intermediate=192, layers=2, heads=4, kv_heads=2, vocab=320, calib_samples=8,
                  calib_len=64, prompt=8, new_tokens=4, timing_repeats=1, eval_batch=2, eval_len=16,
                  distill_steps=2, distill_batch=2, distill_len=32, student_layers=1, bench_n=64, bench_k=256,
                  budget_s=240.0)


# --------------------------------------------------------------------------------------------------------
# The run: steps, their records, the report
# --------------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, out: Path, sizes: Sizes, dry_run: bool, device):
        self.out, self.sizes, self.dry_run, self.device = out, sizes, dry_run, device
        self.started = time.perf_counter()
        self.steps: dict[str, dict] = {}
        self.state: dict = {}  # objects handed from step to step (models, paths)
        self.work = Path(tempfile.mkdtemp(prefix="hfcompress-gpu-check-"))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def step(self, name: str, fn, needs: tuple[str, ...] = ()) -> None:
        record: dict = {"status": "ok"}
        missing = [n for n in needs if self.steps.get(n, {}).get("status") != "ok"]
        if missing:
            record = {"status": "skipped", "reason": f"needs step(s) {', '.join(missing)}, which did not succeed"}
        elif self.elapsed() > self.sizes.budget_s:
            record = {"status": "skipped", "reason": f"time budget of {self.sizes.budget_s:.0f}s used up"}
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            start = time.perf_counter()
            try:
                result = fn(self)
                if isinstance(result, dict):
                    record.update(result)
            except Skip as exc:
                record = {"status": "skipped", "reason": str(exc)}
            except StepFailed as exc:  # it ran; its measurements say why it failed
                record = {**exc.result, "status": "failed", "error": str(exc)}
            except BaseException as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
                if isinstance(exc, KeyboardInterrupt):
                    raise
                record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".strip(),
                          "traceback": traceback.format_exc().splitlines()[-25:]}
            record["seconds"] = round(time.perf_counter() - start, 2)
            peak = _peak_gpu_bytes(self.device)
            if peak is not None:
                record.setdefault("peak_gpu_memory_gib", round(peak / 2 ** 30, 3))
        self.steps[name] = record
        print(f"[gpu_check] {name}: {record['status']}"
              + (f" ({record.get('error') or record.get('reason')})" if record["status"] != "ok" else "")
              + f" [{self.elapsed():.0f}s total]", flush=True)
        self.write()

    def write(self) -> None:
        payload = {"dry_run": self.dry_run, "device": str(self.device), "sizes": asdict(self.sizes),
                   "elapsed_s": round(self.elapsed(), 1), "steps": self.steps}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(payload))


class Skip(Exception):
    """A step that cannot run here (e.g. a package is missing): recorded as skipped with this reason."""


class StepFailed(Exception):
    """A step that ran but whose outcome is a failure; carries the step's measurements along."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def markdown(payload: dict) -> str:
    lines = [f"# hfcompress GPU check{' (dry run on CPU)' if payload['dry_run'] else ''}", "",
             f"Device: `{payload['device']}`; total {payload['elapsed_s']} s.", "",
             "| step | status | seconds | summary |", "|---|---|---:|---|"]
    for name, record in payload["steps"].items():
        summary = record.get("summary") or record.get("error") or record.get("reason") or ""
        lines.append(f"| {name} | {record['status']} | {record.get('seconds', '')} | {_cell(summary)} |")
    for name, record in payload["steps"].items():
        lines += ["", f"## {name}", "", "```json", json.dumps(record, indent=2, default=str)[:20000], "```"]
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


def _peak_gpu_bytes(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------
def step_env(run: Run) -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    import hfcompress

    result = {"python": platform.python_version(), "versions": versions, "hfcompress": str(Path(hfcompress.__file__).parent),
              "wheel_install": os.environ.get("GPU_CHECK_INSTALL_STATUS", "not run by gpu_check.sh"),
              "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                      gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        result["nvidia_smi"] = (smi.stdout or smi.stderr).splitlines()[:25]
    except (OSError, subprocess.TimeoutExpired) as exc:
        result["nvidia_smi"] = f"unavailable: {exc}"
    result["summary"] = (f"torch {versions['torch']}, transformers {versions['transformers']}, "
                         f"{result.get('gpu', 'no GPU')}; wheels: {result['wheel_install']}")
    return result


def step_pytest(run: Run) -> dict:
    if run.dry_run:
        raise Skip("dry run: the cuda-marked tests are skipped on CPU anyway")
    # Only the files that hold cuda-marked tests: collecting the whole suite costs a minute of imports.
    files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
                   if "mark.cuda" in path.read_text(errors="replace"))
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs",
               "--continue-on-collection-errors", *files]
    timeout = max(45.0, min(170.0, run.sizes.budget_s + 60 - run.elapsed()))
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output, code = output + f"\n(timed out after {timeout:.0f} s)", "timeout"
    tail = output.strip().splitlines()[-80:]
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|error)", line)), tail[-1:])
    result = {"command": " ".join(command), "returncode": code, "summary": summary, "output_tail": tail}
    if code not in (0, 5):
        raise StepFailed(f"pytest exited with {code}: {summary}", result)
    return result


def step_model(run: Run) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = run.sizes
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    with torch.device(run.device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    run.state["fp_model"] = model
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "dtype": str(dtype), "summary": f"random Llama, {params / 1e6:.0f} M parameters, "
            f"{s.layers} x {s.hidden} (MLP {s.intermediate}), vocab {s.vocab}"}


def _tokens(run: Run, rows: int, length: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, run.sizes.vocab, (rows, length), generator=generator)


def step_gptq(run: Run) -> dict:
    import torch

    from hfcompress import QuantizationConfig, quantize
    from hfcompress.quantization.saving import save_checkpoint

    s = run.sizes
    model = copy.deepcopy(run.state["fp_model"])
    config = QuantizationConfig(method="gptq", bits=4, group_size=128 if s.hidden >= 128 else 32,
                                num_samples=s.calib_samples, seq_len=s.calib_len)
    calibration = _tokens(run, s.calib_samples, s.calib_len, seed=1)
    _reset_peak(run.device)
    start = time.perf_counter()
    quantize(model, config, calibration_data=calibration, progress=False)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    report = model.hfcompress_report
    devices = sorted({str(b.device) for b in model.buffers()} | {str(p.device) for p in model.parameters()})
    errors = [layer.error_after for layer in report.layers]
    errors_before = [layer.error_before for layer in report.layers]
    run.state["quantized"] = model
    path = run.work / "int4-gptq"
    start = time.perf_counter()
    save_checkpoint(model, path, overwrite=True)
    save_seconds = time.perf_counter() - start
    run.state["int4_path"] = path
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"quantize_seconds": round(seconds, 2), "save_seconds": round(save_seconds, 2),
            "true_sequential_one_pass": report.true_sequential, "layers": len(report.layers),
            "tensor_devices_after": devices, "checkpoint_bytes": size,
            "mean_relative_output_error_gptq": sum(errors) / len(errors),
            "mean_relative_output_error_rtn": sum(errors_before) / len(errors_before),
            "summary": f"GPTQ int4 g{config.group_size} in {seconds:.1f}s (one pass per layer: "
                       f"{report.true_sequential}); output error {sum(errors) / len(errors):.4f} vs RTN "
                       f"{sum(errors_before) / len(errors_before):.4f}; checkpoint {size / 2 ** 20:.0f} MiB"}


def step_awq(run: Run) -> dict:
    """AWQ int4 on the GPU (half the GPTQ calibration set): that every statistic and search stays on the device."""
    import torch

    from hfcompress import QuantizationConfig, quantize

    s = run.sizes
    model = copy.deepcopy(run.state["fp_model"])
    config = QuantizationConfig(method="awq", bits=4, group_size=128 if s.hidden >= 128 else 32,
                                num_samples=max(2, s.calib_samples // 2), seq_len=max(16, s.calib_len // 2))
    calibration = _tokens(run, config.num_samples, config.seq_len, seed=6)
    start = time.perf_counter()
    quantize(model, config, calibration_data=calibration, progress=False)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    layers = model.hfcompress_report.layers
    after = sum(layer.error_after for layer in layers) / len(layers)
    before = sum(layer.error_before for layer in layers) / len(layers)
    devices = sorted({str(b.device) for b in model.buffers()} | {str(p.device) for p in model.parameters()})
    del model
    return {"quantize_seconds": round(seconds, 2), "layers": len(layers), "tensor_devices_after": devices,
            "mean_relative_output_error_awq": after, "mean_relative_output_error_rtn": before,
            "summary": f"AWQ int4 in {seconds:.1f}s; output error {after:.4f} vs RTN {before:.4f}"}


def _logit_metrics(reference, candidate) -> dict:
    """Max/mean |diff| of logits, mean KL(reference || candidate) per token (nats), top-1 agreement."""
    import torch
    import torch.nn.functional as F

    reference, candidate = reference.float().flatten(0, -2), candidate.float().flatten(0, -2)
    diff = (reference - candidate).abs()
    centered = reference - reference.mean(-1, keepdim=True)  # a random model's logits are small and flat
    kl = F.kl_div(F.log_softmax(candidate, -1), F.log_softmax(reference, -1), log_target=True,
                  reduction="none").sum(-1)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "reference_max_abs": float(reference.abs().max()), "kl_mean": float(kl.mean()),
            "relative_l2": float((reference - candidate).norm() / centered.norm().clamp_min(1e-30)),
            "kl_max": float(kl.max()),
            "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()),
            "finite": bool(torch.isfinite(candidate).all())}


def _speed(run: Run, model, short: bool = False) -> dict:
    from hfcompress.models.evaluate import measure_speed

    prompt = _tokens(run, 1, run.sizes.prompt, seed=3)
    new_tokens = max(4, run.sizes.new_tokens // 4) if short else run.sizes.new_tokens
    timings = measure_speed(model, prompt, new_tokens=new_tokens, repeats=1 if short else run.sizes.timing_repeats)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}


def step_runtime(run: Run) -> dict:
    import collections

    import torch

    from hfcompress import load_compressed
    from hfcompress.models.evaluate import weight_bytes
    from hfcompress.quantization.runtime import PackedModuleMixin, kernel_module

    _reset_peak(run.device)
    start = time.perf_counter()
    packed = load_compressed(run.state["int4_path"], device=run.device, progress=False)
    load_seconds = time.perf_counter() - start
    kernels = {id(kernel_module(m)): kernel_module(m) for _, m in packed.named_modules()
               if isinstance(m, PackedModuleMixin)}  # a fused q/k/v group counts once
    kinds = collections.Counter(type(m).__name__ for m in kernels.values())
    tokens = _tokens(run, run.sizes.eval_batch, run.sizes.eval_len, seed=2).to(run.device)
    with torch.no_grad():
        ours = packed(tokens).logits
        dequantized = run.state["quantized"](tokens).logits  # CompressedLinear: the checkpoint's weights, dequantized
        original = run.state["fp_model"](tokens).logits
    kernel = _logit_metrics(dequantized, ours)
    quantization = _logit_metrics(original, dequantized)
    packed_speed = _speed(run, packed)
    packed_peak = _peak_gpu_bytes(run.device)
    _reset_peak(run.device)
    bf16_speed = _speed(run, run.state["fp_model"])
    bf16_peak = _peak_gpu_bytes(run.device)
    ratio = packed_speed["decode_tokens_per_s"] / bf16_speed["decode_tokens_per_s"]
    result = {
        "load_seconds": round(load_seconds, 2), "module_kinds": dict(kinds),
        "packed_vs_dequantized": kernel, "dequantized_vs_original": quantization,
        "packed_speed": packed_speed, "bf16_transformers_speed": bf16_speed, "decode_speed_ratio": round(ratio, 3),
        "packed_weight_bytes": weight_bytes(packed), "bf16_weight_bytes": weight_bytes(run.state["fp_model"]),
        "packed_peak_gpu_bytes": packed_peak, "bf16_peak_gpu_bytes": bf16_peak,
        "summary": (f"{dict(kinds)}; vs dequantized: rel. L2 {kernel['relative_l2']:.3g} (GPTQ's own vs original: "
                    f"{quantization['relative_l2']:.3g}), KL {kernel['kl_mean']:.2e}, max|diff| "
                    f"{kernel['max_abs_diff']:.3g} of {kernel['reference_max_abs']:.3g}, top-1 "
                    f"{kernel['top1_agreement']:.4f}; decode {packed_speed['decode_tokens_per_s']:.1f} vs bf16 "
                    f"{bf16_speed['decode_tokens_per_s']:.1f} tok/s ({ratio:.2f}x); weights "
                    f"{weight_bytes(packed) / 2 ** 20:.0f} vs {weight_bytes(run.state['fp_model']) / 2 ** 20:.0f} MiB"),
    }
    # A wrong layout or zero-point convention gives uncorrelated logits (relative L2 ~1.4); bf16 rounding through
    # the layers a few percent. GPTQ's own error (dequantized vs original) is the scale to compare with.
    if not kernel["finite"] or kernel["relative_l2"] > 0.2:
        raise StepFailed("packed logits do not match the dequantized model", result)
    run.state["packed"] = packed
    return result


def step_distill(run: Run) -> dict:
    import torch

    from hfcompress import DistillationConfig, DistillationTrainer, make_student
    from hfcompress.core.data import BlockDataset

    s = run.sizes
    teacher = run.state["fp_model"]
    student = make_student(teacher, num_layers=s.student_layers).float()  # float32 master weights, bf16 autocast
    blocks = _tokens(run, s.distill_steps * s.distill_batch, s.distill_len, seed=4)
    args = DistillationConfig(
        output_dir=str(run.work / "distill"), report_to=[], disable_tqdm=True, seed=0, bf16=True,
        use_cpu=run.device.type == "cpu", max_steps=s.distill_steps, per_device_train_batch_size=s.distill_batch,
        learning_rate=1e-4, logging_steps=max(1, s.distill_steps // 4), save_strategy="no", loss_chunk_size=1024,
        kd_weight=0.5, ce_weight=0.5, hidden_weight=1.0, dataloader_num_workers=0)
    _reset_peak(run.device)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=BlockDataset(blocks))
    output = trainer.train()
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    steps_per_s = s.distill_steps / output.metrics["train_runtime"]
    losses = [(entry["step"], round(entry["loss"], 4), round(entry["kd_loss"], 4), round(entry["ce_loss"], 4),
               round(entry.get("hidden_loss", float("nan")), 4)) for entry in logged]
    finite = all(math.isfinite(v) for row in losses for v in row[1:4])
    result = {"train_runtime_s": round(output.metrics["train_runtime"], 2), "steps_per_s": round(steps_per_s, 2),
              "tokens_per_s": round(steps_per_s * s.distill_batch * s.distill_len, 0),
              "logged (step, loss, kd, ce, hidden)": losses, "chunked_loss": trainer._chunked,
              "student_parameters": sum(p.numel() for p in student.parameters()),
              "counter_device": str(trainer._components["train"].device),
              "summary": f"{s.distill_steps} bf16 steps, {steps_per_s:.2f} steps/s; loss {losses[0][1]} -> "
                         f"{losses[-1][1]} (kd {losses[0][2]} -> {losses[-1][2]})" if losses else "nothing logged"}
    if not losses or not finite:
        raise StepFailed("distillation logged no or non-finite losses", result)
    return result


def step_bnb(run: Run) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a missing CUDA library
        raise Skip(f"bitsandbytes not installed or not loadable: {type(exc).__name__}: {exc}") from exc
    import torch

    from hfcompress import QuantizationConfig, quantize
    from hfcompress.models.evaluate import weight_bytes

    tokens = _tokens(run, run.sizes.eval_batch, run.sizes.eval_len, seed=2).to(run.device)
    with torch.no_grad():
        original = run.state["fp_model"](tokens).logits
    result, failures = {"bitsandbytes": importlib.metadata.version("bitsandbytes")}, []
    for method in ("bnb_int8", "bnb_nf4"):
        try:
            _reset_peak(run.device)
            # quantize works in place: quantize a copy, the next steps still need the floating-point model
            extra = {} if method == "bnb_int8" else {"bnb_compute_dtype": "bfloat16"}  # a 4-bit field only
            quantized = quantize(copy.deepcopy(run.state["fp_model"]), QuantizationConfig(method=method, **extra))
            with torch.no_grad():
                logits = quantized(tokens).logits
            speed = _speed(run, quantized, short=True)
            result[method] = {"vs_original": _logit_metrics(original, logits), "speed": speed,
                              "weight_bytes": weight_bytes(quantized),
                              "device": str(next(quantized.parameters()).device)}
            del quantized
        except Exception as exc:  # noqa: BLE001
            result[method] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc().splitlines()[-12:]}
            failures.append(method)
    result["summary"] = "; ".join(
        f"{m}: " + (f"KL {result[m]['vs_original']['kl_mean']:.2e}, decode {result[m]['speed']['decode_tokens_per_s']:.1f} tok/s"
                    if "error" not in result[m] else result[m]["error"][:120]) for m in ("bnb_int8", "bnb_nf4"))
    if failures:
        raise StepFailed(f"{', '.join(failures)} failed", result)
    return result


def step_kernels(run: Run) -> dict:
    """One (N, K) linear at M = 1 and 16 rows, microseconds per call (CUDA events; wall clock on CPU)."""
    import torch

    from hfcompress.quantization import cuda_runtime as CR

    n, k = run.sizes.bench_n, run.sizes.bench_k
    device = run.device
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(n, k, generator=generator) * 0.02).to(device, torch.bfloat16)
    q4 = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8)
    scale4 = torch.rand(n, k // 128, generator=generator) * 0.01
    q8 = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8).to(device)
    scale8 = (torch.rand(n, generator=generator) * 0.01).to(device)
    candidates = {"bf16 linear": lambda x: torch.nn.functional.linear(x, weight),
                  "int8 dequantized in GEMM": lambda x: CR.int8_matmul_dequantized(x, q8, scale8),
                  "aten._weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, scale8.to(x.dtype))}
    try:
        int4 = CR.CudaInt4Linear(q4, scale4, None, 128, None, torch.bfloat16, device, 128, 8)
        candidates["tinygemm int4"] = int4
    except Exception as exc:  # noqa: BLE001 - no tinygemm on this device (CPU dry run)
        candidates["tinygemm int4"] = exc
    result = {"shape (N, K)": [n, k]}
    for rows in (1, 16):
        x = torch.randn(rows, k, generator=generator).to(device, torch.bfloat16)
        timings = {}
        for name, fn in candidates.items():
            if isinstance(fn, Exception):
                timings[name] = f"unavailable: {type(fn).__name__}: {str(fn)[:120]}"
                continue
            try:
                timings[name] = round(_time_us(fn, x, device), 2)
            except Exception as exc:  # noqa: BLE001
                timings[name] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        result[f"M={rows} (us)"] = timings
    result["summary"] = "; ".join(f"{name} {value}" for name, value in result["M=1 (us)"].items())
    return result


def _time_us(fn, x, device, iters: int = 100) -> float:
    import torch

    with torch.no_grad():
        for _ in range(5):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn(x)
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) * 1000 / iters
        begin = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return (time.perf_counter() - begin) * 1e6 / iters


def step_compile(run: Run) -> dict:
    """The compiled decode step on the device: compile time, tokens equal to the eager packed model's, speed.
    The dry run compiles with Dynamo's "eager" backend (the same tracing, static cache and graph, no Inductor:
    a CPU Inductor compile takes minutes)."""
    import torch

    from hfcompress import load_compressed
    from hfcompress.quantization import decode

    backend = decode.inductor_backend
    if run.dry_run:
        decode.inductor_backend = lambda: "eager"
    try:
        return _compiled_decode(run, torch, load_compressed, decode)
    finally:
        decode.inductor_backend = backend


def _compiled_decode(run: Run, torch, load_compressed, decode) -> dict:
    eager = run.state["packed"]
    prompt = _tokens(run, 1, run.sizes.prompt, seed=3).to(run.device)
    new_tokens = 8 if run.dry_run else 32

    def greedy(model):
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  eos_token_id=None, do_sample=False, pad_token_id=0)

    compiled = load_compressed(run.state["int4_path"], device=run.device, progress=False, compile_decode=True)
    start = time.perf_counter()
    tokens = greedy(compiled)  # the first call compiles
    compile_seconds = time.perf_counter() - start
    status = decode.compiled_decode_status(compiled)
    same = bool(torch.equal(tokens, greedy(eager)))
    compiled_speed, eager_speed = _speed(run, compiled, short=True), _speed(run, eager, short=True)
    ratio = compiled_speed["decode_tokens_per_s"] / eager_speed["decode_tokens_per_s"]
    result = {"compiled_decode": status, "compile_seconds": round(compile_seconds, 1), "same_tokens_as_eager": same,
              "compiled_speed": compiled_speed, "eager_speed": eager_speed, "decode_speed_ratio": round(ratio, 3),
              "summary": f"{status}; first generate (compile) {compile_seconds:.0f} s; tokens "
                         f"{'equal' if same else 'DIFFER'} to eager; decode {compiled_speed['decode_tokens_per_s']:.1f}"
                         f" vs eager {eager_speed['decode_tokens_per_s']:.1f} tok/s ({ratio:.2f}x)"}
    # bf16 greedy decoding may flip a near-tie token on a random model; the compiled step must at least compile
    if status != "compiled":
        raise StepFailed(f"compile_decode fell back: {status}", result)
    return result


STEPS = (  # the headline numbers first; the budget skips what comes late
    ("env", step_env, ()),
    ("model", step_model, ()),
    ("gptq", step_gptq, ("model",)),
    ("runtime", step_runtime, ("gptq",)),
    ("distill", step_distill, ("model",)),
    ("pytest", step_pytest, ()),
    ("bnb", step_bnb, ("model",)),
    ("kernels", step_kernels, ()),
    ("compile", step_compile, ("runtime",)),
    ("awq", step_awq, ("model",)),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="report folder")
    parser.add_argument("--dry-run", action="store_true",
                        default=os.environ.get("HFCOMPRESS_GPU_CHECK_DRY", "") not in ("", "0"),
                        help="run on the CPU with tiny sizes (what the CPU tests exercise)")
    parser.add_argument("--steps", default=None, help="comma-separated subset of: " + ", ".join(n for n, *_ in STEPS))
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        run = Run(Path(args.out), GPU_SIZES, False, torch.device("cpu"))
        run.step("env", step_env)  # what the machine has, to see why there is no GPU
        run.steps["gpu"] = {"status": "failed", "error": "torch.cuda.is_available() is False; use --dry-run (or "
                            "HFCOMPRESS_GPU_CHECK_DRY=1) to run on CPU"}
        run.write()
        print(f"[gpu_check] {run.steps['gpu']['error']}", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    run = Run(Path(args.out), DRY_SIZES if args.dry_run else GPU_SIZES, args.dry_run, device)
    chosen = None if args.steps is None else set(args.steps.split(","))
    for name, fn, needs in STEPS:
        if chosen is not None and name not in chosen:
            continue
        run.step(name, fn, needs=tuple(n for n in needs if chosen is None or n in chosen))
    with contextlib.suppress(OSError):
        import shutil

        shutil.rmtree(run.work, ignore_errors=True)
    print((run.out / "gpu_check.md").read_text())
    failed = [name for name, record in run.steps.items() if record["status"] == "failed"]
    print(f"[gpu_check] done in {run.elapsed():.0f}s; failed: {', '.join(failed) or 'none'}; report in {run.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
