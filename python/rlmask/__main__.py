"""The ``rlmask`` command: the console script's entry point, and ``python -m rlmask``.

Nothing the command line's imports make (click's and rlmask's modules, classes and functions)
is garbage, so the cyclic collector is off while they are imported: its twenty-odd passes over
them cost 3% of the instructions of a ``rlmask diff --format json``. :func:`rlmask.cli.main`
moves what they made out of the collector's reach and turns it back on. Import this module only
to run the command.
"""

import gc
import sys

gc.disable()

try:
    from rlmask.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line loads ends as it does in a command
    sys.stderr.write("rlmask: interrupted; nothing was written\n")
    raise SystemExit(130) from None

__all__ = ["main"]

if __name__ == "__main__":
    main()
