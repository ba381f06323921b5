"""End-to-end recipe runs on the tiny reference teacher (seconds, not minutes)."""

import json
import os

import pytest

from hfcompress.cli import main
from hfcompress.core.errors import ConfigError
from hfcompress.runs.recipe import parse_recipe
from hfcompress.runs.runner import STAGE_MARKER, run_recipe

EVAL = {"evaluate": {"models": ["model", "quantize"], "block_size": 64, "num_blocks": 4, "new_tokens": 4}}


def _recipe(model, **quantize):
    return parse_recipe({"name": "int8", "model": str(model), "stages": [
        {"quantize": {"method": "rtn", "bits": 8, "group_size": None, **quantize}}, EVAL]})


def test_run_writes_stages_report_and_card_and_resumes(tmp_path, tiny_reference_dir):
    run_dir = run_recipe(_recipe(tiny_reference_dir), output=tmp_path / "run", progress=False)
    assert (run_dir / "00-quantize" / "config.json").is_file()
    assert (run_dir / "00-quantize" / "README.md").is_file()
    for name in ("report.md", "report.json", "report.png", "recipe.yaml", "run.json"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    ppl = [m["perplexity"] for m in report["models"]]
    assert len(ppl) == 2 and abs(ppl[1] / ppl[0] - 1) < 0.05  # int8 per-channel is nearly lossless
    # Linear weights shrink 4x; the fp32 embeddings and the ignored lm_head (2 x 512 x 64) stay as they are.
    fp32, int8 = report["models"][0]["checkpoint_bytes"], report["models"][1]["checkpoint_bytes"]
    embeddings = 2 * 512 * 64 * 4
    linear_int8 = (fp32 - embeddings) / 4
    # plus one fp32 scale per output row (in_features 64..192 -> at most 1/16 extra) and the fp32 norms
    assert embeddings + linear_int8 < int8 < embeddings + linear_int8 * 1.15
    assert "| model | perplexity |" in (run_dir / "report.md").read_text()
    card = (run_dir / "00-quantize" / "README.md").read_text()
    assert "## Evaluation" in card and "| quantize |" in card and "```yaml" in card

    stamp = os.stat(run_dir / "00-quantize" / STAGE_MARKER).st_mtime_ns
    run_recipe(_recipe(tiny_reference_dir), output=run_dir, progress=False)
    assert os.stat(run_dir / "00-quantize" / STAGE_MARKER).st_mtime_ns == stamp  # skipped, not redone


def test_output_folder_of_another_recipe_is_refused(tmp_path, tiny_reference_dir):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not an hfcompress run"):
        run_recipe(_recipe(tiny_reference_dir), output=stranger, progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"

    quick = parse_recipe({"name": "only-eval", "model": str(tiny_reference_dir), "stages": [
        {"evaluate": {"models": ["model"], "block_size": 32, "num_blocks": 2, "speed": False}}]})
    run_dir = run_recipe(quick, output=tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="different recipe"):
        run_recipe(_recipe(tiny_reference_dir), output=run_dir, progress=False)


def test_failed_stage_leaves_earlier_outputs_and_no_partial_folder(tmp_path, tiny_reference_dir):
    recipe = parse_recipe({"name": "fails", "model": str(tiny_reference_dir), "stages": [
        {"quantize": {"method": "rtn", "bits": 8, "group_size": None}},
        {"evaluate": {"models": ["model"], "data": str(tmp_path / "missing.txt"), "speed": False}}]})
    with pytest.raises(Exception, match="missing.txt"):
        run_recipe(recipe, output=tmp_path / "run", progress=False)
    run_dir = tmp_path / "run"
    assert (run_dir / "00-quantize" / STAGE_MARKER).is_file()
    assert not any(p.name.endswith(".partial") or ".tmp-" in p.name for p in run_dir.iterdir())
    assert not (run_dir / "01-evaluate").exists()


def test_cli_run_with_overrides_and_one_line_errors(tmp_path, tiny_reference_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# Run: hfcompress run r.yaml\nname: r\nstages:\n  - quantize:\n      method: cast\n"
                      "  - evaluate:\n      block_size: 32\n      num_blocks: 2\n      speed: false\n")
    code = main(["run", str(recipe), "--set", f"model={tiny_reference_dir}", "--output", str(tmp_path / "o"), "-q"])
    assert code == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["models"][1]["perplexity"] > 1
    capsys.readouterr()
    assert main(["run", str(recipe), "--set", "quantize.dtpye=float16", "--set", f"model={tiny_reference_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("did you mean 'dtype'?") and len(err.splitlines()) == 1


def test_distill_qad_deploy_recipe_on_the_tiny_teacher(tmp_path, tiny_reference_dir):
    """The shipped recipe, shrunk to a few steps: distil -> RTN and QAD int4 exports -> packed evaluation with
    KL to the teacher; the QAD stage's student really trained (its KD loss fell) and loads as compressed."""
    from pathlib import Path

    from hfcompress.models.loading import quantization_method
    from hfcompress.runs.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "distill-qad-deploy.yaml", overrides=[
        f"model={tiny_reference_dir}", "distill.max_steps=2", "distill.block_size=64",
        "distill.per_device_train_batch_size=2", "distill.num_train_blocks=8", "distill.hidden_weight=0",
        "student-int4-rtn.group_size=32",
        "student-int4-rtn.bits=3", "student-int4-qad.bits=3",
        "student-int4-qad.group_size=32", "student-int4-qad.max_steps=12", "student-int4-qad.block_size=64",
        "student-int4-qad.num_train_blocks=16", "student-int4-qad.per_device_train_batch_size=4",
        "student-int4-qad.learning_rate=0.0001", "student-int4-qad.warmup_steps=0", "student-int4-qad.logging_steps=1",
        "evaluate.num_blocks=8", "evaluate.block_size=64", "evaluate.new_tokens=4", "evaluate.kl_to=distill"])
    run_dir = run_recipe(recipe, output=tmp_path / "run", progress=False)
    qad_dir = run_dir / "02-student-int4-qad"
    assert quantization_method(qad_dir) == "compressed-tensors"
    report = json.loads((run_dir / "report.json").read_text())
    rows = {m["label"]: m for m in report["models"]}
    assert set(rows) >= {"distill", "student-int4-rtn", "student-int4-qad"}
    print({name: row["kl_to_reference"] for name, row in rows.items()})
    assert rows["distill"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # KL to itself
    # QAD taught the 3-bit student its full-precision self: closer to it than round-to-nearest of the same weights.
    assert 0 < rows["student-int4-qad"]["kl_to_reference"] < rows["student-int4-rtn"]["kl_to_reference"]
    assert rows["student-int4-qad"]["checkpoint_bytes"] < rows["distill"]["checkpoint_bytes"]
    assert "KL to ref" in (run_dir / "report.md").read_text()
    qad = {s["stage"]: s for s in report["stages"]}["student-int4-qad"]
    assert qad["steps"] == 12 and qad["teacher"] == "itself"
