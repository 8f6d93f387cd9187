"""Checkpoints read over HTTP(S) by range requests (design §15): ``hf://ORG/NAME[@REV][/SUB]``
resolved through huggingface_hub's own URL and token handling, and plain ``https://`` or
``http://`` URLs of a checkpoint's folder, index or ``.safetensors`` file. The core fetches the
bytes (``rlmask._rlmask.Checkpoint.open_url``); this module only says where and with which
headers."""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import TYPE_CHECKING

from rlmask import _rlmask
from rlmask.errors import CheckpointNotFoundError

if TYPE_CHECKING:
    from rlmask._io import PathArg

_SCHEMES = ("hf://", "https://", "http://")
# hf://ORG/NAME[@REVISION][/SUBFOLDER]: the revision is a branch, tag or commit without '/'
# (percent-encode one that has it: refs%2Fpr%2F1).
_HF = re.compile(
    r"hf://(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.*))?"
)


def is_remote(spec: PathArg | None) -> bool:
    """Whether a checkpoint argument names a remote checkpoint (``hf://``, ``https://``,
    ``http://``)."""
    return spec is not None and os.fspath(spec).startswith(_SCHEMES)


def hf_location(spec: str) -> tuple[str, dict[str, str]]:
    """The folder URL and request headers of ``hf://ORG/NAME[@REV][/SUB]``: the endpoint
    (``HF_ENDPOINT``), the URL layout (``/ORG/NAME/resolve/REV/FILE``) and the token
    (``HF_TOKEN`` or the stored login) as huggingface_hub gives them. A branch or tag is pinned
    to the commit the hub reports for it, so every shard comes from one commit.

    Raises:
        CheckpointNotFoundError: not a valid ``hf://`` id, huggingface_hub is missing, or
            ``HF_HUB_OFFLINE`` is set.
    """
    m = _HF.fullmatch(spec)
    if m is None:
        raise CheckpointNotFoundError(
            f"'{spec}' is not a hub checkpoint: write hf://ORG/NAME[@REVISION][/SUBFOLDER]", spec
        )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise CheckpointNotFoundError(
            f"{spec}: HF_HUB_OFFLINE is set, and hf:// reads the hub over the network; unset it, "
            "or name a local folder or a cached ORG/NAME",
            spec,
        )
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]
    except ImportError:
        raise CheckpointNotFoundError(
            f"{spec}: reading hub checkpoints needs huggingface_hub (pip install huggingface_hub)",
            spec,
        ) from None
    repo, sub = m["repo"], (m["sub"] or "").strip("/") or None
    rev = urllib.parse.unquote(m["rev"]) if m["rev"] else "main"
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    headers = {k.lower(): v for k, v in build_hf_headers().items()}

    def folder(revision: str) -> str:
        url = hf_hub_url(repo, "x", subfolder=sub, revision=revision, endpoint=endpoint)
        return url[: -len("x")]

    if not re.fullmatch(r"[0-9a-f]{40}", rev):
        # Best effort: a failure here is reported, precisely, by the read that follows.
        for name in ("model.safetensors.index.json", "model.safetensors"):
            try:
                meta = get_hf_file_metadata(folder(rev) + name, headers=headers)
            except Exception:
                continue
            if meta.commit_hash:
                rev = meta.commit_hash
            break
    return folder(rev), headers


def open_checkpoint(spec: PathArg) -> _rlmask.Checkpoint:
    """A checkpoint argument opened: a local path or cached hub id (never the network), or a
    remote ``hf://``, ``https://`` or ``http://`` checkpoint, whose headers are fetched and
    validated (its tensors are fetched by the passes that read them).

    Raises:
        CheckpointError: as for a local checkpoint; ``RemoteError`` for access, server and
            network failures.
    """
    text = os.fspath(spec)
    if text.startswith("hf://"):
        url, headers = hf_location(text)
        return _rlmask.Checkpoint.open_url(url, list(headers.items()))
    if text.startswith(("https://", "http://")):
        return _rlmask.Checkpoint.open_url(text, [])
    from rlmask._resolve import resolve_checkpoint

    return _rlmask.Checkpoint(resolve_checkpoint(text))
