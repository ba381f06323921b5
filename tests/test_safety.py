"""Nothing unsafe: safetensors only unless pickles are allowed, no remote code, safe YAML, no evaluation of
strings, and recipes that cannot write outside their run folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from hfcompress.cli import main
from hfcompress.core.errors import ConfigError, ModelLoadError
from hfcompress.models.loading import ALLOW_PICKLE_ENV, UnsafeCheckpointError, load_model
from hfcompress.runs.recipe import flat_stage_arguments, load_recipe, parse_recipe

PACKAGE = Path(__file__).parents[1] / "hfcompress"


class _Trap:
    """Unpickling this runs code (it creates ``path``): what a malicious pytorch_model.bin does."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def pickle_checkpoint(folder: Path, model, trap: Path | None = None) -> Path:
    """A checkpoint whose weights exist only as ``pytorch_model.bin`` (a pickle), optionally booby-trapped."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    payload = {"state": model.state_dict(), "trap": _Trap(trap)} if trap else model.state_dict()
    torch.save(payload, folder / "pytorch_model.bin")
    return folder


def test_pickle_only_checkpoint_is_refused_before_it_is_read(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    trap = tmp_path / "code-ran"
    folder = pickle_checkpoint(tmp_path / "ckpt", tiny_llama, trap=trap)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*--allow-pickle.*allow_pickle=True"):
        load_model(folder)
    assert not trap.exists()


def test_allow_pickle_loads_a_trusted_pickle(tmp_path, tiny_llama):
    folder = pickle_checkpoint(tmp_path / "ckpt", tiny_llama)
    model = load_model(folder, allow_pickle=True)
    assert torch.equal(model.lm_head.weight, tiny_llama.lm_head.weight)


def test_safetensors_win_over_a_pickle_beside_them(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    trap = tmp_path / "code-ran"
    tiny_llama.save_pretrained(tmp_path / "ckpt")
    torch.save({"trap": _Trap(trap)}, tmp_path / "ckpt" / "pytorch_model.bin")
    model = load_model(tmp_path / "ckpt")
    assert torch.equal(model.lm_head.weight, tiny_llama.lm_head.weight) and not trap.exists()


def test_cli_refuses_pickles_in_one_line_and_allow_pickle_lets_them_through(tmp_path, tiny_reference_dir,
                                                                          tiny_teacher, monkeypatch, capsys):
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "0")  # restored after the test (main sets it for --allow-pickle)
    folder = pickle_checkpoint(tmp_path / "ckpt", tiny_teacher)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_reference_dir / name).read_bytes())
    assert main(["quantize", str(folder), str(tmp_path / "out"), "--method", "cast", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-pickle" in err and not (tmp_path / "out").exists()
    assert main(["quantize", str(folder), str(tmp_path / "out"), "--method", "cast", "-q", "--allow-pickle"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_remote_code_is_not_run(tmp_path, tiny_llama):
    trap = tmp_path / "code-ran"
    folder = tmp_path / "custom"
    tiny_llama.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                                                     "AutoConfig": "modeling_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(trap)!r}).touch()\n")
    with pytest.raises(ModelLoadError):
        load_model(folder)
    assert not trap.exists()


def test_package_never_unpickles_evaluates_or_trusts_remote_code():
    """Static guard over hfcompress/: no eval/exec, no unsafe YAML, no pickle loads, remote code never on."""
    forbidden = re.compile(r"(?<![\w.])(eval|exec)\(|yaml\.(load|unsafe_load|full_load)\(|pickle\.loads?\(|"
                           r"torch\.load\(|trust_remote_code\s*=\s*True")
    hits = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
            for path in PACKAGE.rglob("*.py") for number, line in enumerate(path.read_text().splitlines(), 1)
            if forbidden.search(line)]
    assert hits == []


# ----- recipes ----------------------------------------------------------------------------------------------
def test_yaml_tags_that_run_code_are_refused(tmp_path):
    trap = tmp_path / "code-ran"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                      f"['{trap}']]\nstages:\n  - quantize: {{method: cast}}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_recipe({"stages": [{"quantize": {"method": "cast"}}]},
                     overrides=[f"quantize.bits=!!python/object/apply:os.getcwd []"])
    assert not trap.exists()


def test_string_values_are_never_evaluated():
    with pytest.raises(ConfigError, match=r"key 'bits' expects int, got \"__import__\('os'\).getpid\(\)\""):
        parse_recipe({"stages": [{"quantize": {"method": "rtn", "bits": "__import__('os').getpid()"}}]})


@pytest.mark.parametrize("value, why", [
    ("/tmp/elsewhere", "absolute path"),
    ("~/runs/x", "absolute path"),
    ("runs/../../x", "climbs out"),
    ("../x", "climbs out"),
])
def test_recipe_output_dir_cannot_escape(value, why):
    with pytest.raises(ConfigError, match=f"key 'output_dir'.*{why}"):
        parse_recipe({"output_dir": value, "stages": [{"quantize": {"method": "cast"}}]})


def test_recipe_output_dir_through_a_symlink_is_refused(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "work" / "runs").symlink_to(tmp_path / "outside")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ConfigError, match="key 'output_dir'.*symbolic link"):
        parse_recipe({"output_dir": "runs/x", "stages": [{"quantize": {"method": "cast"}}]})
    stages = {"model": "reference:tiny", "stages": [{"quantize": {"method": "cast"}}]}
    assert parse_recipe({**stages, "output_dir": "real/x"}).output_dir == "real/x"
    # The person running the recipe may choose any folder.
    assert parse_recipe(stages,
                        overrides=[f"output_dir={tmp_path / 'outside'}"]).output_dir == str(tmp_path / "outside")


def test_stage_output_dir_is_refused_in_recipes_and_script_configs(tmp_path):
    document = {"stages": [{"distill": {"max_steps": 1, "output_dir": "/tmp/x"}}]}
    with pytest.raises(ConfigError, match=r"stage 0 \(distill\): key 'output_dir' cannot be set"):
        parse_recipe(document)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match="key 'output_dir' cannot be set"):
        flat_stage_arguments(path, "distill")
