"""Per-token log-probabilities and entropies straight from logits, without a full log-softmax.

For logits ``x ∈ R^V`` of one row::

    lse(x)    = log Σ_j exp(x_j)
    log p_t   = x_t − lse(x)
    H(x)      = −Σ_j p_j log p_j = lse(x) − Σ_j p_j x_j

The naive ``torch.log_softmax(logits.float(), -1).gather(...)`` materialises two float32 copies
of the whole ``[..., V]`` tensor (the upcast and the log-softmax) and keeps one alive for the
backward pass. Here the leading dimensions are flattened to ``N`` rows and processed in chunks of
rows: each chunk is upcast to float32 on its own, only the per-row ``lse`` (``[N]``) and a
reference to the logits (no copy) are saved, and the backward pass recomputes the softmax chunk by
chunk, writing straight into one gradient buffer in the logits' dtype. For contiguous logits the
only full-size tensor ever allocated is that gradient, which autograd needs anyway (non-contiguous
logits are first copied to contiguous rows, in their own dtype).

Results are float32 (float64 for float64 logits) whatever the logits' dtype.

Token ids are range-checked when they live on the CPU. On accelerators the check is skipped, since
it would synchronise with the host; an id ``≥ V`` then trips the gather kernel's own assertion, and
``gather_logprobs`` treats every negative id as an unused slot.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "gather_logprobs", "token_entropy", "token_logprobs"]

DEFAULT_CHUNK_ELEMENTS = 2**24
"""Default chunk: ``max(1, 2**24 // V)`` rows, i.e. at most 64 MiB per float32 temporary."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}"
        )
    return chunk_size


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(
            f"logits must have a floating-point dtype (bfloat16, float16, float32, float64), "
            f"got {logits.dtype}"
        )
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have shape [..., V] with V >= 1, got shape {tuple(logits.shape)}"
        )


