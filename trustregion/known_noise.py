"""Silence the messages that Lightning and PyTorch print on every run and that say nothing
about a trustregion run. ``trustregion fit`` calls :func:`quiet_known_noise` before it builds
anything; call it yourself to get the same quiet output from a script or a notebook.

What goes, and why each is harmless here:

* Lightning's "💡 Tip:" lines advertising its cloud logger and model registry (litlogger,
  litmodels): advice, not information about the run.
* PyTorch's ``FutureWarning`` that ``LeafSpec`` is deprecated: Lightning's own data-loader code
  builds one for every dataloader; nothing a user does can change it.
* Lightning's warning that modules are in eval mode when training starts: the behaviour and
  reference models are frozen copies that are meant to stay in eval mode.
* Lightning's warning that a ``ModelCheckpoint`` under manual optimisation saves the state after
  the optimiser step: a rollout batch is saved once its updates are done, which is the state a
  resumed run continues from.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["LIGHTNING_TIP", "quiet_known_noise"]

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
