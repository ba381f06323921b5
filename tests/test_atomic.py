"""core/atomic.py and core/manifest.py: staged folders published whole, and the SHA-256 manifest that
``hfcompress verify`` checks (a flipped bit or a truncated shard is found and the file named)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hfcompress.cli import main
from hfcompress.core.atomic import CheckpointExistsError, atomic_folder, atomic_write_text, publish_files
from hfcompress.core.manifest import MANIFEST_FILE, check_manifest, file_sha256
from hfcompress.quantization.saving import save_checkpoint
from hfcompress.quantization.verify import verify_checkpoint


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_failure_inside_leaves_the_previous_folder_and_no_staging(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as staged:
        (staged / "a.txt").write_text("one")
    assert listing(target) == ["a.txt", MANIFEST_FILE]
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(target, overwrite=True) as staged:
            (staged / "a.txt").write_text("two")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "one" and listing(tmp_path) == ["out"]
    with pytest.raises(CheckpointExistsError, match="not empty"):
        with atomic_folder(target) as staged:
            pass
    with atomic_folder(target, overwrite=True) as staged:
        (staged / "b.txt").write_text("three")
    assert listing(target) == ["b.txt", MANIFEST_FILE] and listing(tmp_path) == ["out"]
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    assert manifest["files"] == {"b.txt": {"size": 5, "sha256": file_sha256(target / "b.txt")}}


def test_staging_of_a_dead_process_is_removed_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a pid that has exited (reuse within the test is astronomically unlikely)
    stale = tmp_path / f".out.tmp-{pid}-deadbeef"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"\0" * 10)
    live = tmp_path / f".out.tmp-{os.getpid()}-cafecafe"  # a save in progress in this process: left alone
    live.mkdir()
    with atomic_folder(tmp_path / "out") as staged:
        (staged / "x").write_text("x")
    assert not stale.exists() and live.exists()


def test_symlinked_target_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(CheckpointExistsError, match="symbolic link"):
        with atomic_folder(tmp_path / "link", overwrite=True):
            pass


def test_publish_files_keeps_other_content_and_drops_stale_files(tmp_path):
    folder = tmp_path / "out"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-1" / "keep").write_text("keep")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"old shard")  # an older sharded save
    first = folder / ".stage1"
    first.mkdir()
    (first / "config.json").write_text("{}")
    (first / "model.safetensors").write_bytes(b"new")
    (first / "extra.txt").write_text("only in the first save")
    publish_files(first, folder)
    assert listing(folder) == ["checkpoint-1", "config.json", "extra.txt", MANIFEST_FILE, "model.safetensors"]
    second = folder / ".stage2"
    second.mkdir()
    (second / "config.json").write_text('{"v": 2}')
    (second / "model.safetensors").write_bytes(b"newer")
    publish_files(second, folder)
    assert listing(folder) == ["checkpoint-1", "config.json", MANIFEST_FILE, "model.safetensors"]
    assert (folder / "checkpoint-1" / "keep").read_text() == "keep"
    assert not check_manifest(folder).problems


def test_atomic_write_text(tmp_path):
    path = atomic_write_text(tmp_path / "run.json", "{}\n")
    atomic_write_text(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n' and listing(tmp_path) == ["run.json"]


# ----- the manifest in verify -------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path, tiny_llama, tiny_tokenizer):
    return save_checkpoint(tiny_llama, tmp_path / "ckpt", tokenizer=tiny_tokenizer, max_shard_size="100KB")


def test_saved_checkpoint_has_a_manifest_that_verifies(saved):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    shards = sorted(p.name for p in saved.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(shards) <= set(manifest["files"])
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(manifest["files"])
    report = verify_checkpoint(saved)
    assert report.ok, report.problems
    assert not any("integrity could not be checked" in note for note in report.notes)


def test_a_flipped_bit_is_found_and_the_file_named(saved, capsys):
    shard = sorted(saved.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's data: the safetensors header still parses
    shard.write_bytes(bytes(data))
    report = verify_checkpoint(saved)
    assert not report.ok and any(shard.name in p and "SHA-256" in p for p in report.problems), report.problems
    assert main(["verify", str(saved)]) == 1
    assert f"{shard.name}: SHA-256 differs" in capsys.readouterr().out


def test_a_truncated_shard_is_found_even_with_quick(saved, capsys):
    shard = sorted(saved.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    report = verify_checkpoint(saved, deep=False)
    assert any(p.startswith(f"{shard.name}: ") and "truncated" in p for p in report.problems), report.problems
    assert main(["verify", "--quick", str(saved)]) == 1


def test_a_deleted_file_is_named(saved):
    (saved / "tokenizer.json").unlink()
    assert "tokenizer.json: missing (listed in hfcompress-manifest.json)" in verify_checkpoint(saved).problems


def test_folder_without_manifest_verifies_with_a_note(tmp_path, tiny_llama, capsys):
    tiny_llama.save_pretrained(tmp_path / "plain")  # another tool's save
    report = verify_checkpoint(tmp_path / "plain")
    assert report.ok and any("integrity could not be checked" in note for note in report.notes)
    assert main(["verify", str(tmp_path / "plain")]) == 0
    assert "integrity could not be checked" in capsys.readouterr().out


def test_manifest_describes_what_a_push_uploads(tmp_path):
    """Hidden files (stage markers, staging folders) are not uploaded by a push, so not listed either."""
    from hfcompress.jobs.hub import files_to_upload

    with atomic_folder(tmp_path / "stage") as staged:
        (staged / "config.json").write_text("{}")
        (staged / ".stage.json").write_text("{}")
        (staged / ".partial").mkdir()
        (staged / ".partial" / "x").write_text("x")
    listed = set(json.loads((tmp_path / "stage" / MANIFEST_FILE).read_text())["files"])
    uploaded = {name for name, _ in files_to_upload(tmp_path / "stage")}
    assert listed == {"config.json"} and uploaded == listed | {MANIFEST_FILE}
