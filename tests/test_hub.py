import subprocess
import sys
from pathlib import Path

import pytest

from hfcompress.jobs import hub
from hfcompress.cli import main


@pytest.fixture()
def card_folder(tmp_path, tiny_reference_dir):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_reference_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    hub.write_model_card(folder, title="tiny int8", base_model="reference:tiny", method="rtn",
                         settings={"bits": 8}, data_description="none",
                         metrics=[{"model": "x", "perplexity": 12.5, "num_parameters": 10, "checkpoint_bytes": 2**20,
                                   "weight_bytes": 2**20, "decode_tokens_per_s": 100.0}],
                         recipe_text="name: x\n", tags=["quantized"])
    return folder


def test_model_card_parses_and_validates(card_folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_folder / "README.md")
    assert card.data.library_name == "transformers" and "hfcompress" in card.data.tags
    assert card.data.to_dict().get("base_model") is None  # a local reference is not a Hub id
    assert "| x | 12.500 |" in card.text and "```yaml\nname: x" in card.text
    assert hub.validate_model_card(card_folder / "README.md") == []


def test_dry_run_lists_exactly_the_files(card_folder, capsys):
    (card_folder / ".stage.json").write_text("{}")
    assert main(["push", str(card_folder), "me/tiny-int8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == sorted(p.name for p in card_folder.iterdir() if not p.name.startswith("."))
    assert "would upload" in out and "me/tiny-int8" in out


def test_uploaded_folder_loads_with_from_pretrained(card_folder):
    # What a push uploads is the folder as it is: check it loads in a clean process (no hfcompress import).
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1]);"
            "assert 'hfcompress' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(card_folder)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_no_token_is_a_clear_error(card_folder, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(card_folder), "me/tiny-int8"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err


def test_push_calls_the_hub_api_with_our_arguments(card_folder, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["private"]))

        def create_branch(self, repo_id, branch, exist_ok):
            calls.append(("create_branch", branch))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["folder_path"], kwargs["revision"], kwargs["create_pr"]))
            return "https://example.invalid/commit"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    hub.push_folder(card_folder, "me/tiny", private=True, revision="v1", token="hf_x", printer=lambda _: None)
    assert calls == [("token", "hf_x"), ("create_repo", "me/tiny", True), ("create_branch", "v1"),
                     ("upload_folder", str(card_folder), "v1", False)]


def test_incomplete_folders_and_bad_repo_ids_are_refused(card_folder, tmp_path):
    with pytest.raises(hub.PushError, match="invalid repo id"):
        hub.push_folder(card_folder, "not a repo id", dry_run=True)
    (card_folder / "tokenizer.json").unlink()
    with pytest.raises(hub.PushError, match="no tokenizer files"):
        hub.push_folder(card_folder, "me/x", dry_run=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="not a model folder"):
        hub.push_folder(empty, "me/x", dry_run=True)


def test_quantize_script_accepts_a_recipe_as_config(tmp_path, tiny_reference_dir):
    script = Path(__file__).parent.parent / "scripts" / "quantize.py"
    out = tmp_path / "int8"
    proc = subprocess.run([sys.executable, str(script), "--config", "recipes/quantize-int8-rtn.yaml",
                           "--model", str(tiny_reference_dir), "--output", str(out)],
                          capture_output=True, text=True, cwd=script.parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    # The card and config.json record only what applies to rtn (no GPTQ or bitsandbytes fields).
    recorded = config["hfcompress"]["quantization"]
    assert (recorded["method"], recorded["bits"]) == ("rtn", 8)
    assert not {"damp", "act_order", "block_size", "bnb_threshold", "dtype"} & set(recorded)
    card = (out / "README.md").read_text()
    assert "act_order" not in card and "bnb_threshold" not in card and "bits" in card
