"""Running a long core call on a worker thread while the caller's thread draws a progress bar
(bytes done and rate) and stays responsive to Ctrl-C and SIGTERM."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from rlmask._rlmask import Progress

T = TypeVar("T")


def bar_width() -> int:
    """Progress bars stay one column short of the terminal (a full-width line leaves the
    cursor in the terminal's pending-wrap state, and the next output lands on the bar's line)
    and at most 100 wide."""
    import shutil  # here: 5 ms of start-up that only a progress bar needs

    return max(20, min(100, shutil.get_terminal_size().columns - 1))


def progress_wanted(progress: bool) -> bool:
    """A bar is drawn only when asked for and stderr is a terminal."""
    return progress and sys.stderr.isatty()


#: Set while a caller asks every pass running in other threads to stop (see :func:`cancel_all`).
_CANCEL_ALL = threading.Event()


@contextlib.contextmanager
def cancel_all() -> Iterator[None]:
    """While the block runs, every :func:`run_in_worker` waiting in another thread (a survey's
    pairs, say) cancels its work and raises KeyboardInterrupt in that thread."""
    _CANCEL_ALL.set()
    try:
        yield
    finally:
        _CANCEL_ALL.clear()


def run_in_worker(
    call: Callable[[], T],
    *,
    on_interrupt: Callable[[], None],
    wait_on_interrupt: bool = True,
    tick: Callable[[], None] | None = None,
) -> T:
    """Runs ``call()`` on a worker thread while this thread waits in short intervals (calling
    ``tick`` between them), so that Ctrl-C, or an exception raised by a signal handler, is
    seen within about 50 ms whatever stdin, stdout and stderr are.

    On such an exception ``on_interrupt()`` asks the work to stop; with ``wait_on_interrupt``
    the worker is joined before the exception propagates (so no thread is left reading the
    memory maps, and an output being written is removed, never committed), else it is left to
    finish its current step on its own (a daemon thread that ends with the process).
    """
    box: dict[str, object] = {}
    # Waited on instead of Thread.join: before Python 3.13, a KeyboardInterrupt that lands
    # inside join() can mark a thread that is still running as stopped, so that the next
    # join() returns at once and the interrupt propagates while the worker is still writing.
    finished = threading.Event()

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="rlmask-worker", daemon=True)
    try:
        # Started inside the try: a signal that lands while the thread starts must still
        # cancel it and wait for it, or the process could exit with an output half-written.
        worker.start()
        while not finished.wait(0.05):
            if tick is not None:
                tick()
            if _CANCEL_ALL.is_set():
                raise KeyboardInterrupt
    except BaseException:
        on_interrupt()
        if wait_on_interrupt and worker.ident is not None:
            finished.wait()
        raise
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def run_with_progress(
    call: Callable[[Progress], T],
    *,
    show: bool,
    desc: str = "comparing",
    fetched: Callable[[], int] | None = None,
) -> T:
    """Runs a core call ``call(progress)`` (which releases the GIL) with :func:`run_in_worker`,
    drawing a bar of bytes done and rate if ``show`` (for remote checkpoints, with the bytes
    ``fetched`` so far beside it). Ctrl-C cancels the core, which stops within one chunk of
    work, and the worker is joined before the interrupt propagates."""
    watch = Progress()
    if not show:
        return run_in_worker(lambda: call(watch), on_interrupt=watch.cancel)
    from tqdm import tqdm

    with tqdm(
        total=0,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        delay=0.5,
        file=sys.stderr,
        ncols=bar_width(),
        leave=False,
    ) as bar:

        def tick() -> None:
            bar.total = watch.total
            if fetched is not None:
                bar.set_postfix_str(f"{fetched() / 2**20:,.0f} MiB fetched", refresh=False)
            # update(), not refresh(): it honours the delay and records what was drawn, so
            # that closing the bar erases it.
            bar.update(watch.done - bar.n)

        return run_in_worker(lambda: call(watch), on_interrupt=watch.cancel, tick=tick)
