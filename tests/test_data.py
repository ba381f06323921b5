import json

import pytest
import torch

from hfcompress.core import data
from hfcompress.core.errors import DataError


def test_split_is_a_pure_function_of_the_path():
    files = data.stdlib_files()
    assert len(files) > 300
    first = [data.split_of(f) for f in files]
    assert first == [data.split_of(f) for f in files]
    counts = {name: first.count(name) for name in data.SPLITS}
    assert all(counts[name] > 0 for name in data.SPLITS)
    assert counts["train"] > 10 * counts["validation"]
    assert not any("/test/" in f or f.startswith("test/") or "/tests/" in f for f in files)


def test_corpus_splits_are_disjoint_and_deterministic():
    corpus = data.load_stdlib_corpus()
    again = data.load_stdlib_corpus()
    paths = {name: set(corpus[name]["path"]) for name in data.SPLITS}
    assert paths["train"].isdisjoint(paths["validation"])
    assert paths["train"].isdisjoint(paths["test"])
    assert paths["validation"].isdisjoint(paths["test"])
    for name in data.SPLITS:
        assert corpus[name]["path"] == again[name]["path"]
        assert all(data.split_of(p) == name for p in corpus[name]["path"])


def test_pack_blocks_loses_and_duplicates_no_token(tiny_tokenizer):
    texts = ["def f(x):\n    return x + 1\n"] * 7 + ["class A:\n    pass\n"] * 5
    stream = data.token_stream(texts, tiny_tokenizer)
    blocks = data.pack_blocks(texts, tiny_tokenizer, block_size=16)
    n = blocks.shape[0]
    assert n == stream.numel() // 16
    assert torch.equal(blocks.flatten(), stream[: n * 16])
    # EOS separates documents.
    assert (stream == tiny_tokenizer.eos_token_id).sum() == len(texts)


def test_seeded_block_sampling(tiny_tokenizer, calibration_texts):
    full = data.pack_blocks(calibration_texts, tiny_tokenizer, 32)
    a = data.pack_blocks(calibration_texts, tiny_tokenizer, 32, num_blocks=10, seed=3)
    b = data.pack_blocks(calibration_texts, tiny_tokenizer, 32, num_blocks=10, seed=3)
    c = data.pack_blocks(calibration_texts, tiny_tokenizer, 32, num_blocks=10, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = {tuple(r.tolist()) for r in full}
    assert all(tuple(r.tolist()) in rows for r in a)
    assert len({tuple(r.tolist()) for r in a}) == 10 or len(rows) < full.shape[0]


def test_bad_text_sources_raise_one_line_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="empty"):
        data.pack_blocks([], tiny_tokenizer, 16)
    with pytest.raises(DataError, match="empty"):
        data.pack_blocks(["", ""], tiny_tokenizer, 16)
    with pytest.raises(DataError, match="fewer than one block"):
        data.pack_blocks(["x = 1"], tiny_tokenizer, 1000)
    with pytest.raises(DataError, match="does not exist"):
        data.load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        data.load_texts(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="only strings"):
        data.load_texts(["ok", 3])
    with pytest.raises(DataError, match="more than|holds only"):
        data.pack_blocks(["a b c d " * 50], tiny_tokenizer, 16, num_blocks=10_000)


def test_local_sources(tmp_path, tiny_tokenizer):
    import datasets

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha beta")
    (tmp_path / "docs" / "b.py").write_text("print('gamma')")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00\x01")
    assert data.load_texts(str(tmp_path / "docs")) == ["alpha beta", "print('gamma')"]

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": f"row {i}"}) for i in range(3)))
    assert data.load_texts(str(jsonl), text_column="content") == ["row 0", "row 1", "row 2"]
    with pytest.raises(DataError, match="no column 'text'"):
        data.load_texts(str(jsonl))

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["one", "two"]}),
                          "test": datasets.Dataset.from_dict({"text": ["three"]})}).save_to_disk(str(saved))
    assert data.load_texts(str(saved), split="test") == ["three"]
    with pytest.raises(DataError, match="no split 'validation'"):
        data.load_texts(str(saved), split="validation")


def test_block_size_must_fit_the_context(tiny_llama):
    data.check_block_size(128, tiny_llama.config)
    with pytest.raises(DataError, match="larger than the model's context"):
        data.check_block_size(129, tiny_llama.config)


def test_block_dataset_items():
    ds = data.BlockDataset(torch.arange(12).view(3, 4))
    item = ds[1]
    assert len(ds) == 3
    assert item["input_ids"].tolist() == [4, 5, 6, 7] and torch.equal(item["labels"], item["input_ids"])
