"""Text sources -> token blocks, and the offline corpus every machine has.

The offline corpus is the Python standard library's own source (``*.py`` under ``sysconfig``'s ``stdlib``
path, test packages excluded): ~700 files / ~12 MB of real, varied text that needs no download. Files are
split into train/validation/test **by file**, from a hash of the path relative to the stdlib root, so the
split is the same on every machine with the same Python and no file leaks across splits.

Every other part of hfcompress (reference training, evaluation, calibration, distillation) gets its tokens
through :func:`load_blocks`, which accepts any text source:

* ``"stdlib"`` (optionally ``"stdlib:validation"``) — the offline corpus;
* a local file (``.txt``/``.py``/``.md`` read as text; ``.json``/``.jsonl``/``.csv``/``.parquet`` through
  ``datasets``) or a folder of text files;
* a folder written by ``Dataset.save_to_disk``;
* a ``datasets`` Hub name (``datasets.load_dataset(name, split=...)``; needs network or a local cache);
* a list of strings, or a ``datasets.Dataset``/``DatasetDict``.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch

from .errors import DataError

SPLITS = ("train", "validation", "test")
# Percent of files per split (by hash bucket): 90 / 5 / 5.
_SPLIT_BUCKETS = {"train": range(0, 90), "validation": range(90, 95), "test": range(95, 100)}
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
_DATASETS_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

TextSource = Union[str, os.PathLike, Sequence[str], "datasets.Dataset", "datasets.DatasetDict"]  # noqa: F821


# --------------------------------------------------------------------------------------------------------
# The offline corpus
# --------------------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """The split a file belongs to: a pure function of its path relative to the corpus root."""
    normalized = relative_path.replace(os.sep, "/")
    bucket = int.from_bytes(hashlib.sha256(normalized.encode("utf-8")).digest()[:8], "big") % 100
    for name, bucket_range in _SPLIT_BUCKETS.items():
        if bucket in bucket_range:
            return name
    raise AssertionError(bucket)  # unreachable: the ranges cover 0..99


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths (sorted, '/'-separated) of the standard library's non-test ``.py`` files."""
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS and not d.startswith("."))
        for name in files:
            if name.endswith(".py"):
                found.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(found)


def load_stdlib_corpus(root: Path | None = None) -> "datasets.DatasetDict":  # noqa: F821
    """The offline corpus as a ``DatasetDict`` with ``train``/``validation``/``test`` splits.

    Each row has ``path`` (relative to the stdlib root) and ``text``.
    """
    import datasets

    root = Path(root) if root is not None else stdlib_root()
    rows: dict[str, dict[str, list[str]]] = {name: {"path": [], "text": []} for name in SPLITS}
    for relative in stdlib_files(root):
        text = (root / relative).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        split = rows[split_of(relative)]
        split["path"].append(relative)
        split["text"].append(text)
    if not rows["train"]["text"]:
        raise DataError(f"no Python source files found under {root}; is the standard library installed?")
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in rows.items()})


# --------------------------------------------------------------------------------------------------------
# Any text source -> list of documents
# --------------------------------------------------------------------------------------------------------
def _texts_from_dataset(dataset, text_column: str, where: str) -> list[str]:
    if text_column not in dataset.column_names:
        raise DataError(
            f"{where} has no column {text_column!r} (columns: {', '.join(dataset.column_names)}); "
            f"pass text_column=... to name the text column"
        )
    return [t for t in list(dataset[text_column]) if isinstance(t, str)]


def _pick_split(dataset_dict, split: str, where: str):
    if split in dataset_dict:
        return dataset_dict[split]
    raise DataError(f"{where} has no split {split!r} (splits: {', '.join(dataset_dict.keys())})")


def load_texts(source: TextSource, split: str = "train", text_column: str = "text") -> list[str]:
    """Read a text source (see the module docstring) into a list of documents; an empty source is an error."""
    texts = _load_texts(source, split, text_column)
    if not any(t.strip() for t in texts):
        where = f"the text source {source}" if isinstance(source, (str, os.PathLike)) \
            else f"the {type(source).__name__} of texts given"
        raise DataError(f"{where} is empty: it holds no non-empty documents")
    return texts


