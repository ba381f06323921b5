"""Text sources -> token blocks, and the offline corpora every machine has.

Three named sources need no download:

* ``"stdlib"`` — **code**: the Python standard library's own source (``*.py`` under ``sysconfig``'s
  ``stdlib`` path, test packages excluded): ~700 files / ~12 MB. Files are split into train/validation/test
  (90/5/5) **by file**, from a hash of the path relative to the stdlib root, so the split is the same on every
  machine with the same Python and no file leaks across splits.
* ``"pydoc"`` — **English prose**: ``pydoc_data/topics.py``, the text of the language reference that
  ``help()`` shows (~470 KB on Python 3.11, 79 topics). Topics are cut into pieces of about
  :data:`PYDOC_PIECE_CHARS` characters at paragraph boundaries and each piece is assigned to
  train/validation/test (80/10/10) from a hash of ``"<topic>#<index>"``: whole topics would leave a test split
  of 3-10 topics whose size swings with which ones land there (19-63 KB); pieces give ~45 KB each time. Two
  pieces of one topic may fall in different splits: they share no text, only a subject.
* ``"mix"`` — both, for calibrating models that read English: a split of ``pydoc`` plus as many characters of
  the same ``stdlib`` split (files in the order of their path hashes), so about half prose, half code.

Every other part of hfcompress (reference training, evaluation, calibration, distillation) gets its tokens
through :func:`load_blocks`, which accepts any text source:

* ``"stdlib"``, ``"pydoc"``, ``"mix"`` (optionally with a split: ``"pydoc:test"``) — the offline corpora;
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


def _bucket(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100


def split_of(relative_path: str, buckets: dict[str, range] = _SPLIT_BUCKETS) -> str:
    """The split a file belongs to: a pure function of its path relative to the corpus root."""
    bucket = _bucket(relative_path.replace(os.sep, "/"))
    for name, bucket_range in buckets.items():
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


# Percent of pydoc pieces per split (by hash bucket): 80 / 10 / 10 (a smaller corpus needs larger held-out shares).
_PYDOC_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
PYDOC_PIECE_CHARS = 4000  # target length of one pydoc piece (whole paragraphs, so pieces run a little over)


def pydoc_pieces(topics: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """``("<topic>#<index>", text)`` for every piece of every pydoc topic, topics in sorted order.

    A piece is whole paragraphs (split at blank lines) gathered until it reaches ``PYDOC_PIECE_CHARS``.
    """
    if topics is None:
        from pydoc_data.topics import topics
    pieces = []
    for topic in sorted(topics):
        groups, current = [], []
        for paragraph in topics[topic].split("\n\n"):
            current.append(paragraph)
            if sum(len(p) + 2 for p in current) >= PYDOC_PIECE_CHARS:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
        pieces += [(f"{topic}#{index}", "\n\n".join(group)) for index, group in enumerate(groups)]
    return [(name, text) for name, text in pieces if text.strip()]


def load_pydoc_corpus(topics: dict[str, str] | None = None) -> "datasets.DatasetDict":  # noqa: F821
    """The English corpus as a ``DatasetDict`` with ``train``/``validation``/``test`` splits.

    Each row has ``path`` (``"<topic>#<index>"``) and ``text``.
    """
    import datasets

    rows: dict[str, dict[str, list[str]]] = {name: {"path": [], "text": []} for name in SPLITS}
    for name, text in pydoc_pieces(topics):
        split = rows[split_of(name, _PYDOC_BUCKETS)]
        split["path"].append(name)
        split["text"].append(text)
    if not rows["train"]["text"]:
        raise DataError("pydoc_data.topics holds no text; is this Python's standard library complete?")
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in rows.items()})


def mix_texts(split: str) -> list[str]:
    """``split`` of pydoc, then the same split of stdlib in path-hash order, cut to as many characters.

    Half English, half Python by characters; the order is fixed, so the same on every run.
    """
    prose = list(load_pydoc_corpus()[split]["text"])
    code = load_stdlib_corpus()[split]
    budget, taken, chars = sum(len(t) for t in prose), [], 0
    for path, text in sorted(zip(code["path"], code["text"]), key=lambda row: hashlib.sha256(
            row[0].encode("utf-8")).digest()):
        if chars >= budget:
            break
        taken.append(text[:budget - chars])  # the last file is cut so the halves match
        chars += len(taken[-1])
    return prose + taken


NAMED_SOURCES = {"stdlib": lambda split: list(load_stdlib_corpus()[split]["text"]),
                 "pydoc": lambda split: list(load_pydoc_corpus()[split]["text"]),
                 "mix": mix_texts}
# What quantization calibrates on when no source is named: see :func:`default_calibration_source`.
AUTO_SOURCE = "auto"


def named_source(text: str) -> tuple[str, str | None] | None:
    """``("pydoc", "test")`` for ``"pydoc:test"``, ``("stdlib", None)`` for ``"stdlib"``; ``None`` otherwise."""
    name, _, split = text.partition(":")
    return (name, split or None) if name in NAMED_SOURCES else None


def default_calibration_source(trained_on_stdlib: bool) -> str:
    """The calibration source ``"auto"`` stands for.

    hfcompress's own reference teachers (and students distilled from them in the same recipe) learned
    Python source only, so they calibrate on ``"stdlib"``, their training distribution. Every other model is a
    real, pretrained LM that reads English at least as much as code: it calibrates on ``"mix"``, since
    activation statistics taken on code alone under-represent the prose tokens it will mostly see.
    """
    return "stdlib" if trained_on_stdlib else "mix"


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
    named = named_source(text)
    if named is not None:
        name, split = named[0], named[1] or split
        if split not in SPLITS:
            raise DataError(f"unknown {name} split {split!r}; choose one of {', '.join(SPLITS)}")
        return NAMED_SOURCES[name](split)
    if text == AUTO_SOURCE:
        raise DataError("the text source 'auto' is resolved by the quantize job from the model; here name one "
                        "of " + ", ".join(NAMED_SOURCES) + " or a path")

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