def _check_ids(ids: Tensor, logits: Tensor, expected: tuple[int, ...], name: str, low: int) -> None:
    if not isinstance(ids, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (e.g. torch.long), got {ids.dtype}")
    if tuple(ids.shape) != expected:
        raise ValueError(
            f"{name} has shape {tuple(ids.shape)}, expected {expected} "
            f"for logits of shape {tuple(logits.shape)}"
        )
    if ids.device != logits.device:
        raise ValueError(f"{name} is on {ids.device} but logits are on {logits.device}")
    if ids.device.type == "cpu" and ids.numel() > 0:
        vocab = logits.shape[-1]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < low or hi >= vocab:
            allowed = f"[{low}, {vocab})" + (" (-1 marks an unused slot)" if low < 0 else "")
            raise ValueError(
                f"{name} must lie in {allowed} for vocabulary size {vocab}, "
                f"got values in [{lo}, {hi}]"
            )


class _GatherLogSoftmax(torch.autograd.Function):
    """``out[n, k] = x[n, ids[n, k]] − lse(x[n])`` for 2-D logits; ``ids < 0`` gives −inf.

    Backward: ``∂out[n, k]/∂x[n, j] = 1[j = ids[n, k]] − p[n, j]``, so with upstream ``g``::

        grad[n, :] = scatter_add(ids[n], g[n]) − p[n, :] · Σ_k g[n, k]

    written chunk by chunk into one buffer in the logits' dtype (unused slots contribute nothing).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, ids: Tensor, chunk_rows: int) -> Tensor:
        acc = _acc_dtype(logits.dtype)
        n = logits.shape[0]
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            lse[rows] = torch.logsumexp(logits[rows].to(acc), dim=-1)
        unused = ids < 0
        safe_ids = ids.clamp(min=0)
        out = logits.gather(1, safe_ids).to(acc).sub_(lse[:, None])
        out.masked_fill_(unused, float("-inf"))
        ctx.save_for_backward(logits, safe_ids, unused, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, safe_ids, unused, lse = ctx.saved_tensors
        chunk_rows: int = ctx.chunk_rows
        g = grad_out.to(lse.dtype).masked_fill(unused, 0.0)
        g_total = g.sum(dim=-1)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = torch.sub(logits[rows], lse[rows, None])  # new tensor in acc dtype
            chunk.exp_().mul_(g_total[rows, None].neg())
            chunk.scatter_add_(1, safe_ids[rows], g[rows])
            grad[rows] = chunk
        return grad, None, None


class _Entropy(torch.autograd.Function):
    """``H[n] = −Σ_j p[n, j] log p[n, j]`` for 2-D logits.

    Backward: ``∂H/∂x_j = −p_j (log p_j + H)`` (0 where ``p_j = 0``), chunk by chunk.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, chunk_rows: int) -> Tensor:
        acc = _acc_dtype(logits.dtype)
        n = logits.shape[0]
        lse = torch.empty(n, dtype=acc, device=logits.device)
        entropy = torch.empty(n, dtype=acc, device=logits.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            x = logits[rows].to(acc)  # may alias the logits for float32: never modified in place
            chunk_lse = torch.logsumexp(x, dim=-1)
            logp = torch.sub(x, chunk_lse[:, None])
            p = logp.exp()
            plogp = logp.mul_(p).masked_fill_(p == 0, 0.0)  # 0·log 0 = 0, also for −inf logits
            lse[rows] = chunk_lse
            entropy[rows] = plogp.sum(dim=-1).neg_()
        ctx.save_for_backward(logits, lse, entropy)
        ctx.chunk_rows = chunk_rows
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        logits, lse, entropy = ctx.saved_tensors
        chunk_rows: int = ctx.chunk_rows
        g = grad_out.to(lse.dtype)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logp = torch.sub(logits[rows], lse[rows, None])  # new tensor in acc dtype
            p = logp.exp()
            chunk = logp.add_(entropy[rows, None]).mul_(p).masked_fill_(p == 0, 0.0)
            grad[rows] = chunk.mul_(g[rows, None].neg())
        return grad, None


def gather_logprobs(
    logits: Tensor, token_ids_k: Tensor, *, chunk_size: int | None = None
) -> Tensor:
    """Log-probabilities of several tokens per position: ``log softmax(logits)[..., ids[..., k]]``.

    Args:
        logits: ``[..., V]``, any floating dtype. Not copied (unless non-contiguous).
        token_ids_k: ``[..., K]`` integer ids in ``[0, V)``; ``-1`` marks an unused slot.
        chunk_size: rows (flattened leading positions) per chunk; default ``max(1, 2**24 // V)``.

    Returns:
        ``[..., K]`` log-probabilities, float32 (float64 for float64 logits). Unused slots are
        −inf and pass no gradient back. Differentiable w.r.t. ``logits``.
    """
    _check_logits(logits)
    vocab = logits.shape[-1]
    if not isinstance(token_ids_k, Tensor) or token_ids_k.ndim != logits.ndim:
        got = tuple(token_ids_k.shape) if isinstance(token_ids_k, Tensor) else token_ids_k
        raise ValueError(
            f"token_ids_k must be a tensor of shape [..., K] matching logits' leading dims "
            f"{tuple(logits.shape[:-1])}, got {got!r}"
        )
    k = token_ids_k.shape[-1]
    _check_ids(token_ids_k, logits, (*logits.shape[:-1], k), "token_ids_k", low=-1)
    rows = _chunk_rows(vocab, chunk_size)
    n = math.prod(logits.shape[:-1])
    out = _GatherLogSoftmax.apply(logits.reshape(n, vocab), token_ids_k.reshape(n, k).long(), rows)
    return out.view(*logits.shape[:-1], k)


def token_logprobs(logits: Tensor, token_ids: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Log-probability of one token per position: ``logits[..., t] − logsumexp(logits[..., :])``.

    Equal to ``torch.log_softmax(logits.float(), -1).gather(-1, token_ids[..., None])[..., 0]``
    but never materialises a float32 copy of the whole logits, forward or backward.

    Args:
        logits: ``[..., V]``, any floating dtype. Not copied (unless non-contiguous).
        token_ids: ``[...]`` integer ids in ``[0, V)``, same leading shape as ``logits``.
        chunk_size: rows (flattened leading positions) per chunk; default ``max(1, 2**24 // V)``.

    Returns:
        ``[...]`` log-probabilities, float32 (float64 for float64 logits), differentiable w.r.t.
        ``logits``.
    """
    _check_logits(logits)
    vocab = logits.shape[-1]
    _check_ids(token_ids, logits, tuple(logits.shape[:-1]), "token_ids", low=0)
    rows = _chunk_rows(vocab, chunk_size)
    out = _GatherLogSoftmax.apply(logits.reshape(-1, vocab), token_ids.reshape(-1, 1).long(), rows)
    return out.view(logits.shape[:-1])


def token_entropy(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy of ``softmax(logits)`` per position: ``H = −Σ_j p_j log p_j``.

    Gradient ``∂H/∂x_j = −p_j (log p_j + H)``; entries with ``p_j = 0`` (e.g. −inf logits)
    contribute 0 to ``H`` and get a zero gradient.

    Args:
        logits: ``[..., V]``, any floating dtype. Not copied (unless non-contiguous).
        chunk_size: rows (flattened leading positions) per chunk; default ``max(1, 2**24 // V)``.

    Returns:
        ``[...]`` entropies in nats, float32 (float64 for float64 logits).
    """
    _check_logits(logits)
    vocab = logits.shape[-1]
    rows = _chunk_rows(vocab, chunk_size)
    out = _Entropy.apply(logits.reshape(-1, vocab), rows)
    return out.view(logits.shape[:-1])
