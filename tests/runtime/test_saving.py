"""save_checkpoint: sharded, atomic, refuses to overwrite, leaves nothing behind on failure."""

from __future__ import annotations

import json

import pytest
import torch
from .conftest import run_clean_python, small_llama, write_ct_checkpoint

from hfcompress.core.errors import HFCompressError
from hfcompress.quantization.saving import CheckpointExistsError, save_checkpoint


def siblings(path):
    """Everything next to ``path`` in its parent folder (temporary folders would show up here)."""
    return sorted(p.name for p in path.parent.iterdir())


def test_sharded_save_reloads_identically(tmp_path, llama, tiny_tokenizer):
    out = save_checkpoint(llama, tmp_path / "ckpt", tokenizer=tiny_tokenizer, max_shard_size="60KB",
                          extra_files={"README.md": "# tiny\n", "recipe/recipe.yaml": b"method: rtn\n"})
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert (out / "README.md").read_text() == "# tiny\n"
    assert (out / "recipe" / "recipe.yaml").read_bytes() == b"method: rtn\n"
    assert (out / "tokenizer.json").is_file()
    assert siblings(out) == ["ckpt"]  # no temporary folder left

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, llama(tokens).logits)


def test_refuses_non_empty_folder_and_leaves_it_alone(tmp_path, llama):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointExistsError, match="not empty.*overwrite=True"):
        save_checkpoint(llama, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert siblings(out) == ["ckpt"]


def test_empty_folder_is_fine_and_overwrite_replaces(tmp_path, llama):
    out = tmp_path / "ckpt"
    out.mkdir()
    save_checkpoint(llama, out)  # empty folder: allowed without overwrite
    (out / "stale.txt").write_text("old")
    save_checkpoint(llama, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert siblings(out) == ["ckpt"]


def test_destination_is_a_file(tmp_path, llama):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CheckpointExistsError, match="is a file"):
        save_checkpoint(llama, target, overwrite=True)


class ExplodingSave:
    """Writes part of a checkpoint, then fails, like a full disk or a crash mid-save."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, folder, **kwargs):
        self.model.save_pretrained(folder, **kwargs)
        raise OSError("No space left on device")


def test_failure_leaves_no_partial_output(tmp_path, llama):
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(ExplodingSave(llama), tmp_path / "ckpt")
    assert siblings(tmp_path / "ckpt") == []


def test_failed_overwrite_keeps_previous_checkpoint(tmp_path, llama):
    out = save_checkpoint(llama, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OSError):
        save_checkpoint(ExplodingSave(small_llama(seed=1)), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert siblings(out) == ["ckpt"]


def test_verification_failure_is_not_published(tmp_path, llama):
    """A writer bug producing tensors that contradict config.json never reaches the destination."""

    class WrongConfig:
        def save_pretrained(self, folder, **kwargs):
            llama.save_pretrained(folder, **kwargs)
            config = json.loads((folder / "config.json").read_text())
            config["intermediate_size"] = 200
            (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(HFCompressError, match="failed verification.*mlp"):
        save_checkpoint(WrongConfig(), tmp_path / "ckpt")
    assert siblings(tmp_path / "ckpt") == []


def test_bad_extra_file_name(tmp_path, llama):
    with pytest.raises(HFCompressError, match="relative path"):
        save_checkpoint(llama, tmp_path / "ckpt", extra_files={"../escape.txt": "x"})
    assert siblings(tmp_path / "ckpt") == []


def test_compressed_tensors_model_saves_and_plain_transformers_reloads(tmp_path, llama):
    """A compressed-tensors model saved through save_checkpoint (sharded) loads in plain transformers in a
    clean interpreter and the packed runtime, and both agree."""
    first = write_ct_checkpoint(llama, tmp_path / "first", num_bits=4, strategy="group", group_size=32)
    # save_pretrained writes config.json's quantization_config when the model's config carries it
    llama.config.quantization_config = json.loads((first / "config.json").read_text())["quantization_config"]
    out = save_checkpoint(llama, tmp_path / "ckpt", max_shard_size="40KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
with torch.no_grad():
    print(model(torch.arange(8)[None]).logits[0, -1, :4].tolist())
assert "hfcompress" not in sys.modules
"""
    proc = run_clean_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    from hfcompress.quantization.runtime import load_compressed

    ours = load_compressed(out, dtype=torch.float32, progress=False)
    with torch.no_grad():
        packed = ours(torch.arange(8)[None]).logits[0, -1, :4]
    assert torch.allclose(packed, plain, atol=1e-4)
