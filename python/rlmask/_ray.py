"""Running rlmask's work as Ray tasks (``pip install "rlmask[ray]"``): on a cluster whose nodes
see the checkpoints at the same paths (a shared file system), or on a Ray instance started here
for the call. Importing this module does not import Ray."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any


@contextlib.contextmanager
def session(address: str | None) -> Iterator[Any]:
    """Yields the ``ray`` module, connected to ``address`` (``auto``, ``ray://host:port``, ...)
    or, without one, to a local instance started here and shut down on exit. An instance the
    caller already started is used as it is."""
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray executor needs Ray: pip install 'rlmask[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def run_tasks(
    ray: Any, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], cpus: float
) -> Iterator[tuple[int, Any]]:
    """Runs ``fn(*call)`` for every call as a Ray task reserving ``cpus`` CPUs; yields
    ``(index of the call, result)`` as each finishes. On an exception here (Ctrl-C) every task
    not finished is cancelled."""
    task = ray.remote(num_cpus=cpus)(fn)
    refs = {task.remote(*call): i for i, call in enumerate(calls)}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in done:
                yield refs[ref], ray.get(ref)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
