"""Output files: checked before any work starts, written beside the target and renamed into
place, so a reader never sees half a file and a failure leaves the previous file untouched."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
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


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_not_input(target: PathArg, inputs: Iterable[PathArg | None]) -> None:
    """Refuses an output that would replace or write into one of the command's inputs: the
    same file as an input (same device and inode, after symlinks: a hard link or a symlink
    counts) or as any file of an input checkpoint folder, or a path inside an input folder
    (a checkpoint directory; the folder of an index file). Inputs may be checkpoint folders,
    shards, index files, masks, patches or manifests; hub ids are resolved from the cache, and
    an input that does not exist is passed over (its own error comes later).

    Raises:
        OutputError: naming the output and the input it would destroy.
    """
    from rlmask._resolve import resolve_checkpoint
    from rlmask.errors import RlmaskError

    where = os.fspath(target)
    real = os.path.realpath(where)
    try:
        st: os.stat_result | None = os.stat(where)
    except OSError:
        st = None
    for spec in inputs:
        if spec is None:
            continue
        try:
            inp = resolve_checkpoint(spec)
        except RlmaskError:
            continue
        if os.path.isdir(inp):
            folder: str | None = inp
        elif inp.endswith(".json"):
            folder = os.path.dirname(inp) or "."
        else:
            folder = None
        said = os.fspath(spec)
        if folder is not None:
            if _inside(real, os.path.realpath(folder)):
                raise OutputError(
                    f"{where}: lies inside the input checkpoint {said}; writing there would "
                    "change an input. Choose a path outside it",
                    where,
                )
            if st is not None:
                with contextlib.suppress(OSError), os.scandir(folder) as entries:
                    for e in entries:
                        with contextlib.suppress(OSError):
                            if _same(st, os.stat(e.path)):
                                raise OutputError(
                                    f"{where}: is the file {e.path} of the input checkpoint "
                                    f"{said}; writing it would destroy it. Choose another path",
                                    where,
                                )
        if st is not None:
            with contextlib.suppress(OSError):
                if _same(st, os.stat(inp)):
                    raise OutputError(
                        f"{where}: is the input {said}; writing it would destroy it. "
                        "Choose another path",
                        where,
                    )


#: The largest side file (``config.json``, a manifest) read whole.
SIDE_FILE_LIMIT = 64 << 20


def read_side_file(path: PathArg, *, limit: int = SIDE_FILE_LIMIT) -> bytes | None:
    """The bytes of a small file beside the weights (``config.json``), or None when there is
    none. Only a regular file is read, and at most ``limit`` bytes of it: a FIFO cannot hang
    the command and ``/dev/zero`` cannot fill the memory.

    Raises:
        CheckpointFormatError: the path is not a regular file, or is larger than ``limit``.
        CheckpointError: it cannot be read (permissions, I/O).
    """
    from rlmask.errors import CheckpointError, CheckpointFormatError

    where = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting.
        fd = os.open(where, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot be read ({e.strerror or e})", where) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kinds = (
                (stat.S_ISFIFO, "a FIFO"),
                (stat.S_ISDIR, "a directory"),
                (stat.S_ISCHR, "a device"),
                (stat.S_ISBLK, "a device"),
            )
            kind = next((k for test, k in kinds if test(mode)), "a special file")
            raise CheckpointFormatError(
                f"{where}: is {kind}, not a regular file; refusing to read it", where
            )
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot be read ({e.strerror or e})", where) from None
    finally:
        os.close(fd)
    if size > limit:
        raise CheckpointFormatError(
            f"{where}: larger than {limit >> 20} MiB; refusing to read it as a side file", where
        )
    return b"".join(chunks)


def _sync(path: str, *, directory: bool = False) -> None:
    """fsync of a file, or of a directory (so that a rename in it survives a crash); best
    effort where the platform or filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: PathArg) -> Iterator[Path]:
    """Yields a temporary path in the target's directory; on success it replaces ``target``,
    on failure (an exception, Ctrl-C) it is removed and ``target`` is left untouched. An
    operating-system error becomes :class:`~rlmask.errors.OutputError` naming ``target``, never
    the temporary file."""
    # Here, not at the top: 15 ms of every command's start-up that only writing needs.
    import tempfile
    from pathlib import Path

    from rlmask._rlmask import clean_leftovers

    target = Path(target)
    where = os.fspath(target)
    # Named as the core's writer names its temporaries (.NAME.TAG.PID.N.tmp): a killed run's
    # leftovers are recognisable, and removed here once their process is gone.
    clean_leftovers(target)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.py.{os.getpid()}.", suffix=".tmp", dir=target.parent or "."
        )
    except OSError as e:
        raise OutputError(f"{where}: {e.strerror}", where) from None
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600), and a writer may have made it anew: give it
        # the permissions open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _sync(tmp)
        os.replace(tmp, target)
        _sync(os.fspath(target.parent or "."), directory=True)
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
