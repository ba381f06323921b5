"""The ``hfcompress`` command line: thin subcommands over the Python API.

User mistakes (``HFCompressError``) print one line and exit with code 2; anything else is a bug and keeps its
traceback. Heavy imports (torch, transformers) happen inside the subcommands so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .core.errors import ConfigError, HFCompressError

logger = logging.getLogger("hfcompress")

EXIT_USER_ERROR = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps the description's line breaks."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (no usage block), like every other hfcompress error."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


# --------------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------------
def cmd_reference(args) -> int:
    from .models.reference import reference_metrics, reference_model

    path = reference_model(args.size, force=args.force, progress=not args.quiet)
    metrics = reference_metrics(args.size)
    print(f"reference '{args.size}' teacher: {path}")
    if metrics:
        print(f"  parameters:                      {metrics['num_parameters']:,}")
        print(f"  validation perplexity:           {metrics['validation_perplexity']:.2f}")
        print(f"  unigram baseline perplexity:     {metrics['unigram_validation_perplexity']:.2f}")
        if "validation_bits_per_byte" in metrics:
            print(f"  validation bits per byte:        {metrics['validation_bits_per_byte']:.4f}")
        print(f"  training: {metrics['train_tokens']:,} tokens in {metrics['train_seconds']:.0f}s")
    return 0


def cmd_eval(args) -> int:
    from .models.evaluate import evaluate, format_table
    from .models.loading import load_for_inference, load_tokenizer, resolve_model

    from .core.data import load_texts

    if args.json and not Path(args.json).expanduser().absolute().parent.is_dir():
        raise ConfigError(f"--json {args.json}: folder {str(Path(args.json).parent)!r} does not exist; create it "
                          f"or write the JSON elsewhere")
    texts = load_texts(args.data, split="test")  # fail on bad data before loading any model
    results = []
    for name in args.models:
        path = resolve_model(name)
        model = load_for_inference(path, runtime=args.runtime, device=args.device, device_map=args.device_map)
        results.append(evaluate(model, load_tokenizer(path), model_name=name,
                                checkpoint_dir=path if Path(path).is_dir() else None, data=texts, data_label=args.data, block_size=args.block_size, num_blocks=args.num_blocks,
                                stride=args.stride, batch_size=args.batch_size, speed=not args.no_speed,
                                new_tokens=args.new_tokens, progress=not args.quiet, kl_reference=args.kl_to))
    print(format_table(results))
    if args.json:
        payload = [r.to_dict() for r in results]
        Path(args.json).write_text(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_verify(args) -> int:
    from .quantization.verify import verify_checkpoint

    report = verify_checkpoint(args.path, deep=not args.quick)
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def quantize_parser():
    """``hfcompress quantize``'s flags: every QuantizeStageArgs / QuantizationConfig field (``--group-size`` or
    ``--group_size``), the keys of a recipe's quantize stage, through the one parser (jobs/arguments.py)."""
    from .jobs.arguments import ArgumentParser
    from .jobs.stages import QuantizeStageArgs
    from .quantization.config import QuantizationConfig

    parser = ArgumentParser((QuantizeStageArgs, QuantizationConfig), prog="hfcompress quantize",
                            description="Post-training quantization of a model.")
    parser.add_argument("model", help="model folder, Hub id, or reference:small / reference:base")
    parser.add_argument("output", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_allow_pickle(parser)
    return parser


def cmd_quantize(args) -> int:
    from .jobs.pipeline import run_quantize

    stage, config, rest = quantize_parser().parse_into_dataclasses(args.rest)
    if rest.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = run_quantize(rest.model, rest.output, config, calibration_data=stage.calibration_data,
                       overwrite=rest.overwrite, max_shard_size=stage.max_shard_size, progress=not rest.quiet,
                       device=stage.device, strict=stage.strict, stream=stage.stream, max_memory=stage.max_memory)
    print(f"wrote {out}")
    return 0


def cmd_distill(args) -> int:
    from .jobs.distill import parse_distill_args
    from .jobs.pipeline import run_distill

    if args.rest in (["-h"], ["--help"]):
        # HfArgumentParser prints every DistillationConfig/TrainingArguments flag with its default.
        args.rest = ["--help"]
    out = run_distill(*parse_distill_args(args.rest))
    print(f"wrote {out}")
    return 0


def cmd_run(args) -> int:
    from .runs.recipe import load_recipe
    from .runs.runner import run_recipe

    recipe = load_recipe(args.recipe, overrides=args.set)
    run_dir = run_recipe(recipe, output=args.output, overwrite=args.overwrite, progress=not args.quiet)
    print(f"run finished: {run_dir} (report: {Path(run_dir) / 'report.md'})")
    return 0


def cmd_push(args) -> int:
    from .jobs.hub import push_folder

    push_folder(args.path, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
                dry_run=args.dry_run, commit_message=args.commit_message)
    return 0


def cmd_cache_teacher(args) -> int:
    """Run the teacher once over the data and write its top-k distributions (offline distillation cache)."""
    from dataclasses import asdict

    from .core.data import load_blocks
    from .distillation.cache import TeacherCache, approximation_error, check_destination, write_teacher_cache
    from .models.loading import load_model, load_tokenizer, resolve_model

    check_destination(args.out)  # before reading any data
    path = resolve_model(args.teacher)
    tokenizer = load_tokenizer(path)
    blocks = load_blocks(args.data, tokenizer, args.block_size, split=args.split, num_blocks=args.num_blocks,
                         seed=args.seed)
    teacher = load_model(path)
    meta = write_teacher_cache(teacher, blocks, args.out, top_k=args.top_k, temperature=args.temperature,
                               tokenizer=tokenizer, teacher_name=path, logprob_format=args.logprob_format,
                               batch_size=args.batch_size, progress=not args.quiet,
                               hidden_layers=args.hidden_layers, hidden_dtype=args.hidden_dtype,
                               id_coding=args.id_coding, sampling=args.sampling, seed=args.seed,
                               tail_draws=args.tail_draws)
    summary = {k: v for k, v in asdict(meta).items() if k != "shards"}
    if args.student:
        summary["approximation_error"] = approximation_error(TeacherCache(args.out), teacher,
                                                             load_model(resolve_model(args.student)))
    print(json.dumps(summary, indent=2))
    hidden = (f" + {meta.hidden_bytes_per_token:.1f} bytes/token of hidden states (layers "
              f"{', '.join(map(str, meta.hidden_layers))}, {meta.hidden_dtype})" if meta.hidden_layers else "")
    print(f"wrote {args.out} ({meta.tokens:,} predicted tokens, {meta.bytes_per_token:.1f} bytes/token{hidden})")
    return 0


def cmd_truncate(args) -> int:
    """Keep a model's first k decoder layers (with its embeddings, final norm and LM head)."""
    from .distillation.modes import truncate
    from .models.loading import load_model, load_tokenizer, resolve_model
    from .quantization.saving import save_checkpoint

    path = resolve_model(args.model)
    model = truncate(load_model(path), args.layers)
    out = save_checkpoint(model, args.output, tokenizer=load_tokenizer(path), overwrite=args.overwrite)
    print(f"wrote {out} ({args.layers} layers)")
    return 0


def cmd_kernels(args) -> int:
    """Build hfcompress's native CPU kernels now (they are otherwise built on first use) and say what runs,
    with the instruction set of each (HFCOMPRESS_CPU_ISA=avx512|avx2|generic narrows it)."""
    from .core.native import native_kernel_status

    status = native_kernel_status()
    for name, state in status.items():
        print(f"{name}: {state}")
    return 0 if all(state.startswith("loaded") for state in status.values()) else 1


def _add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load checkpoints whose weights are pickles (.bin/.pt), which can run code when "
                             "loaded; only for checkpoints you trust (default: safetensors only)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hfcompress", formatter_class=_Formatter,
        description="Distill and quantize Hugging Face causal LMs into small, Hub-ready checkpoints.\n\n"
                    "Start with:  hfcompress run recipes/quickstart.yaml")
    parser.add_argument("--version", action="version", version=f"hfcompress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("reference", formatter_class=_Formatter,
                       help="train (or reuse) the reference tokenizer + Llama teacher on the stdlib corpus")
    p.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="which reference teacher")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("eval", formatter_class=_Formatter,
                       help="perplexity, size, speed and memory of one or more models",
                       description="Held-out perplexity uses fixed-length non-overlapping windows (or --stride).")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model folder, Hub id, or reference:small / reference:base")
    p.add_argument("--data", default="stdlib:test",
                   help="text source: stdlib|pydoc|mix[:split], a file/folder, a saved dataset or a datasets name")
    p.add_argument("--block-size", type=int, default=None, help="tokens per window (default: min(context, 512))")
    p.add_argument("--num-blocks", type=int, default=None, help="score a seeded subset of this many windows")
    p.add_argument("--stride", type=int, default=None, help="overlapping windows advancing by this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated for the decode speed")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode speed measurement")
    p.add_argument("--runtime", default="auto", choices=["auto", "packed", "transformers"],
                   help="compressed-tensors checkpoints: keep weights packed (auto/packed) or let plain "
                        "transformers decompress them")
    p.add_argument("--device", default=None,
                   help="where to run: cpu, cuda, cuda:N or auto (default: cpu); compressed-tensors checkpoints "
                        "keep their weights packed there too")
    p.add_argument("--device-map", default=None,
                   help="accelerate device_map for plain checkpoints, e.g. auto (spreads layers over the GPUs)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--kl-to", default=None, metavar="MODEL",
                   help="also report the mean KL(MODEL's next-token distribution ‖ each model's), e.g. the teacher")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_allow_pickle(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", formatter_class=_Formatter, add_help=False,
                       help="post-training quantization of a model (every QuantizationConfig field is a flag; "
                            "--help lists them)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("distill", formatter_class=_Formatter, add_help=False,
                       help="distill a teacher into a student (flags as scripts/distill.py; --help lists them)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("run", formatter_class=_Formatter, help="run a YAML recipe (resumable)")
    p.add_argument("recipe", help="path to a recipe YAML file (see recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set quantize.bits=8 or --set model=path (repeatable)")
    p.add_argument("--output", default=None, help="run folder (default: the recipe's output_dir)")
    p.add_argument("--overwrite", action="store_true", help="delete a run folder of a different recipe first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_allow_pickle(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("push", formatter_class=_Formatter, help="upload a model folder to the Hugging Face Hub")
    p.add_argument("path", help="model folder to upload")
    p.add_argument("repo_id", help="target repository, e.g. user/model-int4")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to upload to")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--dry-run", action="store_true", help="print what would be uploaded; upload nothing")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("verify", formatter_class=_Formatter,
                       help="check a checkpoint's tensors against its config (shapes, dtypes, scales)")
    p.add_argument("path", help="checkpoint folder")
    p.add_argument("--quick", action="store_true",
                   help="headers, layout and scales only; skip reading every float tensor")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("cache-teacher", formatter_class=_Formatter,
                       help="run a teacher once and store its top-k next-token distributions (offline distillation)")
    p.add_argument("teacher", help="teacher folder, Hub id, or reference:<size>")
    p.add_argument("--out", required=True, help="cache folder (must not exist or be empty)")
    p.add_argument("--data", default="stdlib", help="training text: stdlib, a file/folder, a saved dataset...")
    p.add_argument("--split", default="train", help="split of --data")
    p.add_argument("--block-size", type=int, default=256, help="tokens per training block")
    p.add_argument("--num-blocks", type=int, default=None, help="blocks drawn from the data (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the block sampling")
    p.add_argument("--top-k", type=int, default=64, help="token ids stored per position (the rest: one tail bucket)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the stored distributions")
    p.add_argument("--logprob-format", default="uint7", choices=["uint8", "uint7", "uint6", "float16", "float32"],
                   help="log-prob storage: n-bit codes on a per-row grid, or floats")
    p.add_argument("--id-coding", default="ranked-rice", choices=["ranked-rice", "fixed"],
                   help="token-id storage: ranks in each shard's frequency table, Rice-coded (smaller), or sorted "
                        "ids at a fixed width per row")
    p.add_argument("--sampling", default="top-k", choices=["top-k", "sample"],
                   help="top-k: the --top-k most likely ids and the tail mass; sample: --top-k draws from the "
                        "teacher per position, stored as ids and counts (unbiased forward-KL gradient; --seed)")
    p.add_argument("--tail-draws", type=int, default=0, metavar="M",
                   help="with --sampling top-k: also M draws per position from the teacher outside the top-k "
                        "(ids and counts), so training follows the unbiased forward-KL gradient instead of the "
                        "top-k + tail bucket's (--seed)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per teacher forward pass")
    p.add_argument("--hidden-layers", type=int, nargs="+", default=None, metavar="LAYER",
                   help="also store these 0-based teacher layers' hidden states per token (for hidden_weight > 0; "
                        "the last layer's are after the final norm)")
    p.add_argument("--hidden-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage type of --hidden-layers")
    p.add_argument("--student", default=None,
                   help="also report the top-k + tail approximation error against the full KL for this student")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_cache_teacher)

    p = sub.add_parser("truncate", formatter_class=_Formatter,
                       help="keep a model's first k decoder layers (e.g. after self-distillation of early exits)")
    p.add_argument("model", help="model folder, Hub id, or reference:<size>")
    p.add_argument("output", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--layers", type=int, required=True, help="decoder layers to keep")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_truncate)

    p = sub.add_parser("kernels", formatter_class=_Formatter,
                       help="build the native CPU kernels ahead of first use (e.g. in a Docker image) and report "
                            "them; exit code 1 when one cannot be built (PyTorch's kernels are used instead)")
    p.set_defaults(func=cmd_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] in (["distill"], ["quantize"]):
        # Everything after the subcommand belongs to its HfArgumentParser (jobs/arguments.py), built only when
        # needed (it imports transformers); argparse's REMAINDER would otherwise swallow a leading option such
        # as --help into the top-level parser.
        func = {"distill": cmd_distill, "quantize": cmd_quantize}[argv[0]]
        rest = argv[1:] if argv[0] == "quantize" else [a for a in argv[1:] if a != "--allow-pickle"]
        args = argparse.Namespace(command=argv[0], func=func, rest=rest, verbose=False, quiet=False,
                                  allow_pickle="--allow-pickle" in argv[1:])
    else:
        args = parser.parse_args(argv)
    if getattr(args, "allow_pickle", False):
        import os

        from .models.loading import ALLOW_PICKLE_ENV

        os.environ[ALLOW_PICKLE_ENV] = "1"  # read by load_model, here and in the subprocesses a run starts
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except HFCompressError as exc:
        print(f"hfcompress {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
