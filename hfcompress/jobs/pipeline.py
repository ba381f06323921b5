"""End-to-end jobs shared by the CLI subcommands and the recipe stages: load -> compress -> save -> card."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from ..core.errors import ConfigError, HFCompressError

logger = logging.getLogger(__name__)

STDLIB_DESCRIPTION = ("The Python standard library's own source files (offline corpus shipped with every Python; "
                      "split by file into train/validation/test).")
SOURCE_DESCRIPTIONS = {
    "stdlib": STDLIB_DESCRIPTION,
    "pydoc": ("English prose: the Python language reference shipped with every Python as "
              "`pydoc_data/topics.py`, cut into ~4 KB pieces split into train/validation/test."),
    "mix": ("Half English, half code: the `pydoc` split (the Python language reference's prose) plus as many "
            "characters of the same split of the standard library's source."),
}


def describe_data(source) -> str:
    from ..core.data import named_source

    named = named_source(str(source))
    if named is not None:
        return f"{SOURCE_DESCRIPTIONS[named[0]]} Split used: `{named[1] or 'train'}`."
    return f"`{source}`"


def resolve_calibration_source(source, *model_refs) -> str:
    """``"auto"`` -> ``"stdlib"`` when any of ``model_refs`` is an hfcompress reference teacher (trained on
    Python source alone; in a recipe, its students too), ``"mix"`` for every other model; other sources as
    given. See :func:`hfcompress.core.data.default_calibration_source`."""
    from ..core.data import AUTO_SOURCE, default_calibration_source

    if str(source) != AUTO_SOURCE:
        return source
    return default_calibration_source(any(_is_reference_teacher(ref) for ref in model_refs if ref))


def _is_reference_teacher(model_ref) -> bool:
    """A ``reference:<size>`` name or a folder the reference trainer wrote (it holds reference_metrics.json)."""
    name = os.fspath(model_ref)
    return name.startswith("reference:") or (Path(name).expanduser() / "reference_metrics.json").is_file()


def _settings(config) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------------------
# Quantize
# --------------------------------------------------------------------------------------------------------
def quantize_to_folder(model_ref: str, out_dir, config, calibration_data="auto", max_shard_size="2GB",
                       overwrite: bool = False, progress: bool = True, recipe_text: str | None = None,
                       base_model: str | None = None, device: str | None = None, strict: bool = False,
                       stream: bool = False, max_memory: str | None = None) -> Path:
    """Load ``model_ref`` (on ``device``), quantize it with ``config``, save it (atomically) with its tokenizer
    and card.

    ``calibration_data="auto"`` is resolved by :func:`resolve_calibration_source` from ``model_ref`` and
    ``base_model`` (a recipe's root model). ``stream``: never load the whole model; quantize it one decoder
    layer at a time from its safetensors shards within ``max_memory``
    (:func:`hfcompress.quantization.streaming.quantize_checkpoint`).
    """
    from ..models.loading import gguf_note, load_model, load_tokenizer, resolve_model
    from ..quantization.api import quantize
    from ..core.atomic import check_destination
    from ..quantization.saving import save_checkpoint

    # Refuse what would fail at save time before the (long) load and quantization.
    check_destination(Path(out_dir).expanduser().absolute(), overwrite)
    check_shard_size(max_shard_size)
    resolved = resolve_model(model_ref)
    calibration_data = resolve_calibration_source(calibration_data, model_ref, resolved, base_model)
    uses_data = config.method in ("gptq", "awq") or getattr(config, "observer", "minmax") != "minmax"
    if not stream and max_memory is not None:
        raise ConfigError("max_memory bounds a streamed quantization: pass --stream with --max-memory")
    if stream:
        from ..quantization.streaming import quantize_checkpoint

        if device not in (None, "cpu"):
            raise ConfigError(f"--stream quantizes on the CPU, one layer at a time; drop --device {device}")
        tokenizer = load_tokenizer(resolved)

        def card_files(report) -> dict:
            card = _quantization_card(model_ref, config, calibration_data, uses_data, report, recipe_text,
                                      base_model, gguf_note(resolved))
            return {"README.md": str(card)}

        return quantize_checkpoint(resolved, out_dir, config, calibration_data=calibration_data if uses_data else None,
                                   tokenizer=tokenizer, max_memory=max_memory, max_shard_size=max_shard_size,
                                   overwrite=overwrite, progress=progress, strict=strict, extra_files=card_files)
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved, device=device)
    quantize(model, config, calibration_data=calibration_data if uses_data else None, tokenizer=tokenizer,
             progress=progress, strict=strict)
    card = _quantization_card(model_ref, config, calibration_data, uses_data, getattr(model, "hfcompress_report", None),
                              recipe_text, base_model, gguf_note(model))
    return save_checkpoint(model, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size, overwrite=overwrite,
                           extra_files={"README.md": str(card)})


def _quantization_card(model_ref, config, calibration_data, uses_data: bool, report, recipe_text, base_model,
                       base_model_note):
    """The model card of a quantized checkpoint (in memory or streamed): settings, data, coverage, loading."""
    from .hub import build_model_card

    settings = _settings(config)
    fallbacks = getattr(report, "fallbacks", None)
    if fallbacks:  # {layer: group size used} for layers the requested group size does not divide
        settings["group_size_fallbacks"] = fallbacks
    return build_model_card(
        title=f"{Path(str(base_model or model_ref)).name} ({config.method}, {config.weight_bits}-bit)"
        if config.method != "cast" else f"{Path(str(base_model or model_ref)).name} ({config.dtype})",
        base_model=base_model or model_ref, method=f"post-training quantization ({config.method})",
        settings=settings,
        data_description=("Calibration data: " + describe_data(calibration_data)) if uses_data
        else "No calibration data (data-free method).",
        recipe_text=recipe_text, load_snippet=_load_snippet(config), coverage=getattr(report, "coverage", None),
        tags=["quantized", config.method] if config.method != "cast" else ["cast", config.dtype],
        base_model_note=base_model_note)


def check_shard_size(max_shard_size) -> None:
    """``max_shard_size`` as ``save_pretrained`` reads it (bytes, or "2GB", "500MB": huggingface_hub's parser)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    size = max_shard_size
    if isinstance(max_shard_size, str):
        try:
            size = parse_size_to_int(max_shard_size)
        except ValueError:
            size = None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError(f"max_shard_size={max_shard_size!r} is not a size; write it like '2GB' or '500MB'")


def _load_snippet(config) -> str:
    plain = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             "# plain transformers (compressed-tensors installed) decompresses the weights on load:\n"
             "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo id>\")\n"
             "tokenizer = AutoTokenizer.from_pretrained(\"<this folder or repo id>\")")
    if config.method in ("rtn", "gptq", "awq"):
        return plain + ("\n\n# hfcompress keeps the weights packed and runs PyTorch's int4/int8 kernels:\n"
                        "import hfcompress\nmodel = hfcompress.load_compressed(\"<this folder or repo id>\")")
    return plain


def run_quantize(model_ref, out_dir, config, calibration_data="auto", overwrite=False, max_shard_size="2GB",
                 progress=True, device=None, strict=False, stream=False, max_memory=None) -> Path:
    return quantize_to_folder(model_ref, out_dir, config, calibration_data=calibration_data,
                              max_shard_size=max_shard_size, overwrite=overwrite, progress=progress, device=device,
                              strict=strict, stream=stream, max_memory=max_memory)


def quantize_stage(ctx) -> dict:
    args = ctx.config("QuantizeStageArgs")
    config = ctx.config("QuantizationConfig")
    base = ctx.stage.input or ctx.default_input
    base_name = ctx.recipe.model if base == "model" else base
    calibration_data = resolve_calibration_source(args.calibration_data, ctx.recipe.model, ctx.input_model)
    out = quantize_to_folder(ctx.input_model, ctx.work_dir, config, calibration_data=calibration_data,
                             max_shard_size=args.max_shard_size, overwrite=True, progress=ctx.progress,
                             recipe_text=ctx.recipe.source, base_model=base_name, device=args.device,
                             strict=args.strict, stream=args.stream, max_memory=args.max_memory)
    return {"output": out.name, "method": config.method, "bits": config.weight_bits}


# --------------------------------------------------------------------------------------------------------
# Distill
# --------------------------------------------------------------------------------------------------------
def distill_stage(ctx) -> dict:
    """Distil the stage's input (the teacher, unless the stage names one) into a student in the stage folder."""
    import shutil

    from ..models.loading import gguf_note
    from .distill import distill_from_args
    from .hub import write_model_card

    script_args = ctx.config("DistillScriptArguments")
    config = ctx.config("DistillationConfig")
    if "teacher" not in ctx.stage.raw:
        script_args = dataclasses.replace(script_args, teacher=ctx.input_model)
    config.output_dir = str(ctx.work_dir)
    out = distill_from_args(script_args, config)
    for checkpoint in Path(out).glob("checkpoint-*"):  # the stage's output is the final student only
        shutil.rmtree(checkpoint)
    base = ctx.stage.input or ctx.default_input
    write_model_card(
        out, title=f"Student distilled from {Path(str(ctx.recipe.model if base == 'model' else base)).name}",
        base_model=ctx.recipe.model if base == "model" else base,
        method=f"knowledge distillation ({config.loss}, T={config.temperature})",
        settings={**ctx.stage.raw, "teacher": script_args.teacher},
        data_description="Training data: " + describe_data(script_args.dataset),
        recipe_text=ctx.recipe.source, tags=["distillation"], base_model_note=gguf_note(script_args.teacher))
    return {"output": Path(out).name, "loss": config.loss, "max_steps": config.max_steps}


def run_distill(script_args, config) -> Path:
    from .distill import distill_from_args

    return distill_from_args(script_args, config)


# --------------------------------------------------------------------------------------------------------
# Evaluate
# --------------------------------------------------------------------------------------------------------
def evaluate_in_subprocess(model_path: str, args, json_path: Path, progress: bool = False,
                           kl_to: str | None = None) -> dict:
    """Evaluate one model in a fresh process, so its peak RSS is its own and models do not share caches."""
    command = [sys.executable, "-m", "hfcompress.cli", "eval", model_path, "--json", str(json_path),
               "--data", args.data, "--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens),
               "--runtime", args.runtime]
    for flag, value in (("--block-size", args.block_size), ("--num-blocks", args.num_blocks),
                        ("--stride", args.stride), ("--device", args.device), ("--device-map", args.device_map)):
        if value is not None:
            command += [flag, str(value)]
    if kl_to is not None:
        command += ["--kl-to", str(kl_to)]
    if not args.speed:
        command.append("--no-speed")
    if not progress:
        command.append("-q")
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        message = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HFCompressError(f"evaluating {model_path} failed: {message}")
    return json.loads(json_path.read_text())


def evaluate_stage(ctx) -> dict:
    args = ctx.config("EvaluateStageArgs")
    refs = list(args.models or ((["model"] if ctx.recipe.model else []) + ctx.produced))
    kl_to = ctx.resolve(args.kl_to) if args.kl_to else None
    results = []
    for ref in refs:
        path = ctx.resolve(ref)
        result = evaluate_in_subprocess(path, args, ctx.work_dir / f"eval-{len(results)}.json", ctx.progress,
                                        kl_to=kl_to)
        result["label"] = ref if ref != "model" else Path(str(ctx.recipe.model)).name.replace("reference:", "")
        results.append(result)
    ctx.write_json("results.json", results)
    _add_metrics_to_cards(ctx, refs, results)
    return {"results": results}


def _add_metrics_to_cards(ctx, refs, results) -> None:
    """Put the evaluation table into the model cards of this run's models (atomic rewrite of README.md)."""
    from huggingface_hub import ModelCard

    from .hub import _metrics_table

    table = _metrics_table(results)
    for ref in refs:
        readme = Path(ctx.resolve(ref)) / "README.md"
        if ref == "model" or not readme.is_file() or ctx.run_dir not in readme.parents:
            continue
        card = ModelCard.load(readme)
        text = str(card)
        start = text.find("## Evaluation")
        end = text.find("\n## ", start + 1)
        if start < 0 or end < 0:
            continue
        updated = text[:start] + f"## Evaluation\n\nMeasured by the recipe's `{ctx.stage.name}` stage:\n\n{table}\n" \
            + text[end:]
        tmp = readme.with_suffix(".md.tmp")
        tmp.write_text(updated)
        os.replace(tmp, readme)


# --------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------
def push_stage(ctx) -> dict:
    from .hub import push_folder

    args = ctx.config("PushStageArgs")
    folder = ctx.input_model
    lines: list[str] = []
    files = push_folder(folder, args.repo_id, private=args.private, revision=args.revision,
                        create_pr=args.create_pr, dry_run=args.dry_run, commit_message=args.commit_message,
                        printer=lambda line: (lines.append(line), print(line)))
    ctx.write_json("push.json", {"repo_id": args.repo_id, "dry_run": args.dry_run, "folder": str(folder),
                                 "files": [{"path": p, "bytes": b} for p, b in files], "log": lines})
    return {"repo_id": args.repo_id, "dry_run": args.dry_run, "files": len(files)}
