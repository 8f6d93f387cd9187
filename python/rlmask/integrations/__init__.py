"""Integrations with training frameworks. Each submodule imports its framework when imported.

- :mod:`rlmask.integrations.transformers`: a ``TrainerCallback`` for Hugging Face ``Trainer``
  and the TRL trainers that subclass it.

Loops without callbacks (verl, OpenRLHF, custom loops) use :func:`rlmask.torch.attach_mask`
directly.
"""
