"""A checkpoint's policy as a Hugging Face model directory (``trustregion export CKPT OUT_DIR``).

:func:`export_policy` reads the policy's weights from a checkpoint written by ``trustregion
fit`` — one file, or a sharded checkpoint directory written by several processes under FSDP,
consolidated here on one process without a process group — after verifying its checksums. It
rebuilds the model from the ``policy`` source the checkpoint records (its class, config and
tokenizer), puts the checkpoint's weights in, exactly and in their saved dtype, and writes
``OUT_DIR`` with ``save_pretrained``: ``config.json``, ``model.safetensors``, the generation
config and the tokenizer files. ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads it, and
so does ``model.policy: OUT_DIR`` in a new run. The behaviour and reference models, the
optimiser state and the training position are not exported.

Example:
    >>> export_policy("runs/fsdp/csv/version_0/checkpoints/last.ckpt",
    ...               "exported/policy")  # doctest: +SKIP
    PosixPath('exported/policy')
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata
from torch.distributed.checkpoint import load as load_shards

from trustregion.checkpointing import (
    install_checkpoint,
    read_checkpoint,
    remove_checkpoint,
)
from trustregion.models.loading import load_model, no_loading_bars, prepare_tokenizer

__all__ = ["ExportRefused", "export_policy", "policy_weights"]

POLICY_PREFIX = "policy."
"""What the policy's weights are named under in a checkpoint's ``state_dict``."""
_SHARDED_STATE_DICT = "state_dict"  # the top-level key of the model's tensors in the shards


class ExportRefused(ValueError):
    """A checkpoint or an output directory :func:`export_policy` cannot use (the message says
    why and what to do)."""


def policy_weights(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(hyperparameters, policy weights)`` of ``checkpoint``, a file or a sharded checkpoint
    directory, after verifying its checksums; the weights are keyed like the policy's own
    ``state_dict()`` and keep their saved dtype.

    Raises:
        FileNotFoundError: there is no such checkpoint.
        CorruptCheckpointError: it does not match its checksums or cannot be read.
        ExportRefused: it holds no policy (not written by ``trustregion fit``).
    """
    path = Path(checkpoint)
    recorded = read_checkpoint(path)  # verified; a directory's meta.pt: no tensors
    hparams = recorded.get("hyper_parameters") or {}
    if path.is_dir():
        weights = _sharded_policy(path)
    else:
        weights = {name.removeprefix(POLICY_PREFIX): value
                   for name, value in (recorded.get("state_dict") or {}).items()
                   if name.startswith(POLICY_PREFIX) and isinstance(value, Tensor)}
    if not isinstance(hparams.get("policy"), str) or not weights:
        raise ExportRefused(f"checkpoint {path} holds no trustregion policy (no 'policy' "
                            "hyperparameter or no policy weights): export a checkpoint written "
                            "by trustregion fit")
    return dict(hparams), weights


def _sharded_policy(path: Path) -> dict[str, Tensor]:
    """The policy's whole tensors from the shards of the checkpoint directory ``path``."""
    metadata = FileSystemReader(str(path)).read_metadata()
    prefix = f"{_SHARDED_STATE_DICT}.{POLICY_PREFIX}"
    tensors = {name.removeprefix(f"{_SHARDED_STATE_DICT}."): torch.empty(
                   item.size, dtype=item.properties.dtype)
               for name, item in metadata.state_dict_metadata.items()
               if name.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    if tensors:
        with warnings.catch_warnings():  # one process on purpose: no process group to use
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load_shards({_SHARDED_STATE_DICT: tensors}, checkpoint_id=str(path), no_dist=True)
    return {name.removeprefix(POLICY_PREFIX): value for name, value in tensors.items()}


def export_policy(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the policy of ``checkpoint`` to ``out_dir`` as a ``save_pretrained`` directory
    (see the module docs) and return its path. ``out_dir`` must not exist or be empty; it is
    written under a hidden name beside it and renamed into place when complete.

    Raises:
        FileNotFoundError: there is no such checkpoint.
        CorruptCheckpointError: it does not match its checksums or cannot be read.
        ExportRefused: ``out_dir`` is a file or a non-empty directory, the checkpoint holds no
            policy, or the model it names cannot be rebuilt.
    """
    out = Path(out_dir)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ExportRefused(f"{out} exists and is not an empty directory; give a new or empty "
                            "directory to export to")
    hparams, weights = policy_weights(checkpoint)
    source = hparams["policy"]
    try:
        model, tokenizer = load_model(source)
        prepare_tokenizer(tokenizer, source, pad_token=hparams.get("pad_token"),
                          chat_template=bool(hparams.get("chat_template", False)))
    except (OSError, ValueError) as err:
        raise ExportRefused(f"the checkpoint's policy source {source!r} cannot be loaded "
                            f"({err}); the export rebuilds the model's class, config and "
                            "tokenizer from it, so it must be available as when training "
                            "ran") from err
    try:
        # assign: the checkpoint's own tensors, in their saved dtype; tied weights re-tied
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise ExportRefused(f"the weights in {checkpoint} do not fit the model {source!r} "
                            f"builds: {str(err).splitlines()[0]}") from err
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.export-partial")
    remove_checkpoint(staging)
    try:
        with no_loading_bars():
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        install_checkpoint(staging, out)
    except BaseException:
        remove_checkpoint(staging)
        raise
    return out
