"""The command line's commands, one module per command (or group of commands), each naming it
``command``. :mod:`rlmask.cli` imports a module when its command runs or ``--help`` lists it,
so that a run builds only its own command.
"""
