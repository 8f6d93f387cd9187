"""Turning a user's checkpoint argument into a path: a file, a directory, or a Hugging Face repo
id (``org/name[@revision]``) resolved offline from the local hub cache (design §1)."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from rlmask._io import PathArg
from rlmask.errors import CheckpointNotFoundError

if TYPE_CHECKING:
    from pathlib import Path

# A repo owner or name as the hub allows them: letters, digits, '-', '_', '.', not starting or
# ending with '-' or '.', at most 96 characters, and (checked below) no '--' or '..'.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?P<org>{_NAME})/(?P<name>{_NAME})(?:@(?P<rev>.*))?", re.ASCII)
_COMMIT = re.compile(r"[0-9a-f]{40}", re.ASCII)
# One component of a branch or tag name (refs/pr/1 style names have several).
_REF_PART = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*", re.ASCII)


def _valid_revision(rev: str) -> bool:
    """A 40-hex commit, or a branch or tag name: '/'-separated components of letters, digits,
    '.', '_', '+', '-', none empty, starting with '.', or ending with '.lock'; so never a path
    that climbs out of ``refs/`` or ``snapshots/``."""
    if _COMMIT.fullmatch(rev):
        return True
    if not rev or len(rev) > 255:
        return False
    return all(_REF_PART.fullmatch(p) and not p.endswith(".lock") for p in rev.split("/"))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    from pathlib import Path

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_checkpoint(spec: PathArg) -> str:
    """Returns the local path for a checkpoint argument, never touching the network.

    An existing path wins (returned as given, ``~`` expanded). Otherwise ``org/name[@revision]``
    is looked up in the hub cache: ``models--org--name/refs/<revision>`` (default ``main``)
    holds a commit, whose files lie in ``snapshots/<commit>/``; a 40-hex revision names the
    snapshot directly. The repo id and revision are validated first, and the snapshot must
    resolve to a folder inside the cache, so no argument can make rlmask read files elsewhere;
    a ref file's contents are never shown.

    Raises:
        CheckpointNotFoundError: with one line saying everything that was tried.
    """
    text = os.fspath(spec)
    if text.startswith(("hf://", "https://", "http://")):
        raise CheckpointNotFoundError(
            f"{text}: remote checkpoints are read by diff, trajectory, survey and spectrum; this "
            "command reads local ones only: download it first, e.g. with `hf download`",
            text,
        )
    path = os.path.expanduser(text)
    if os.path.exists(path):
        return path
    tried = [f"no file or directory '{path}'"]
    m = _REPO_ID.fullmatch(text)
    if m is None or any(bad in m["org"] + "/" + m["name"] for bad in ("--", "..")):
        raise CheckpointNotFoundError(f"cannot find checkpoint '{text}': {tried[0]}", text)
    rev = m["rev"] if m["rev"] is not None else "main"
    if not _valid_revision(rev):
        raise CheckpointNotFoundError(
            f"cannot find checkpoint '{text}': {tried[0]}, and '{rev}' is not a valid revision "
            "(a branch or tag name, or a 40-hex commit)",
            text,
        )
    cache = hub_cache_dir().resolve()
    repo_dir = cache / f"models--{m['org']}--{m['name']}"
    if not repo_dir.is_dir():
        tried.append(f"repo '{m['org']}/{m['name']}' is not in the hub cache {cache}")
    else:
        commit: str | None = rev if _COMMIT.fullmatch(rev) else None
        ref = repo_dir / "refs" / rev
        if commit is None:
            if ref.is_file():
                # Never echo what the file holds: only whether it is a commit hash.
                with open(ref, "rb") as f:
                    held = f.read(64).strip()
                if _COMMIT.fullmatch(held.decode("ascii", "replace")):
                    commit = held.decode("ascii")
                else:
                    tried.append(f"ref file {ref} does not hold a commit hash")
            else:
                tried.append(f"no ref '{rev}' at {ref}")
        if commit is not None:
            snapshot = repo_dir / "snapshots" / commit
            if snapshot.is_dir():
                real = snapshot.resolve()
                if not real.is_relative_to(cache):
                    raise CheckpointNotFoundError(
                        f"cannot find checkpoint '{text}': snapshot {snapshot} resolves to "
                        f"{real}, outside the hub cache {cache}; refusing to read it",
                        text,
                    )
                return str(real)
            tried.append(f"revision '{rev}' (commit {commit}) has no snapshot at {snapshot}")
    raise CheckpointNotFoundError(
        f"cannot find checkpoint '{text}': "
        + "; ".join(tried)
        + " (rlmask never downloads; fetch it first, e.g. with `hf download`)",
        text,
    )