def _load_texts(source: TextSource, split: str, text_column: str) -> list[str]:
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return _texts_from_dataset(_pick_split(source, split, "the DatasetDict"), text_column, "the dataset")
    if isinstance(source, datasets.Dataset):
        return _texts_from_dataset(source, text_column, "the dataset")
    if not isinstance(source, (str, os.PathLike)) and hasattr(source, "__iter__"):
        source = list(source)  # a list, tuple or datasets Column of strings
    if isinstance(source, list):
        if not all(isinstance(t, str) for t in source):
            raise DataError("a list text source must contain only strings")
        return list(source)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"unsupported text source of type {type(source).__name__}: pass a path, a dataset "
                        f"name, 'stdlib', a list of strings or a datasets.Dataset")

    text = os.fspath(source)
    if text == "stdlib" or text.startswith("stdlib:"):
        split = text.partition(":")[2] or split
        if split not in SPLITS:
            raise DataError(f"unknown stdlib split {split!r}; choose one of {', '.join(SPLITS)}")
        return list(load_stdlib_corpus()[split]["text"])

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix in _DATASETS_SUFFIXES:
            ds = datasets.load_dataset(_DATASETS_SUFFIXES[path.suffix], data_files=str(path), split="train")
            return _texts_from_dataset(ds, text_column, str(path))
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _pick_split(loaded, split, str(path))
            return _texts_from_dataset(loaded, text_column, str(path))
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no text files ({', '.join(sorted(_TEXT_SUFFIXES))})")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if text.startswith((".", "/", "~")) or os.sep in text and not _looks_like_hub_id(text):
        raise DataError(f"text source {text!r} does not exist")
    # A datasets Hub name such as "wikitext" or "org/name" (optionally "name:config").
    name, _, config = text.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # datasets raises many types; the user needs one line
        raise DataError(f"could not load dataset {text!r} (split {split!r}): {exc}") from exc
    return _texts_from_dataset(ds, text_column, f"dataset {text!r}")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


# --------------------------------------------------------------------------------------------------------
# Documents -> fixed-length token blocks
# --------------------------------------------------------------------------------------------------------
def utf8_bytes(texts: Iterable[str]) -> int:
    """Bytes of the documents as UTF-8, plus one per document for the EOS separator of :func:`token_stream`."""
    return sum(len(t.encode("utf-8")) + 1 for t in texts if t)


def token_stream(texts: Iterable[str], tokenizer, add_eos: bool = True) -> torch.Tensor:
    """Tokenize documents and concatenate them (separated by EOS when the tokenizer has one) -> (N,)."""
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("the text source is empty: no non-empty documents to tokenize")
    # verbose=False: documents longer than the model's context are expected here (they are cut into blocks).
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id if add_eos else None
    pieces = []
    for ids in encoded:
        pieces.extend(ids)
        if eos is not None:
            pieces.append(eos)
    return torch.tensor(pieces, dtype=torch.long)


def pack_blocks(
    texts: Iterable[str],
    tokenizer,
    block_size: int,
    num_blocks: int | None = None,
    seed: int = 0,
    add_eos: bool = True,
) -> torch.Tensor:
    """Pack documents into non-overlapping blocks of ``block_size`` tokens -> (num_blocks, block_size).

    The token stream is cut into consecutive blocks; the incomplete tail (< block_size tokens) is dropped.
    Every kept token appears in exactly one block. With ``num_blocks``, that many distinct blocks are drawn
    without replacement using ``seed`` (the same seed gives the same blocks in the same order).
    """
    return pack_stream(token_stream(texts, tokenizer, add_eos=add_eos), block_size, num_blocks=num_blocks,
                       seed=seed)


def pack_stream(stream: torch.Tensor, block_size: int, num_blocks: int | None = None, seed: int = 0) -> torch.Tensor:
    """Cut a token stream (N,) into blocks; see :func:`pack_blocks`."""
    if block_size < 2:
        raise DataError(f"block_size must be at least 2 tokens, got {block_size}")
    total = stream.numel() // block_size
    if total == 0:
        raise DataError(
            f"the text source has only {stream.numel()} tokens, fewer than one block of {block_size}; "
            f"use more text or a smaller block size"
        )
    blocks = stream[: total * block_size].view(total, block_size)  # (total, block_size)
    if num_blocks is None:
        return blocks
    if num_blocks < 1:
        raise DataError(f"num_blocks must be positive, got {num_blocks}")
    if num_blocks > total:
        raise DataError(
            f"asked for {num_blocks} blocks of {block_size} tokens but the text source holds only {total}; "
            f"lower num_blocks/block_size or use more text"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator)[:num_blocks]
    return blocks[order]


def check_block_size(block_size: int, model_config) -> None:
    """Refuse blocks longer than the model's context window (a one-line error, not an index error)."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit is not None and block_size > limit:
        raise DataError(
            f"block size {block_size} is larger than the model's context of {limit} tokens "
            f"(max_position_embeddings); use a block size <= {limit}"
        )


def load_blocks(
    source: TextSource,
    tokenizer,
    block_size: int,
    split: str = "train",
    num_blocks: int | None = None,
    seed: int = 0,
    text_column: str = "text",
) -> torch.Tensor:
    """Any text source -> (num_blocks, block_size) token ids. See :func:`load_texts` and :func:`pack_blocks`."""
    return pack_blocks(load_texts(source, split=split, text_column=text_column), tokenizer, block_size,
                       num_blocks=num_blocks, seed=seed)


class BlockDataset(torch.utils.data.Dataset):
    """Token blocks as a map-style dataset of ``{"input_ids", "labels"}`` for ``transformers.Trainer``."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
