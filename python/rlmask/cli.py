"""The ``rlmask`` command line.

Exit codes: 0 on success, 1 on a data error (one line on stderr, no traceback), 2 on a usage
error.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING

import click

from rlmask._commands.common import Terminated
from rlmask._rlmask import __version__

if TYPE_CHECKING:
    from typing import TextIO

# Each command lives in a module of rlmask._commands, imported when the command runs (or when
# `rlmask --help` lists it): a run builds its own command and options, not all sixteen. The API
# (polars, numpy) is imported inside the commands, so that `rlmask --help` and `rlmask
# --version` start at the speed of click alone.
COMMANDS = (
    "demo",
    "diff",
    "mask",
    "overlap",
    "patch",
    "rank",
    "spectrum",
    "survey",
    "trajectory",
)


class _Commands(click.Group):
    """A group whose commands are imported on first use from ``rlmask._commands``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module = importlib.import_module(f"rlmask._commands.{cmd_name}")
            self.add_command(module.command, cmd_name)
        return self.commands.get(cmd_name)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="rlmask")
def cli() -> None:
    """What did RL actually change in this model?

    rlmask compares safetensors checkpoints without loading them into memory and reports the
    paper's update sparsity: the share of parameters that finetuning left unchanged.

    Start with `rlmask demo`, then `rlmask diff BASE TUNED --help`.
    """


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _exit_now(code: list[int]) -> None:
    """Ends the process with the command's exit code, skipping the interpreter's teardown
    (freeing every module, class and function one by one: about 10 ms of a 0.2 s `rlmask diff`).
    Runs as the last exit handler: Python has joined the non-daemon threads and run every other
    handler by then, and the command has closed and renamed its outputs; only the standard
    streams' buffers are left, flushed here. When the command did not end with an exit code (an
    uncaught exception) or flushing fails, the ordinary exit runs and reports it."""
    if not code:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code[0])


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """rlmask's own warnings as one line on stderr (control characters escaped), without the
    source line Python would print; other packages' warnings as Python prints them."""
    from rlmask.errors import RlmaskWarning

    if issubclass(category, RlmaskWarning):
        from rlmask._rlmask import printable

        sys.stderr.write(f"rlmask: warning: {printable(str(message))}\n")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main() -> None:
    """Entry point of the ``rlmask`` command: runs it and ends the process with its exit code.
    (Inside another program, run a command with ``cli.main(args, standalone_mode=False)``.)"""
    # What the imports made so far (click's and this module's classes, functions and tables)
    # lives until exit: the cyclic collector no longer walks it in each collection (7% of the
    # instructions of a `rlmask diff --format json` on a small pair). The console script turns
    # the collector off while it imports this module (`rlmask.__main__`); on again here.
    gc.freeze()
    gc.enable()
    if hasattr(signal, "SIGPIPE"):  # `rlmask ... | head` ends quietly, as other tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # SIGTERM unwinds like Ctrl-C (exit 143), so no temporary file outlives a killed run.
    signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.showwarning = _show_warning
    # Registered before the command runs, so that it runs after every exit handler registered
    # by what the command imports (the last registered runs first).
    code: list[int] = []
    atexit.register(_exit_now, code)
    try:
        cli.main(prog_name="rlmask")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code.append(e.code or 0)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
