"""The training benchmarks on a prepared blocks file (what run.py writes for a real model), on the tiny teacher:
``qat_bench.py --blocks`` and ``real_distill_bench.py`` (KD live / teacher cache / CE-only). No timing asserts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def blocks_file(tmp_path_factory, tiny_reference_dir):
    from safetensors.torch import save_file

    from hfcompress.core.data import load_blocks
    from hfcompress.models.loading import load_tokenizer

    blocks = load_blocks("stdlib", load_tokenizer(tiny_reference_dir), 48, split="train", num_blocks=16, seed=0)
    path = tmp_path_factory.mktemp("blocks") / "blocks.safetensors"
    save_file({"train": blocks[:8].contiguous(), "eval": blocks[8:11].contiguous(),
               "calibration": blocks[11:].contiguous()}, str(path))
    return path


def test_qat_bench_scores_the_files_eval_blocks(tmp_path, tiny_reference_dir, blocks_file):
    import qat_bench
    from safetensors.torch import load_file

    from hfcompress.models.evaluate import perplexity
    from hfcompress.models.loading import load_model

    out = tmp_path / "qat.json"
    assert qat_bench.main(["--model", str(tiny_reference_dir), "--blocks", str(blocks_file), "--bits", "4",
                           "--group-size", "32", "--methods", "rtn", "qad", "--steps", "2", "--batch-size", "2",
                           "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["block_size"] == 48 and result["token_budget"] == 2 * 2 * 48
    rows = {row["method"]: row for row in result["rows"]}
    expected = perplexity(load_model(tiny_reference_dir).eval(), load_file(str(blocks_file))["eval"])
    assert math.isclose(rows["fp32"]["perplexity"], expected, rel_tol=1e-6)
    rtn, qad = rows["rtn"]["perplexity"], rows["qad"]["perplexity"]
    assert math.isclose(rows["qad"]["gap_recovered"], (rtn - qad) / (rtn - expected), rel_tol=1e-9)
    assert [entry["step"] for entry in rows["qad"]["train_log"]] == [1, 2]


def test_qat_bench_refuses_too_few_train_blocks(tmp_path, tiny_reference_dir, blocks_file):
    import qat_bench

    with pytest.raises(SystemExit, match="8 train blocks; 20 are needed"):
        qat_bench.main(["--model", str(tiny_reference_dir), "--blocks", str(blocks_file), "--methods", "qad",
                        "--steps", "10", "--batch-size", "2", "--out", str(tmp_path / "x.json")])


def test_real_distill_bench_full_vocabulary_cache_matches_the_live_teacher(tmp_path, tiny_reference_dir,
                                                                           blocks_file):
    """With every token id cached in float32 the cache loss is the live loss, so the two KD runs (same blocks,
    same order, same seed) end at the same perplexity; the CE runs are scored against the best of them."""
    import real_distill_bench

    vocab = json.loads((tiny_reference_dir / "config.json").read_text())["vocab_size"]
    out = tmp_path / "distill.json"
    assert real_distill_bench.main([
        "--model", str(tiny_reference_dir), "--blocks", str(blocks_file), "--steps", "3", "--batch-size", "2",
        "--runs", "cache", "ce:1e-3", "live", "ce:1e-4", "--kd-lr", "1e-3", "--top-k", str(vocab),
        "--logprob-format", "float32", "--timing-reps", "1", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = {run["run"]: run for run in result["runs"]}
    assert set(runs) == {"cache-0.001", "ce-0.001", "live-0.001", "ce-0.0001"}
    assert math.isclose(runs["cache-0.001"]["perplexity"], runs["live-0.001"]["perplexity"], rel_tol=1e-3)
    best = min(runs["ce-0.001"]["perplexity"], runs["ce-0.0001"]["perplexity"])
    assert math.isclose(runs["live-0.001"]["ratio_vs_best_ce"], runs["live-0.001"]["perplexity"] / best)
    assert result["cache"]["mean_tail_mass"] == 0.0 and result["train_tokens"] == 3 * 2 * 48
    assert all(run["train_tokens"] == 3 * 2 * 48 and run["tokens_per_s"] > 0 for run in runs.values())
    assert torch.isfinite(torch.tensor([run["perplexity"] for run in runs.values()])).all()
    timing = result["interleaved_timing"]  # shape only: no timing assertions in tests
    assert {len(v) for v in timing["seconds"].values()} == {2} and timing["cache_speedup"] > 0


def test_real_distill_bench_distill_then_quantize(tmp_path, tiny_reference_dir, blocks_file):
    """A KD run with the hidden-state loss on a keep-last student, then its int4 RTN and GPTQ copies: each scored
    (perplexity, KL to the teacher and to the unquantized student), the student itself left unquantized."""
    import real_distill_bench

    out = tmp_path / "dq.json"
    assert real_distill_bench.main([
        "--model", str(tiny_reference_dir), "--blocks", str(blocks_file), "--steps", "2", "--batch-size", "2",
        "--runs", "live-h:1e-3", "--layers", "keep-last", "--quantize-kd", "--quant-group-size", "32",
        "--calibration-blocks", "4", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    teacher_layers = json.loads((tiny_reference_dir / "config.json").read_text())["num_hidden_layers"]
    (run,) = result["runs"]
    assert run["kind"] == "live-h" and run["student_layers"][-1] == teacher_layers - 1
    assert len(run["student_layers"]) == teacher_layers // 2
    assert all("hidden_loss" in entry for entry in run["train_log"])
    dq = result["distill_then_quantize"]
    assert dq["student"] == run["run"] and dq["student_perplexity"] == run["perplexity"]
    assert dq["calibration_tokens"] == 4 * 48 and dq["student_kl_to_teacher"] > 0
    assert [row["method"] for row in dq["rows"]] == ["rtn int4 g32", "gptq int4 g32"]
    for row in dq["rows"]:
        assert math.isfinite(row["perplexity"]) and row["kl_to_student"] > 0  # int4 changed the student
        assert row["kl_to_teacher"] > 0


def test_equal_byte_bench_counts_stored_bytes_and_pairs_budgets(tmp_path, tiny_reference_dir):
    import equal_byte_bench as bench

    from hfcompress.models.loading import load_model

    model = load_model(tiny_reference_dir)
    stored = bench.stored_bytes(tiny_reference_dir)
    layers = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith("model.layers."))
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    assert stored == {"decoder_bytes": layers, "shared_bytes": everything - layers}

    def row(label, role, bits, size, ppl):
        return {"label": label, "role": role, "bits": bits, "decoder_bytes": size, "perplexity": ppl}

    rows = [row("t fp32", "teacher", 32, 1000, 10.0), row("t int4", "teacher", 4, 150, 11.0),
            row("t int3", "teacher", 3, 120, 14.0), row("t int2", "teacher", 2, 90, 30.0),
            row("s fp32", "student", 32, 500, 12.0), row("s int8", "student", 8, 125, 12.5),
            row("s int4", "student", 4, 70, 13.0)]
    pairs = {b["student"]: b for b in bench.budgets(rows)}
    assert set(pairs) == {"s int8", "s int4"}  # quantized students only
    # 125 B (+5%): t int3 (120) and t int2 (90) fit, the better one is int3; t int4 (150) is the next larger.
    assert pairs["s int8"]["teacher_within"]["label"] == "t int3" and pairs["s int8"]["winner"] == "student"
    assert pairs["s int8"]["teacher_above"]["label"] == "t int4"
    assert pairs["s int4"]["teacher_within"] is None and pairs["s int4"]["winner"] == "only the student fits"
    rows[2]["perplexity"] = 12.0
    assert {b["student"]: b for b in bench.budgets(rows)}["s int8"]["winner"] == "teacher"


def test_self_distill_bench_rows_include_the_ema_teacher(tmp_path, tiny_reference_dir):
    """self_distill_bench.py runs every row (truncate, truncate+ce, self, self with an EMA teacher) and writes them;
    the trained rows are not the untrained truncation."""
    import self_distill_bench

    out = tmp_path / "self.json"
    assert self_distill_bench.main(["--model", str(tiny_reference_dir), "--layers", "1", "--steps", "3",
                                    "--batch-size", "2", "--block-size", "32", "--eval-blocks", "2",
                                    "--ema-decay", "0.5", "--out", str(out)]) == 0
    rows = {row["model"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full", "truncate", "truncate+ce", "self", "self (full model after)", "self (EMA teacher)"}
    assert all(math.isfinite(row["perplexity"]) for row in rows.values())
    assert rows["self (EMA teacher)"]["perplexity"] != rows["truncate"]["perplexity"]


def test_qat_bench_qad_from_gptq_starts_from_gptqs_weights(tmp_path, tiny_reference_dir, blocks_file):
    """``qad-gptq``: GPTQ's quantized weights, dequantized into plain linears, are what prepare_qat receives (no
    quantized module or quantization_config left); the bench row runs and is scored like the others."""
    import qat_bench
    from safetensors.torch import load_file

    from hfcompress import QuantizationConfig, prepare_qat, quantize
    from hfcompress.models.loading import load_model
    from hfcompress.quantization.modules import CompressedLinear

    calibration = load_file(str(blocks_file))["calibration"]
    model = quantize(load_model(tiny_reference_dir), QuantizationConfig(method="gptq", bits=4, group_size=32,
                                                                        seq_len=48, num_samples=5),
                     calibration_data=calibration, progress=False)
    expected = {name: module.dequantized_weight().clone() for name, module in model.named_modules()
                if isinstance(module, CompressedLinear)}
    assert expected
    restored = qat_bench._gptq_weights_as_float(model)
    assert restored.config.quantization_config is None
    assert not any(isinstance(m, CompressedLinear) for m in restored.modules())
    for name, weight in expected.items():
        assert torch.equal(restored.get_submodule(name).weight, weight), name
    prepare_qat(restored, QuantizationConfig(bits=4, group_size=32))  # accepted as a floating-point model

    out = tmp_path / "qat.json"
    assert qat_bench.main(["--model", str(tiny_reference_dir), "--blocks", str(blocks_file), "--bits", "4",
                           "--group-size", "32", "--methods", "rtn", "qad-gptq", "--steps", "2", "--batch-size", "2",
                           "--out", str(out)]) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert math.isfinite(rows["qad-gptq"]["perplexity"]) and rows["qad-gptq"]["gap_recovered"] is not None
    assert [entry["step"] for entry in rows["qad-gptq"]["train_log"]] == [1, 2]


def test_real_distill_bench_training_draws():
    """--train-seed 0 keeps the file's first blocks in order (the SmolLM2 rows); another seed draws other blocks,
    the same ones every time."""
    from real_distill_bench import training_blocks

    train = torch.arange(20).unsqueeze(1).repeat(1, 4)  # block i holds token i
    assert torch.equal(training_blocks(train, 6), train[:6])
    first, again, other = (training_blocks(train, 6, seed) for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, train[:6])
    assert first.shape == (6, 4) and len(set(first[:, 0].tolist())) == 6  # distinct blocks of the file
