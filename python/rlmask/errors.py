"""Exceptions raised by rlmask.

Every error about the user's inputs or outputs derives from :class:`RlmaskError`::

    RlmaskError
    ├── CheckpointError               a checkpoint could not be read
    │   ├── CheckpointNotFoundError   no checkpoint at that path or repo id
    │   ├── CheckpointFormatError     malformed safetensors header or index, or not a checkpoint
    │   ├── CheckpointChangedError    a file was truncated or rewritten while it was read
    │   └── RemoteError               a remote file could not be read (access, server, network)
    ├── TensorMismatchError           shapes or dtypes that cannot be compared
    ├── PairingError                  nothing to compare, or mostly unpaired tensor names
    ├── MaskError                     an invalid .rlmask file, or masks that do not fit together
    └── OutputError                   an output file could not be written

Messages are one line, name the file and, where there is one, the tensor, and show control
characters escaped. The file and tensor are also attributes: ``e.path`` and ``e.tensor`` (None
when the error is not about one).
"""

from __future__ import annotations


class RlmaskError(Exception):
    """Base class of every error rlmask raises about its inputs and outputs.

    Attributes:
        path: the file or directory the error is about, as given, or None.
        tensor: the tensor the error is about, or None.
    """

    def __init__(self, message: str, path: str | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.tensor = tensor


class CheckpointError(RlmaskError):
    """A checkpoint could not be read."""


class CheckpointNotFoundError(CheckpointError):
    """The path or repo id does not name a checkpoint in any accepted form."""


class CheckpointFormatError(CheckpointError):
    """A safetensors header or index file is malformed or inconsistent with its shards, or the
    file is not a model checkpoint (a pickle, a mask)."""


class CheckpointChangedError(CheckpointError):
    """A file was truncated or rewritten while it was being read; nothing from it is reported."""


class RemoteError(CheckpointError):
    """A remote checkpoint file could not be read: access denied, a server that ignores range
    requests, or a network failure that outlasted the retries. ``e.path`` is the URL without
    its credentials or query."""


class TensorMismatchError(RlmaskError):
    """A tensor has shapes or dtypes in the two checkpoints that cannot be compared."""


class PairingError(RlmaskError):
    """The two checkpoints do not pair up into a meaningful comparison: no floating element is
    compared, or most of one side has no partner on the other."""


class MaskError(RlmaskError):
    """An ``.rlmask`` file is invalid, or masks cover different tensors or shapes."""


class OutputError(RlmaskError):
    """An output file could not be written (no space, no permission, no such directory)."""


class RlmaskWarning(UserWarning):
    """Something the user should know that does not stop the work: a damaged cache entry
    recomputed, a result that looks implausible. The command line prints it as one line,
    ``rlmask: warning: ...``; ``warnings.simplefilter("error", RlmaskWarning)`` makes it fatal."""


__all__ = [
    "CheckpointChangedError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "MaskError",
    "OutputError",
    "PairingError",
    "RemoteError",
    "RlmaskError",
    "RlmaskWarning",
    "TensorMismatchError",
]
