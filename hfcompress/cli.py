"""The ``hfcompress`` command line: thin subcommands over the Python API.

User mistakes (``HFCompressError``) print one line and exit with code 2; anything else is a bug and keeps its
traceback. Heavy imports (torch, transformers) happen inside the subcommands so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from . import __version__
from .core.errors import HFCompressError

logger = logging.getLogger("hfcompress")

EXIT_USER_ERROR = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps the description's line breaks."""


# --------------------------------------------------------------------------------------------------------
# Dataclass fields -> command-line flags (the same names as YAML recipe keys)
# --------------------------------------------------------------------------------------------------------
def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_none_or_int(text: str):
    return None if text.lower() in ("none", "null") else int(text)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, exclude: set[str] = frozenset()) -> list[str]:
    """Add one ``--field-name`` flag per dataclass field (default ``None`` = keep the dataclass default)."""
    hints = typing.get_type_hints(cls)
    added = []
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init or field.name.startswith("_"):
            continue
        tp = _unwrap_optional(hints.get(field.name, str))
        origin = typing.get_origin(tp)
        kwargs: dict = {"default": None, "dest": field.name}
        if tp is bool:
            kwargs["type"] = _parse_bool
            kwargs["metavar"] = "{true,false}"
        elif tp is int:
            kwargs["type"] = _parse_none_or_int
        elif tp is float:
            kwargs["type"] = float
        elif origin in (list, tuple):
            kwargs["nargs"] = "*"
        elif origin is dict or tp is dict or typing.get_origin(tp) is typing.Union:
            kwargs["type"] = _parse_json_or_text
        else:
            kwargs["type"] = str
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        help_text = field.metadata.get("help", "")
        kwargs["help"] = f"{help_text} (default: {default!r})".strip()
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)
        added.append(field.name)
    return added


def collect_dataclass_values(args: argparse.Namespace, names: list[str]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


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

    texts = load_texts(args.data, split="test")  # fail on bad data before loading any model
    results = []
    for name in args.models:
        path = resolve_model(name)
        model = load_for_inference(path, runtime=args.runtime)
        results.append(evaluate(model, load_tokenizer(path), model_name=name,
                                checkpoint_dir=path if Path(path).is_dir() else None, data=texts, data_label=args.data, block_size=args.block_size, num_blocks=args.num_blocks,
                                stride=args.stride, batch_size=args.batch_size, speed=not args.no_speed,
                                new_tokens=args.new_tokens, progress=not args.quiet))
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


def cmd_quantize(args) -> int:
    from .jobs.pipeline import run_quantize
    from .quantization.config import QuantizationConfig

    values = collect_dataclass_values(args, args._config_fields)
    config = QuantizationConfig(**values)
    out = run_quantize(args.model, args.output, config, calibration_data=args.calibration_data,
                       overwrite=args.overwrite, max_shard_size=args.max_shard_size, progress=not args.quiet)
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


def cmd_kernels(args) -> int:
    """Build hfcompress's native CPU kernels now (they are otherwise built on first use) and say what runs."""
    from .core.native import native_kernel_status

    status = native_kernel_status()
    for name, state in status.items():
        print(f"{name}: {state}")
    return 0 if all(state == "loaded" for state in status.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", formatter_class=_Formatter, help="post-training quantization of a model")
    p.add_argument("model", help="model folder, .gguf file, Hub id, or reference:small / reference:base")
    p.add_argument("output", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--calibration-data", default="auto",
                   help="text source for calibration (gptq/awq/mse observer): auto (stdlib for the reference "
                        "teachers, mix of English and code for other models), stdlib|pydoc|mix[:split], a path")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    try:
        from .quantization.config import QuantizationConfig

        p.set_defaults(_config_fields=add_dataclass_arguments(p, QuantizationConfig))
    except ImportError:  # pragma: no cover - the quantization package is always shipped
        p.set_defaults(_config_fields=[])
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

    p = sub.add_parser("kernels", formatter_class=_Formatter,
                       help="build the native CPU kernels ahead of first use (e.g. in a Docker image) and report "
                            "them; exit code 1 when one cannot be built (PyTorch's kernels are used instead)")
    p.set_defaults(func=cmd_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["distill"]:
        # Everything after `distill` belongs to the distillation parser (argparse's REMAINDER would
        # otherwise swallow a leading option such as --help into the top-level parser).
        args = argparse.Namespace(command="distill", func=cmd_distill, rest=argv[1:], verbose=False, quiet=False)
    else:
        args = parser.parse_args(argv)
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
