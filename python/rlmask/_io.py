"""Output files: checked before any work starts, written beside the target and renamed into
place, so a reader never sees half a file and a failure leaves the previous file untouched."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rlmask.errors import OutputError

if TYPE_CHECKING:
    from pathlib import Path

#: Every path argument of the public API: a string or an ``os.PathLike``.
PathArg = str | os.PathLike[str]


def check_output(target: PathArg) -> None:
    """Fails at once, naming ``target``, when it could not be written: its directory is
    missing or not writable, or ``target`` is a directory. Call it before minutes of reading.

    Raises:
        OutputError: with ``path`` set to ``target``.
    """
    where = os.fspath(target)
    folder = os.path.dirname(where) or "."
    if os.path.isdir(where):
        raise OutputError(f"{where}: is a directory", where)
    if not os.path.isdir(folder):
        raise OutputError(f"{where}: directory {folder} does not exist", where)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{where}: directory {folder} is not writable", where)


@contextlib.contextmanager
def atomic_path(target: PathArg) -> Iterator[Path]:
    """Yields a temporary path in the target's directory; on success it replaces ``target``,
    on failure (an exception, Ctrl-C) it is removed and ``target`` is left untouched. An
    operating-system error becomes :class:`~rlmask.errors.OutputError` naming ``target``, never
    the temporary file."""
    # Here, not at the top: 15 ms of every command's start-up that only writing needs.
    import tempfile
    from pathlib import Path

    target = Path(target)
    where = os.fspath(target)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or "."
        )
    except OSError as e:
        raise OutputError(f"{where}: {e.strerror}", where) from None
    os.close(fd)
    # mkstemp makes the file private (0600); give it the permissions open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"{where}: {e.strerror or e}", where) from None
        raise


def write_atomic(target: PathArg, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp_path)`` and moves the result to ``target`` atomically. Writers that
    report a full disk or a size limit with their own exception types (polars, matplotlib)
    are turned into :class:`~rlmask.errors.OutputError` as well."""
    where = os.fspath(target)
    with atomic_path(target) as tmp:
        try:
            write(tmp)
        except (OSError, KeyboardInterrupt):
            raise
        except Exception as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OSError) or "No space left" in str(e) or "os error" in str(e):
                raise OutputError(f"{where}: {e}", where) from None
            raise


def write_text_atomic(target: PathArg, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``target`` atomically."""

    def write(p: Path) -> None:
        p.write_text(text, encoding="utf-8")

    write_atomic(target, write)
