"""The README's main job, end to end, at its smallest settings on the tiny reference teacher."""

import json
from pathlib import Path

from hfcompress.cli import main
from hfcompress.jobs.hub import validate_model_card

QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"


def test_quickstart_runs_end_to_end(tmp_path, tiny_reference_dir):
    smallest = [f"model={tiny_reference_dir}", "distill.student_num_layers=1", "distill.max_steps=4",
                "distill.block_size=64", "distill.num_train_blocks=64", "distill.per_device_train_batch_size=4",
                "quantize.num_samples=4", "quantize.seq_len=64", "evaluate.block_size=64",
                "evaluate.num_blocks=4", "evaluate.new_tokens=4"]
    argv = ["run", str(QUICKSTART), "--output", str(tmp_path / "run"), "-q"]
    for item in smallest:
        argv += ["--set", item]
    assert main(argv) == 0

    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert labels == ["tiny-v1", "distill", "quantize"]
    teacher, student, quantized = report["models"]
    assert student["num_parameters"] < teacher["num_parameters"]
    assert quantized["checkpoint_bytes"] < student["checkpoint_bytes"]
    assert all(m["perplexity"] > 1 and m["decode_tokens_per_s"] > 0 for m in report["models"])
    assert (run / "report.png").stat().st_size > 10_000
    for stage in ("00-distill", "01-quantize"):
        assert validate_model_card(run / stage / "README.md") == []
        assert (run / stage / "tokenizer.json").is_file()
    assert not list((run / "00-distill").glob("checkpoint-*"))
    quant_config = json.loads((run / "01-quantize" / "config.json").read_text())["quantization_config"]
    assert quant_config["quant_method"] == "compressed-tensors"
