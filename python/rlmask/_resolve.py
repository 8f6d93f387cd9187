"""Turning a user's checkpoint argument into a path: a file, a directory, or a Hugging Face repo
id (``org/name[@revision]``) resolved offline from the local hub cache (DESIGN §1)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rlmask.errors import CheckpointNotFoundError

_REPO_ID = re.compile(r"(?P<org>[\w.-]+)/(?P<name>[\w.-]+)(?:@(?P<rev>[\w./-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_checkpoint(spec: str | os.PathLike[str]) -> Path:
    """Returns the local path for a checkpoint argument, never touching the network.

    An existing path wins. Otherwise ``org/name[@revision]`` is looked up in the hub cache:
    ``models--org--name/refs/<revision>`` (default ``main``) holds a commit, whose files lie in
    ``snapshots/<commit>/``; a 40-hex revision names the snapshot directly.

    Raises:
        CheckpointNotFoundError: with one line saying everything that was tried.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        return path
    tried = [f"no file or directory '{path}'"]
    m = _REPO_ID.fullmatch(text)
    if m is None:
        raise CheckpointNotFoundError(f"cannot find checkpoint '{text}': {tried[0]}")
    cache = hub_cache_dir()
    repo_dir = cache / f"models--{m['org']}--{m['name']}"
    rev = m["rev"] or "main"
    if not repo_dir.is_dir():
        tried.append(f"repo '{m['org']}/{m['name']}' is not in the hub cache {cache}")
    else:
        commit: str | None = rev if _COMMIT.fullmatch(rev) else None
        ref = repo_dir / "refs" / rev
        if commit is None:
            if ref.is_file():
                commit = ref.read_text().strip()
            else:
                tried.append(f"no ref '{rev}' at {ref}")
        if commit is not None:
            snapshot = repo_dir / "snapshots" / commit
            if snapshot.is_dir():
                return snapshot
            tried.append(f"revision '{rev}' (commit {commit}) has no snapshot at {snapshot}")
    raise CheckpointNotFoundError(
        f"cannot find checkpoint '{text}': "
        + "; ".join(tried)
        + " (rlmask never downloads; fetch it first, e.g. with `huggingface-cli download`)"
    )
