"""The benchmark driver produces well-formed output (no timing assertions; CI has no peer venv).

* ``run.py --smoke --no-peers`` on the tiny reference: a real end-to-end run of the driver, our side only, a
  few subprocesses — checks results.json and the RESULTS-style markdown it writes.
* The report writer on a synthetic results dict that has every section, a failed peer and a missing value:
  every table is well-formed and every failure is listed with its exact error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_reference_dir):
    """One `run.py --smoke --no-peers` over the quant and distill sections, with the test's tiny teacher."""
    work = tmp_path_factory.mktemp("bench")
    results_md = work / "RESULTS.md"
    # reference_model("tiny") resolves under $HFCOMPRESS_HOME: point it at the fixture's trained copy.
    home = tiny_reference_dir.parents[1]
    env = dict(os.environ, HFCOMPRESS_HOME=str(home), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--no-peers", "--only", "quant",
                           "distill", "--work", str(work), "--results", str(results_md)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return work, results_md


def test_smoke_writes_results_json(smoke_run):
    work, _ = smoke_run
    results = json.loads((work / "smoke" / "results.json").read_text())
    assert results["profile"]["name"] == "smoke"
    assert results["peers_enabled"] is False
    assert results["machine"]["nproc"] >= 1
    quant = {r["name"]: r for r in results["quant"]}
    assert {"fp32", "cast-bf16", "rtn-int8-channel", "rtn-int4-g32", "gptq-int4-g32"} <= set(quant)
    for r in results["quant"] + results["distill"]:
        assert r["status"] == "ok", (r["name"], r.get("error"))
        assert r["command"] and r["process_seconds"] >= 0
    fp32 = quant["fp32"]
    # Quantized weights are smaller than fp32 weights, and quantization changes perplexity only a little.
    for name in ("rtn-int8-channel", "rtn-int4-g32", "gptq-int4-g32"):
        assert quant[name]["weight_bytes"] < fp32["weight_bytes"]
        assert quant[name]["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.2)
        assert quant[name]["float_linear_layers"] == 0  # every targeted layer really got quantized
    distill = {r["name"]: r for r in results["distill"]}
    assert distill["ours-forward-kl"]["tokens_per_s"] > 0
    assert distill["ours-forward-kl"]["train_tokens"] == 3 * 2 * 64


def test_smoke_markdown_is_well_formed(smoke_run):
    _, results_md = smoke_run
    text = results_md.read_text()
    assert report.check_markdown(text) == []
    assert "python scripts/bench/run.py --smoke --no-peers" in text  # the exact command
    assert " vCPUs, " in text and "## Versions" in text
    for heading in ("## Quantization: quality and cost", "## Distillation", "## Peers and runs that could not run"):
        assert heading in text
    assert "peers were not run" in text
    for png in ("quant_quality.png", "distill_speed.png"):
        assert (results_md.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _synthetic_results() -> dict:
    speed = {"prompt_tokens": 8, "new_tokens": 4,
             "prefill_tokens_per_s": {"median": 100.0, "min": 90.0, "max": 110.0, "n": 3, "spread_pct": 20.0},
             "decode_tokens_per_s": {"median": 10.0, "min": 9.0, "max": 11.0, "n": 3, "spread_pct": 20.0}}
    quant = [
        {"name": "fp32", "table": "ours", "label": "fp32", "status": "ok", "perplexity": 10.0, "weight_bytes": 4000,
         "side": "ours"},
        {"name": "rtn-int4-g128", "table": "ours", "label": "RTN int4 g128", "status": "ok", "perplexity": 11.0,
         "weight_bytes": 700, "fallback_layers": {"model.layers.0.mlp.down_proj": 16}, "side": "ours"},
        {"name": "gptq-int4-g128", "table": "ours", "label": "GPTQ int4 g128", "status": "ok", "perplexity": 10.4,
         "weight_bytes": 700, "side": "ours"},
        {"name": "llmc-gptq-w4-g128", "table": "matched", "tool": "llm-compressor", "label": "GPTQ W4A16 g128",
         "status": "ok", "perplexity": 10.5, "quantize_seconds": 10.0, "side": "peer", "ignore_down_proj": True},
        {"name": "ours-gptq-w4-g128", "table": "matched", "tool": "hfcompress", "label": "GPTQ W4A16 g128",
         "status": "ok", "perplexity": 10.4, "quantize_seconds": 2.0, "side": "ours"},
        {"name": "llmc-default", "table": "llmc_default", "label": "GPTQ W4A16 g128, all layers", "status": "error",
         "error": "ValueError: columns not divisible | by group size", "side": "peer", "log": "x.log"},
        {"name": "peer-torchao_int4", "table": "peers", "label": "torchao_int4", "status": "ok", "bits": 4,
         "perplexity": 10.0, "weight_bytes": 4000, "warning": "7 linear layer(s) left unquantized", "side": "peer"},
    ]
    return {
        "profile": {"name": "quick", "teacher": "small", "block_size": 256, "calibration_blocks": 16,
                    "eval_blocks": 16, "bits": [4], "group_size": 128, "prompt_tokens": 8, "new_tokens": 4,
                    "repeats": 3, "distill_steps": 4, "distill_batch": 2,
                    "speed_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}},
        "command": "python scripts/bench/run.py --quick", "date": "2026-01-01T00:00:00", "total_seconds": 60,
        "machine": {"cpu_model": "cpu", "nproc": 2, "memory_gib": 24, "platform": "linux", "python": "3.11",
                    "torch_threads": 2, "loadavg_at_start": [1.0, 1.0, 1.0]},
        "peers_enabled": True,
        "peer_install": {"hqq": {"import_ok": False, "install_error": "ERROR: No matching distribution found for hqq"}},
        "versions_ours": {"torch": "2.13.0"}, "versions_peers": {"torch": "2.13.0", "llmcompressor": "0.14"},
        "quant": quant,
        "runtime": [
            {"name": "fp32", "table": "speed", "label": "fp32", "status": "ok", "weight_bytes": 4000, "speed": speed,
             "side": "ours"},
            {"name": "packed-int4", "table": "speed", "label": "int4", "status": "ok", "weight_bytes": 600,
             "speed": {**speed, "decode_tokens_per_s": {**speed["decode_tokens_per_s"], "median": 30.0}},
             "side": "ours"},
            {"name": "peer-bnb_nf4", "table": "speed", "label": "bnb_nf4", "status": "error",
             "error": "RuntimeError: boom", "side": "peer", "log": "y.log"},
        ],
        "bandwidth": {"read_gb_per_s": {"median": 0.01}, "buffer_mib": 512, "threads": 2},
        "distill": [
            {"name": "ours-forward-kl", "label": "ours", "status": "ok", "tokens_per_s": 300.0, "perplexity": 20.0,
             "side": "ours", "per_step_tokens_per_s": {"spread_pct": 10.0}},
            {"name": "ours-ce-only", "label": "ce", "status": "ok", "tokens_per_s": 500.0, "perplexity": 22.0,
             "side": "ours"},
            {"name": "trl-gkd", "label": "trl", "status": "ok", "tokens_per_s": 100.0, "perplexity": 20.0,
             "side": "peer"},
        ],
        "pipeline": [{"name": "distill-then-quantize", "status": "ok", "steps": 4, "batch_size": 2,
                      "budget_bytes": 500, "distill": {"tokens_per_s": 100.0}, "rows": [
                          {"label": "teacher fp32", "role": "teacher", "status": "ok", "perplexity": 10.0,
                           "checkpoint_bytes": 4000},
                          {"label": "student int4 GPTQ g128", "role": "student", "status": "ok", "perplexity": 12.0,
                           "checkpoint_bytes": 500, "fits_budget": True, "decode_tokens_per_s": speed[
                               "decode_tokens_per_s"]},
                          {"label": "teacher int2 GPTQ g128", "role": "teacher", "status": "ok", "perplexity": 30.0,
                           "checkpoint_bytes": 510, "fits_budget": True},
                      ]}],
        "embed": [{"name": "ours-int8", "label": "hfcompress RTN int8", "status": "ok", "mean_cosine": 0.9999,
                   "min_cosine": 0.999, "mean_cosine_loss_pct": 0.01, "weight_bytes": 100, "fp32_weight_bytes": 400,
                   "num_sentences": 8, "side": "ours"}],
        "helper_markdown": {"distill_bench.py": "### their table\n\n| a | b |\n|---|---|\n| 1 | 2 |"},
    }


def test_report_covers_every_section_and_failure(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    report.write(_synthetic_results(), results_md)
    text = results_md.read_text()
    assert report.check_markdown(text) == []
    for heading in ("## Headline ratios", "## Quantization", "## Runtime", "## Distillation",
                    "## Distill, then quantize", "## Real pretrained weights", "## Peers and runs that could not run",
                    "distill_bench.py"):
        assert heading in text, heading
    # Ratios are computed from the numbers, not typed in.
    assert "perplexity 0.9905×, wall time 0.20× theirs" in text  # 10.4/10.5 and 2/10
    assert "3.00×" in text  # int4 decode 30 vs fp32 10
    assert "3.00× TRL" in text  # 300 vs 100 tokens/s
    # Every failure is listed with its exact error; a pipe inside an error does not break the table.
    assert "ERROR: No matching distribution found for hqq" in text
    assert "RuntimeError: boom" in text
    assert "columns not divisible" in text
    assert "7 linear layer(s) left unquantized" in text


def test_check_markdown_catches_ragged_tables():
    bad = "| a | b |\n|---|---|\n| 1 | 2 | 3 |\n"
    assert report.check_markdown(bad)
    assert report.check_markdown("| a |\n| 1 |\n")  # no separator
    assert report.check_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n") == []
