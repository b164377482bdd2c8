"""The typed per-token input every strategy receives, and its validation."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["LOGP_TOLERANCE", "TokenBatch"]

LOGP_TOLERANCE = 1e-3
"""How far above 0 a log-prob may lie before it is refused (a probability of e^0.001 ≈ 1.001).

A log-softmax never exceeds 0 in exact arithmetic, and rounding cannot push it above: both
float32 and bfloat16 round monotonically, so ``logit − logsumexp ≤ 0`` survives them. A small
positive value can still come from log-probs assembled by different kernels (an inference
engine's logit and normaliser, an emulated low-precision forward); 1e-3 leaves room for that
while any real mistake — logits or probabilities passed as log-probs, a sign flipped — lies far
beyond it."""

_LOGP_FIELDS = ("logp", "behavior_logp", "old_logp", "ref_logp", "topk_logp",
                "topk_behavior_logp")


@dataclass
class TokenBatch:
    """Per-token tensors for one (micro-)batch of sampled responses.

    All per-token tensors are shaped ``[batch, time]``; top-K tensors are ``[batch, time, K]``.

    Attributes:
        logp: current policy log-prob of each sampled token; carries the gradient.
        behavior_logp: log-prob the behaviour (rollout) policy gave the sampled token.
        advantages: ``[batch]`` (one per response) or ``[batch, time]``; treated as constant.
        mask: 1/True on response tokens that count, 0/False on prompt and padding: bool, or
            an integer or float tensor holding only 0 and 1 (a fraction is not a weight).
        old_logp: policy log-prob recomputed without gradient before this round of updates.
        ref_logp: frozen reference-model log-prob (only needed for a reference-KL penalty).
        entropy: policy entropy at each position (only needed for an entropy bonus).
        topk_logp: current policy log-probs of the behaviour policy's top-K ids plus the sampled
            id. Slots that do not hold a distinct token are ``-inf`` in both top-K tensors. The
            training loop records the tracked ids in descending behaviour probability and the
            sampled id in the last slot, so :meth:`topk_slots` can narrow a record to a smaller K.
        topk_behavior_logp: behaviour log-probs of the same ids.
    """

    logp: Tensor
    behavior_logp: Tensor
    advantages: Tensor
    mask: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    entropy: Tensor | None = None
    topk_logp: Tensor | None = None
    topk_behavior_logp: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.logp.shape

    def topk_slots(self, k: int) -> tuple[Tensor, Tensor]:
        """``(topk_logp, topk_behavior_logp)`` narrowed to the first ``k`` tracked slots and the
        last (sampled) slot when more than ``k + 1`` were recorded (another consumer asked for a
        larger K); unchanged otherwise. Raises ``ValueError`` when the batch has no top-K data."""
        if self.topk_logp is None or self.topk_behavior_logp is None:
            raise ValueError(
                "this needs TokenBatch.topk_logp and TokenBatch.topk_behavior_logp (log-probs of "
                "the behaviour policy's top-K token ids plus the sampled id)")
        if self.topk_logp.shape[-1] <= k + 1:
            return self.topk_logp, self.topk_behavior_logp
        return (torch.cat([self.topk_logp[..., :k], self.topk_logp[..., -1:]], dim=-1),
                torch.cat([self.topk_behavior_logp[..., :k], self.topk_behavior_logp[..., -1:]],
                          dim=-1))

    def token_advantages(self) -> Tensor:
        """Advantages broadcast to ``[batch, time]``, detached."""
        adv = self.advantages.detach()
        if adv.dim() == 1:
            adv = adv[:, None]
        return adv.expand(self.shape)

    def bool_mask(self) -> Tensor:
        return self.mask if self.mask.dtype == torch.bool else self.mask != 0

    def validate(self) -> None:
        """Check types, shapes and dtypes (no host synchronisation). Raises ``ValueError``."""
        for field in fields(self):
            value = getattr(self, field.name)
            required = field.default is not None
            if (value is not None or required) and not isinstance(value, Tensor):
                allowed = "a torch.Tensor" + ("" if required else " or None")
                raise ValueError(
                    f"TokenBatch.{field.name} must be {allowed}; got {type(value).__name__} "
                    "(build it with torch.tensor(...))"
                )
        if self.logp.dim() != 2:
            raise ValueError(
                f"TokenBatch.logp must be shaped [batch, time]; got {tuple(self.logp.shape)}"
            )
        shape = tuple(self.logp.shape)
        if self.logp.numel() == 0:
            raise ValueError(
                f"TokenBatch holds no tokens: logp has shape {shape} = [batch, time]; a batch "
                "needs at least one sequence and one position"
            )
        for name in ("behavior_logp", "mask", "old_logp", "ref_logp", "entropy"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"TokenBatch.{name} has shape {tuple(value.shape)}, but logp has {shape}; "
                    "every per-token tensor must be shaped [batch, time] like logp"
                )
        adv_shape = tuple(self.advantages.shape)
        if adv_shape not in (shape, shape[:1]):
            raise ValueError(
                f"TokenBatch.advantages has shape {adv_shape}; allowed: [batch] = {shape[:1]} "
                f"or [batch, time] = {shape}"
            )
        for name in ("logp", "behavior_logp", "advantages", "old_logp", "ref_logp", "entropy",
                     "topk_logp", "topk_behavior_logp"):
            value = getattr(self, name)
            if value is not None and not value.is_floating_point():
                raise ValueError(
                    f"TokenBatch.{name} has dtype {value.dtype}; it must be a floating-point "
                    "tensor (float32, bfloat16, float16 or float64)"
                )
        if self.mask.is_complex():
            raise ValueError("TokenBatch.mask must be bool, integer or float 0/1; got complex")
        topk = (self.topk_logp, self.topk_behavior_logp)
        if (topk[0] is None) != (topk[1] is None):
            raise ValueError(
                "TokenBatch.topk_logp and TokenBatch.topk_behavior_logp go together: "
                "give both or neither"
            )
        if topk[0] is not None and topk[1] is not None:
            if topk[0].dim() != 3 or tuple(topk[0].shape[:2]) != shape:
                raise ValueError(
                    f"TokenBatch.topk_logp has shape {tuple(topk[0].shape)}; "
                    f"it must be [batch, time, K] with [batch, time] = {shape}"
                )
            if topk[0].shape != topk[1].shape:
                raise ValueError(
                    f"TokenBatch.topk_behavior_logp has shape {tuple(topk[1].shape)}, "
                    f"but topk_logp has {tuple(topk[0].shape)}; they must match"
                )

    def check_values(self) -> None:
        """Check the values that :meth:`validate` cannot see without reading the tensors:
        finite inputs (:meth:`check_finite`), log-probs ≤ :data:`LOGP_TOLERANCE` and a mask of
        0 and 1 only. Raises ``ValueError`` naming what is wrong.

        Synchronises with the device, so strategies call it on their first batch only; call it
        yourself to check every batch. Masked-out positions are ignored.
        """
        if self.mask.dtype != torch.bool:
            mask = self.mask.detach()
            fractional = (mask != 0) & (mask != 1)
            count = int(fractional.sum())
            if count:
                example = mask[fractional].flatten()[0].item()
                raise ValueError(
                    f"TokenBatch.mask must hold only 0 and 1 (or be bool); {count} value(s) are "
                    f"neither, e.g. {example!r}. A mask selects tokens, it does not weight "
                    "them: weight tokens through the advantages"
                )
        self.check_finite()
        valid = self.bool_mask()
        problems = []
        for name in _LOGP_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            value = value.detach()
            where = valid[..., None] if name.startswith("topk_") else valid
            above = (value > LOGP_TOLERANCE) & where
            count = int(above.sum())
            if count:
                problems.append(f"{name}: {count} value(s) > 0, largest "
                                f"{float(value[above].max()):.4g}")
        if problems:
            raise ValueError(
                "TokenBatch log-probs must be ≤ 0 (a probability is at most 1; values up to "
                f"{LOGP_TOLERANCE:g} are allowed for rounding) — " + "; ".join(problems)
                + ". Pass log-probabilities (log_softmax of the logits, gathered at the "
                "sampled ids), not logits or probabilities."
            )

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming every input that holds NaN or inf, with counts.

        Synchronises with the device, so strategies call it on their first batch only; call it
        yourself to check every batch. Masked-out positions are ignored: padding may hold
        anything.
        """
        valid = self.bool_mask()
        problems = []
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None or field.name == "mask" or not value.is_floating_point():
                continue
            value = value.detach()
            if field.name == "advantages" and value.dim() == 1:
                bad = ~torch.isfinite(value) & valid.any(dim=1)
            elif field.name.startswith("topk_"):
                # -inf marks an unused top-K slot; only NaN and +inf are errors there.
                bad = (torch.isnan(value) | (value == float("inf"))) & valid[..., None]
            else:
                bad = ~torch.isfinite(value) & valid
            count = int(bad.sum())
            if count:
                nan = int((torch.isnan(value) & bad).sum())
                problems.append(f"{field.name}: {count} non-finite value(s) ({nan} NaN)")
        if problems:
            raise ValueError(
                "TokenBatch holds non-finite values on unmasked tokens — "
                + "; ".join(problems)
                + ". Every input must be finite where mask is 1."
            )
