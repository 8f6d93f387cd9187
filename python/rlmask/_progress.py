"""Running a long core call on a worker thread while the caller's thread draws a progress bar
(bytes done and rate) and stays responsive to Ctrl-C and SIGTERM."""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from rlmask._rlmask import Progress

T = TypeVar("T")


def bar_width() -> int:
    """Progress bars stay one column short of the terminal (a full-width line leaves the
    cursor in the terminal's pending-wrap state, and the next output lands on the bar's line)
    and at most 100 wide."""
    return max(20, min(100, shutil.get_terminal_size().columns - 1))


def progress_wanted(progress: bool) -> bool:
    """A bar is drawn only when asked for and stderr is a terminal."""
    return progress and sys.stderr.isatty()


def run_with_progress(call: Callable[[Progress], T], *, show: bool, desc: str = "comparing") -> T:
    """Runs ``call(progress)`` on a worker thread (the core releases the GIL) while this thread
    draws the bar, if ``show``, and stays responsive to Ctrl-C and SIGTERM whatever stderr is.

    On KeyboardInterrupt (or any exception raised here by a signal handler) the core is asked
    to stop, which it does within one chunk of work, and the worker is joined before the
    exception propagates: no thread is left reading the memory maps, and an output file being
    written by the pass is removed, never committed.
    """
    watch = Progress()
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = call(watch)
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    worker = threading.Thread(target=work, name="rlmask-worker", daemon=True)
    worker.start()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(
            total=0,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            delay=0.5,
            file=sys.stderr,
            ncols=bar_width(),
            leave=False,
        )
    try:
        while worker.is_alive():
            worker.join(0.05)
            if bar is not None:
                bar.total = watch.total
                # update(), not refresh(): it honours the delay and records what was drawn,
                # so that closing the bar erases it.
                bar.update(watch.done - bar.n)
    except BaseException:
        watch.cancel()
        worker.join()
        raise
    finally:
        if bar is not None:
            bar.close()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
