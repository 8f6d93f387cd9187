"""Checkpoint arguments: paths, and Hugging Face repo ids resolved offline from the hub cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import rlmask
from rlmask._resolve import hub_cache_dir, resolve_checkpoint

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo: str, refs: dict[str, str], value: float) -> None:
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    (root / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        # As the hub lays files out: a blob, linked from the snapshot.
        blob = root / "blobs" / f"{commit}-{value}"
        blob.parent.mkdir(exist_ok=True)
        save_file({"w": torch.full((8,), value)}, blob)
        (snap / "model.safetensors").symlink_to(blob)


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "x"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"


def test_repo_ids_with_revisions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _cache_repo(tmp_path, "org/base", {"main": COMMIT_A}, 1.0)
    _cache_repo(tmp_path, "org/tuned", {"main": COMMIT_A, "v2": COMMIT_B}, 2.0)
    want = tmp_path / "models--org--base" / "snapshots" / COMMIT_A
    assert resolve_checkpoint("org/base") == str(want)
    assert Path(resolve_checkpoint("org/tuned@v2")).name == COMMIT_B
    assert Path(resolve_checkpoint(f"org/tuned@{COMMIT_B}")).name == COMMIT_B
    report = rlmask.diff("org/base", "org/tuned@v2", progress=False)
    assert report.base == "org/base" and report.changed == 8


def test_unresolvable_says_what_was_tried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(rlmask.CheckpointNotFoundError) as e:
        resolve_checkpoint("org/missing")
    msg = str(e.value)
    assert "no file or directory 'org/missing'" in msg
    assert f"not in the hub cache {tmp_path}" in msg and "never downloads" in msg
    _cache_repo(tmp_path, "org/there", {"main": COMMIT_A}, 1.0)
    with pytest.raises(rlmask.CheckpointNotFoundError, match="no ref 'v9'"):
        resolve_checkpoint("org/there@v9")
    with pytest.raises(rlmask.CheckpointNotFoundError, match=f"commit {COMMIT_B}.* no snapshot"):
        resolve_checkpoint(f"org/there@{COMMIT_B}")
    with pytest.raises(rlmask.CheckpointNotFoundError, match="cannot find checkpoint './nope'"):
        resolve_checkpoint("./nope")
