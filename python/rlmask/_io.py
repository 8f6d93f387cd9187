"""Atomic output: write beside the target, then rename, so a reader never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path in the target's directory; on success it replaces ``target``,
    on failure it is removed and ``target`` is left untouched."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.close(fd)
    # mkstemp makes the file private (0600); give it the permissions open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(target: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp_path)`` and moves the result to ``target`` atomically."""
    with atomic_path(target) as tmp:
        write(tmp)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` (UTF-8) to ``target`` atomically."""

    def write(p: Path) -> None:
        p.write_text(text, encoding="utf-8")

    write_atomic(target, write)
