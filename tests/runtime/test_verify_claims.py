"""``hfcompress verify`` checks the claim: a folder whose card or config says it is quantized while its
tensors are not (the bnb bug's output), or whose tensors are quantized while config.json does not say so,
or whose coverage line does not match what is stored, fails with the mismatch named."""

from __future__ import annotations

import json
import shutil

import pytest

from hfcompress.cli import main
from hfcompress.jobs.pipeline import quantize_to_folder
from hfcompress.quantization.config import QuantizationConfig
from hfcompress.quantization.verify import verify_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_reference_dir):
    """Checkpoints written by the pipeline (card + config + tensors agree)."""
    root = tmp_path_factory.mktemp("claims")
    out = {"rtn": quantize_to_folder(str(tiny_reference_dir), root / "rtn", QuantizationConfig(
        method="rtn", bits=4, group_size=32), progress=False)}
    pytest.importorskip("bitsandbytes")
    out["bnb_nf4"] = quantize_to_folder(str(tiny_reference_dir), root / "nf4", QuantizationConfig(method="bnb_nf4"),
                                        progress=False)
    out["cast"] = quantize_to_folder(str(tiny_reference_dir), root / "cast", QuantizationConfig(method="cast"),
                                     progress=False)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["rtn", "bnb_nf4", "cast"])
def test_truthful_checkpoints_pass(good, kind):
    report = verify_checkpoint(good[kind])
    assert report.ok, report.summary()


def test_card_says_quantized_but_tensors_are_float(tmp_path, good, tiny_reference_dir, capsys):
    """The bnb bug's output: the source weights with a card saying 'bnb_nf4, 4-bit'."""
    folder = _copy(tiny_reference_dir, tmp_path / "bug")
    shutil.copy(good["bnb_nf4"] / "README.md", folder / "README.md")
    report = verify_checkpoint(folder)
    assert not report.ok
    assert any(p.startswith("README.md says the model is quantized (its coverage line says 14 of 15 linear weights "
                            "quantized") and p.endswith("every weight tensor is floating point (F32)")
               for p in report.problems), report.problems
    assert main(["verify", str(folder)]) == 1
    assert "README.md says the model is quantized" in capsys.readouterr().out


def test_config_says_quantized_but_tensors_are_float(tmp_path, good, tiny_reference_dir):
    folder = _copy(tiny_reference_dir, tmp_path / "bnb-config-float-tensors")
    qc = json.loads((good["bnb_nf4"] / "config.json").read_text())["quantization_config"]
    _edit_config(folder, lambda c: c.update(quantization_config=qc))
    report = verify_checkpoint(folder)
    assert any("config.json has a quantization_config (quant_method 'bitsandbytes'), but no weight" in p
               for p in report.problems), report.problems


@pytest.mark.parametrize("kind", ["rtn", "bnb_nf4"])
def test_quantized_tensors_without_quantization_config(tmp_path, good, kind):
    folder = _copy(good[kind], tmp_path / kind)
    _edit_config(folder, lambda c: c.pop("quantization_config"))
    report = verify_checkpoint(folder)
    assert any("14 weight(s) are stored quantized" in p and "config.json has no quantization_config" in p
               for p in report.problems), report.problems


def test_coverage_that_does_not_match_the_tensors(tmp_path, good):
    folder = _copy(good["rtn"], tmp_path / "coverage")
    coverage = json.loads((folder / "config.json").read_text())["hfcompress"]["coverage"]
    assert "quantized" not in coverage and coverage["quantized_linear_weights"] == 14  # counts, not 14 names

    def claim_lm_head(config):
        config["hfcompress"]["coverage"]["quantized_linear_weights"] = 15

    _edit_config(folder, claim_lm_head)
    card = folder / "README.md"
    card.write_text(card.read_text().replace("14 of 15 linear weights quantized", "15 of 15 linear weights quantized"))
    problems = verify_checkpoint(folder).problems
    assert any("hfcompress.coverage says 15 linear weights are quantized, the checkpoint stores 14" in p
               for p in problems), problems
    assert any("README.md says 15 linear weights are quantized, the checkpoint stores 14" in p for p in problems)


def test_coverage_skipped_weight_stored_quantized(tmp_path, good):
    folder = _copy(good["rtn"], tmp_path / "skipped")
    _edit_config(folder, lambda c: c["hfcompress"]["coverage"]["skipped"].update(
        {"model.layers.0.mlp.down_proj": "ignored by the user ('down_proj')"}))
    problems = verify_checkpoint(folder).problems
    assert any("says model.layers.0.mlp.down_proj is kept in floating point (ignored by the user ('down_proj')), but "
               "the checkpoint stores it quantized" in p for p in problems), problems


def test_old_checkpoints_listing_every_quantized_name_still_verify(tmp_path, good):
    """Before the counts, config.json listed every quantized layer (``coverage.quantized``): still checked."""
    from hfcompress.quantization.verify import stored_quantized_modules
    from hfcompress.quantization.checkpoint import read_index

    folder = _copy(good["rtn"], tmp_path / "old")
    names = stored_quantized_modules(read_index(folder))

    def old_format(config):
        coverage = config["hfcompress"]["coverage"]
        del coverage["quantized_linear_weights"]
        coverage["quantized"] = list(names)

    _edit_config(folder, old_format)
    problems = verify_checkpoint(folder).problems
    assert not any("coverage" in p for p in problems), problems  # (the manifest notes the edited config.json)
    _edit_config(folder, lambda c: c["hfcompress"]["coverage"]["quantized"].append("lm_head"))
    problems = verify_checkpoint(folder).problems
    assert any("hfcompress.coverage lists 15 quantized linear weights, the checkpoint stores 14 (said quantized but "
               "stored in float: lm_head)" in p for p in problems), problems


def test_cast_card_does_not_claim_quantization(good):
    card = (good["cast"] / "README.md").read_text()
    assert "- quantized" not in card and "linear weights cast to bfloat16" in card
