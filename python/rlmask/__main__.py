"""The ``rlmask`` command: the console script's entry point, and ``python -m rlmask``.

Nothing the command line's imports make (click's and rlmask's modules, classes and functions)
is garbage, so the cyclic collector is off while they are imported: its twenty-odd passes over
them cost 3% of the instructions of a ``rlmask diff --format json``. :func:`rlmask.cli.main`
moves what they made out of the collector's reach and turns it back on. Import this module only
to run the command.
"""

import gc

gc.disable()

from rlmask.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    main()
