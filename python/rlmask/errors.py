"""Exceptions raised by rlmask.

Every error about the user's inputs derives from :class:`RlmaskError`::

    RlmaskError
    ├── CheckpointError              a checkpoint could not be read
    │   ├── CheckpointNotFoundError  no checkpoint at that path or repo id
    │   └── CheckpointFormatError    malformed safetensors header or index
    ├── TensorMismatchError          shapes or dtypes that cannot be compared
    └── MaskError                    an invalid .rlmask file, or masks that do not fit together

Messages are one line and name the file and, where there is one, the tensor.
"""

from rlmask._rlmask import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    RlmaskError,
    TensorMismatchError,
)


class MaskError(RlmaskError):
    """An ``.rlmask`` file is invalid, or masks cover different tensors or shapes."""


__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "MaskError",
    "RlmaskError",
    "TensorMismatchError",
]
