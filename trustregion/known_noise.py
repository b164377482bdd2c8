"""Silence the messages that Lightning and PyTorch print on every run and that say nothing
about a trustregion run. ``trustregion fit`` calls :func:`quiet_known_noise` before it builds
anything; call it yourself to get the same quiet output from a script or a notebook.

What goes, and why each is harmless here:

* Lightning's "💡 Tip:" lines advertising its cloud logger and model registry (litlogger,
  litmodels): advice, not information about the run.
* PyTorch's ``FutureWarning`` that ``LeafSpec`` is deprecated: Lightning's own data-loader code
  builds one for every dataloader; nothing a user does can change it.
* Lightning's warning that modules are in eval mode when training starts: every model runs in
  eval mode on purpose. The behaviour and reference models are frozen copies, and the policy
  recomputes its log-probs without dropout so that they match the behaviour's (the module warns
  once when the policy's config sets a dropout that this turns off).
* Lightning's warning that a ``ModelCheckpoint`` under manual optimisation saves the state after
  the optimiser step: a rollout batch is saved once its updates are done, which is the state a
  resumed run continues from.

One more filter holds from ``import trustregion`` on (:func:`drop_torchao_import_noise`):
torchao, when installed, is imported by transformers as soon as a model class is, and on a
machine without its CUDA extensions it logs "Failed to load ..._C_mxfp8..." for each, a
"Detected no triton" notice, and PyTorch's notice that it calls a deprecated
``register_constant()``. None concerns the run; every other torchao message passes.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["LIGHTNING_TIP", "TORCHAO_IMPORT_NOISE", "drop_torchao_import_noise",
           "quiet_known_noise"]

LIGHTNING_TIP = "💡 Tip:"
"""How Lightning's advertising lines begin."""

# rank_zero_info logs through one of these, depending on which Lightning package set it last.
_RANK_ZERO_LOGGERS = ("lightning_utilities.core.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning.pytorch.utilities.rank_zero")

_HARMLESS_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning),
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", Warning),
)


TORCHAO_IMPORT_NOISE = (
    ("torchao", "Failed to load"),
    ("torchao.kernel.intmm", "Detected no triton"),
    ("torch.utils._pytree", "Calling register_constant() on Enum subclasses is deprecated"),
)
"""What torchao's import logs where its CUDA extensions or Triton are missing: the logger each
comes from and a fragment of its message."""


class _DropFragment(logging.Filter):
    """Drops log records whose message holds ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def drop_torchao_import_noise() -> None:
    """Filter :data:`TORCHAO_IMPORT_NOISE` for the rest of the process (calling it again adds
    nothing)."""
    for name, fragment in TORCHAO_IMPORT_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropFragment) and f.fragment == fragment
                   for f in logger.filters):
            logger.addFilter(_DropFragment(fragment))


class _WithoutTips(logging.Filter):
    """Drops log records that are Lightning's advertising tips."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_TIP)


def quiet_known_noise() -> None:
    """Filter the messages listed in this module's docstring, for the rest of the process
    (calling it again adds nothing)."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutTips) for f in logger.filters):
            logger.addFilter(_WithoutTips())
    for message, category in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
