"""SHA-256 manifest of a saved folder: ``hfcompress-manifest.json`` lists every file with its size and hash.

Written by :mod:`hfcompress.core.atomic` just before a folder is renamed into place, so it describes exactly
what was published. ``hfcompress verify`` re-reads it: a flipped bit changes a file's hash, a truncated or
extended shard its size, a deleted shard is missing. A folder written by another tool has no manifest and is
verified without it (with a note saying so).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_FILE = "hfcompress-manifest.json"
MANIFEST_FORMAT = "hfcompress-manifest/1"


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(folder: Path, skip_nested: bool = False) -> list[str]:
    """Relative POSIX paths of every regular file under ``folder`` (sorted; the manifest itself excluded).

    Hidden files and folders (a stage's ``.stage.json`` marker, staging folders) are left out, as a Hub push
    leaves them out: the manifest describes what is published. ``skip_nested`` also leaves out subfolders with
    a manifest of their own (a Trainer's ``checkpoint-*``)."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files = [f for f in files if not f.startswith(".")]
        if skip_nested:
            dirs[:] = [d for d in dirs if not (Path(root) / d / MANIFEST_FILE).exists()]
        dirs.sort()
        for name in files:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative != MANIFEST_FILE and path.is_file() and not path.is_symlink():
                names.append(relative)
    return sorted(names)


def build_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    return {"format": MANIFEST_FORMAT, "algorithm": "sha256",
            "files": {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                      for name in _files(folder)}}


def write_manifest(folder: str | os.PathLike) -> Path:
    """Hash every file under ``folder`` into ``folder/hfcompress-manifest.json``; returns its path."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(build_manifest(folder), indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of ``folder``, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


@dataclass
class ManifestCheck:
    """What :func:`check_manifest` found: ``problems`` name the file at fault; ``notes`` are informational."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0
    has_manifest: bool = False


def check_manifest(folder: str | os.PathLike, hashes: bool = True) -> ManifestCheck:
    """Compare ``folder`` against its manifest: every listed file present, of the listed size and (with
    ``hashes=True``) the listed SHA-256. Files added after the save are noted, not failed (a README edited by
    hand is not corruption; a tampered shard is, and it is listed)."""
    folder = Path(folder)
    result = ManifestCheck()
    if not (folder / MANIFEST_FILE).exists():
        result.notes.append(f"no {MANIFEST_FILE} (not saved by hfcompress): file integrity could not be checked")
        return result
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        result.problems.append(f"{MANIFEST_FILE} is unreadable or not a {MANIFEST_FORMAT} manifest")
        return result
    result.has_manifest = True
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            result.problems.append(f"{name}: missing (listed in {MANIFEST_FILE})")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            result.problems.append(f"{name}: {size} bytes, but {entry.get('size')} were saved (truncated or "
                                   f"overwritten)")
        elif hashes and file_sha256(path) != entry.get("sha256"):
            result.problems.append(f"{name}: SHA-256 differs from the one saved (the file is corrupted or was "
                                   f"modified)")
        result.files_checked += 1
    extra = [name for name in _files(folder, skip_nested=True) if name not in manifest["files"]]
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        result.notes.append(f"{len(extra)} files not covered by {MANIFEST_FILE} (added after the save): {shown}")
    if not hashes:
        result.notes.append(f"{MANIFEST_FILE}: sizes checked, hashes skipped (--quick)")
    return result
