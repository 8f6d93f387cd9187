#!/usr/bin/env python3
"""Start-up and the whole ``rlmask diff`` command, this build against another (run by hand).

Each round runs, in fresh interpreters of a plain virtual environment (``_common.plain_venv``:
start-up as a user's environment has it) and in one interleaved order, so that this machine's
drift hits every command alike: a bare ``python -c pass``; for each build, ``rlmask
--version``, ``rlmask --help`` and ``rlmask diff BASE TUNED --format json`` (the console
script's entry, ``rlmask.__main__.main``, or ``rlmask.cli.main`` in builds before it, with the
build's ``python/`` folder first on ``PYTHONPATH``); and, every third round, the naive
torch script of ``bench_diff.py`` on the same pair. Each build's modules are compiled to
bytecode first, as an install would have. Prints best and median per command, and the naive
script's best over each build's best diff.

    python bench/bench_startup.py BASE TUNED [--repeat 15] [--before OTHER/python]

A build from another commit: ``git worktree add /tmp/old REV`` and copy the compiled extension
(``python/rlmask/_rlmask.abi3.so``) into ``/tmp/old/python/rlmask`` when the Rust core did not
change between them.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import plain_venv
from bench_diff import PROGRAMS

MAIN = """import sys; sys.argv = ['rlmask', *sys.argv[1:]]
try:
    from rlmask.__main__ import main
except ImportError:
    from rlmask.cli import main
main()"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--before", help="a python/ folder holding another build of rlmask")
    args = ap.parse_args()
    import rlmask

    builds = {"this build": str(Path(rlmask.__file__).parent.parent)}
    if args.before:
        builds["before"] = str(Path(args.before).resolve())
    for folder in builds.values():
        compileall.compile_dir(Path(folder) / "rlmask", quiet=1)
    with tempfile.TemporaryDirectory() as scratch:
        python = plain_venv(Path(scratch) / "venv")
        commands: dict[str, tuple[list[str], str | None]] = {
            "bare interpreter": ([python, "-c", "pass"], None),
            "naive script": ([python, "-c", PROGRAMS["naive"], args.base, args.tuned], None),
        }
        for build, folder in builds.items():
            for label, argv in (
                ("diff --format json", ["diff", args.base, args.tuned, "--format", "json"]),
                ("--version", ["--version"]),
                ("--help", ["--help"]),
            ):
                commands[f"{build}: {label}"] = ([python, "-c", MAIN, *argv], folder)
        times: dict[str, list[float]] = {k: [] for k in commands}
        for round_ in range(args.repeat):
            for name, (cmd, folder) in commands.items():
                if name == "naive script" and round_ % 3:
                    continue
                env = dict(os.environ)
                if folder:
                    env["PYTHONPATH"] = folder
                t = time.perf_counter()
                subprocess.run(cmd, env=env, capture_output=True, check=True)
                times[name].append(time.perf_counter() - t)
    for name, v in times.items():
        print(
            f"{name:32s} best {min(v) * 1e3:8.1f} ms  median {statistics.median(v) * 1e3:8.1f} ms"
        )
    naive = min(times["naive script"])
    for build in builds:
        print(f"{build}: naive / diff = {naive / min(times[f'{build}: diff --format json']):.1f}x")


if __name__ == "__main__":
    main()
