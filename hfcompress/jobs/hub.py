"""Model cards and pushing to the Hugging Face Hub (through ``huggingface_hub``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..core.errors import HFCompressError
from ..models.loading import WEIGHT_SUFFIXES, check_model_dir

logger = logging.getLogger(__name__)

# Files a user needs to load the model; a push without them uploads something that does not load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model")
_SKIPPED = (".", "__pycache__")


class PushError(HFCompressError):
    """The folder cannot be pushed as asked (no token, incomplete folder, bad repo id)."""


# --------------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------------
def _is_hub_id(name: str | None) -> bool:
    if not name or os.path.exists(os.path.expanduser(name)) or name.startswith(("reference:", ".", "/", "~")):
        return False
    return len(name.split("/")) <= 2 and " " not in name


def _metrics_table(metrics: list[dict]) -> str:
    if not metrics:
        return "_No evaluation was run for this model._"
    lines = ["| model | perplexity | parameters | checkpoint | weights in memory | decode tok/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in metrics:
        def mib(value):
            return f"{value / 2**20:.2f} MiB" if value else "-"

        decode = row.get("decode_tokens_per_s")
        lines.append(f"| {row.get('label', row.get('model'))} | {row['perplexity']:.3f} | "
                     f"{row.get('num_parameters', 0):,} | {mib(row.get('checkpoint_bytes'))} | "
                     f"{mib(row.get('weight_bytes'))} | {f'{decode:.1f}' if decode else '-'} |")
    return "\n".join(lines)


def build_model_card(*, title: str, base_model: str | None, method: str, settings: dict, data_description: str,
                     metrics: list[dict] | None = None, recipe_text: str | None = None,
                     load_snippet: str | None = None, tags: list[str] | None = None, coverage: dict | None = None,
                     base_model_note: str | None = None):
    """A ``huggingface_hub.ModelCard`` with YAML metadata (``ModelCardData``) and a readable body.

    ``coverage``: a quantization's :meth:`hfcompress.quantization.coverage.Coverage.to_dict`; the card then
    states what was quantized ("N of M linear weights quantized, X% of parameters") and what was not, why.
    ``base_model_note`` is said under the base model (e.g. that its weights were dequantized from a GGUF file).
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model if _is_hub_id(base_model) else None,
        tags=["hfcompress", *(tags or [])],
    )
    load_snippet = load_snippet or (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo id>\")\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"<this folder or repo id>\")")
    settings_block = json.dumps(settings, indent=2, sort_keys=True, default=str)
    body = [
        f"# {title}",
        "",
        f"Produced with [hfcompress](https://pypi.org/project/hfcompress/) by **{method}**.",
        "",
        "## Base model",
        "",
        f"`{base_model}`" if base_model else "_unknown_",
        *(["", base_model_note] if base_model_note else []),
        "",
        "## Method and settings",
        "",
        *_coverage_lines(coverage),
        f"```json\n{settings_block}\n```",
        "",
        "## Data",
        "",
        data_description,
        "",
        "## Evaluation",
        "",
        _metrics_table(metrics or []),
        "",
        "## How to load",
        "",
        f"```python\n{load_snippet}\n```",
    ]
    if recipe_text:
        body += ["", "## Recipe", "", "The exact recipe that produced this model:", "",
                 f"```yaml\n{recipe_text.rstrip()}\n```"]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    return ModelCard(content)


def _coverage_lines(coverage: dict | None) -> list[str]:
    if not coverage:
        return []
    lines = [f"**Coverage:** {coverage['line']}.", ""]
    skipped = coverage.get("skipped") or {}
    if skipped:
        lines += ["Kept in floating point:", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in skipped.items()]
        lines.append("")
    return lines


def write_model_card(model_dir: str | os.PathLike, **kwargs) -> Path:
    """Build a card (see :func:`build_model_card`) and save it as ``README.md`` in ``model_dir``."""
    path = Path(model_dir) / "README.md"
    build_model_card(**kwargs).save(path)
    return path


def validate_model_card(path: str | os.PathLike) -> list[str]:
    """Offline checks of a saved card: it parses, has metadata and the sections users look for.

    (``ModelCard.validate`` asks the Hub's API, which is not reachable offline.)
    """
    import yaml
    from huggingface_hub import ModelCard

    problems = []
    try:
        card = ModelCard.load(path)
    except (yaml.YAMLError, ValueError) as exc:  # the metadata block between the '---' lines
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        return [f"its metadata block (between the '---' lines) is not valid YAML: {problem}; fix or delete the card"]
    metadata = card.data.to_dict()
    if metadata.get("library_name") != "transformers":
        problems.append("metadata: library_name is not 'transformers'")
    if "hfcompress" not in (metadata.get("tags") or []):
        problems.append("metadata: missing the 'hfcompress' tag")
    base = metadata.get("base_model")
    if base is not None and not _is_hub_id(base):
        problems.append(f"metadata: base_model {base!r} is not a Hub id")
    for section in ("## Method and settings", "## Evaluation", "## How to load"):
        if section not in card.text:
            problems.append(f"body: missing section {section!r}")
    return problems


# --------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------
def files_to_upload(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file a push uploads, sorted; hidden files and caches are skipped."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(_SKIPPED) for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def check_push_folder(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Refuse folders that would not load after the upload: no config, no weights, no tokenizer, bad card."""
    folder = check_model_dir(folder)
    files = files_to_upload(folder)
    names = {name for name, _ in files}
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        raise PushError(f"{folder} has no weight files (*.safetensors); save the model first")
    if not any(Path(name).name in _TOKENIZER_FILES for name in names):
        raise PushError(f"{folder} has no tokenizer files; save the tokenizer beside the model "
                        f"(tokenizer.save_pretrained(folder)) so users can load it")
    if "README.md" in names:
        problems = validate_model_card(folder / "README.md")
        if problems:
            raise PushError(f"{folder / 'README.md'}: {problems[0]}")
    return files


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, dry_run: bool = False, commit_message: str | None = None,
                token: str | None = None, printer=print) -> list[tuple[str, int]]:
    """Upload a model folder with ``create_repo`` + ``upload_folder``; ``dry_run`` only prints the plan.

    The token comes from ``token``, else ``HF_TOKEN``, else the standard ``hf auth login`` store.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"invalid repo id {repo_id!r}: {str(exc).splitlines()[0]}") from exc
    files = check_push_folder(folder)
    total = sum(size for _, size in files)
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    printer(f"{'would upload' if dry_run else 'uploading'} {len(files)} files ({total / 2**20:.2f} MiB) "
            f"from {folder} to {where}" + (" (private)" if private else "") + (" as a pull request" if create_pr else ""))
    for name, size in files:
        printer(f"  {name}  {size:,} bytes")
    if dry_run:
        return files
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, or use --dry-run")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, create_pr=create_pr,
                               commit_message=commit_message or f"Upload {Path(folder).name} with hfcompress",
                               ignore_patterns=[".*", "**/.*", "__pycache__/*"])
    printer(f"pushed: {getattr(commit, 'pr_url', None) or getattr(commit, 'commit_url', commit)}")
    return files
