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


# --------------------------------------------------------------------------------------------------------
# English prose (pydoc) and the mix
# --------------------------------------------------------------------------------------------------------
def test_pydoc_pieces_cover_every_topic_without_losing_text():
    from pydoc_data.topics import topics

    pieces = data.pydoc_pieces()
    names = [name for name, _ in pieces]
    assert len(names) == len(set(names))
    for topic in list(topics)[:20]:
        own = [text for name, text in pieces if name.rpartition("#")[0] == topic]
        assert "\n\n".join(own) == topics[topic] or not topics[topic].strip()
    # Whole paragraphs up to the target length: no piece is much over it unless a single paragraph is.
    assert max(len(t) for _, t in pieces) < 4 * data.PYDOC_PIECE_CHARS
    assert sum(len(t) for _, t in pieces) > 0.98 * sum(len(t) for t in topics.values())


def test_pydoc_splits_are_disjoint_deterministic_and_sized():
    corpus, again = data.load_pydoc_corpus(), data.load_pydoc_corpus()
    names = {split: corpus[split]["path"] for split in data.SPLITS}
    assert all(names[split] == again[split]["path"] for split in data.SPLITS)
    assert not set(names["train"]) & set(names["test"]) and not set(names["validation"]) & set(names["test"])
    chars = {split: sum(map(len, corpus[split]["text"])) for split in data.SPLITS}
    total = sum(chars.values())
    for split, share in (("validation", 0.10), ("test", 0.10)):  # 80/10/10 by hash, within sampling noise
        assert 0.04 < chars[split] / total < 0.2, (split, chars)
    assert all(data.split_of(name, data._PYDOC_BUCKETS) == "test" for name in names["test"])
    # It is prose: mostly letters and spaces, unlike source code.
    text = "".join(corpus["test"]["text"])
    assert sum(c.isalpha() or c == " " for c in text) / len(text) > 0.75


def test_named_sources_and_splits():
    assert data.load_texts("pydoc:test") == data.load_texts("pydoc", split="test")
    assert data.load_texts("pydoc:test") == list(data.load_pydoc_corpus()["test"]["text"])
    with pytest.raises(DataError, match="unknown pydoc split 'dev'"):
        data.load_texts("pydoc:dev")
    with pytest.raises(DataError, match="'auto' is resolved"):
        data.load_texts("auto")


def test_mix_is_half_prose_half_code():
    prose = data.load_texts("pydoc:validation")
    mixed = data.load_texts("mix:validation")
    assert mixed[: len(prose)] == prose
    code = mixed[len(prose):]
    assert sum(map(len, code)) == sum(map(len, prose))  # the last file is cut to match
    stdlib = set(data.load_texts("stdlib:validation"))
    assert all(text in stdlib for text in code[:-1]) and any(s.startswith(code[-1]) for s in stdlib)
    assert mixed == data.load_texts("mix", split="validation")


def test_calibration_default_follows_the_model(tiny_reference_dir, tmp_path):
    from hfcompress.jobs.pipeline import describe_data, resolve_calibration_source

    assert data.default_calibration_source(trained_on_stdlib=True) == "stdlib"
    assert data.default_calibration_source(trained_on_stdlib=False) == "mix"
    assert resolve_calibration_source("auto", str(tiny_reference_dir)) == "stdlib"
    assert resolve_calibration_source("auto", "reference:base") == "stdlib"
    assert resolve_calibration_source("auto", str(tmp_path), None) == "mix"
    assert resolve_calibration_source("pydoc:train", "reference:base") == "pydoc:train"
    assert "English prose" in describe_data("pydoc") and "Half English" in describe_data("mix:validation")


def test_pydoc_blocks_for_evaluation(tiny_tokenizer):
    blocks = data.load_blocks("pydoc", tiny_tokenizer, 64, split="test", num_blocks=8, seed=0)
    assert blocks.shape == (8, 64)
