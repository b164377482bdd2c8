"""Completion logits with each prompt computed once and almost no padded positions, exactly.

Two shared forwards compute the logits that predict a micro-batch's completion tokens:

* the **packed forward** (:mod:`trustregion.packing`, used where it applies): every distinct
  prompt and the completion tokens of its rows in one forward over a few packed rows, with a
  tree attention mask;
* the **shared-cache forward** described below (:func:`shared_prefix_logits`), for models whose
  attention takes no custom mask (one that mixes sliding-window and full layers, say).

The straightforward forward (:func:`~trustregion.rollout.completion_logits`) runs every row's
whole sequence, prompt then completion, left-padded to ``[N, P + T]``. In a GRPO rollout the G
completions of a group share one prompt, so it computes each prompt G times, and every completion
shorter than the longest adds padded positions. The shared-prefix forward computes the same
logits in pieces:

1. **Each distinct prompt once.** The distinct prompt rows of a micro-batch (``torch.unique``
   over the prompt ids and mask) run in forwards that fill a key/value cache, grouped by prompt
   length like the completions below, each over its group's last columns; the logits at the
   last prompt position predict completion token 0 of every row with that prompt.
2. **Keys and values expanded to the rows.** Each cached layer's keys and values are indexed to
   the rows that share the prompt (``index_select``), so every row's gradient flows back through
   them into the one prompt forward.
3. **Only the completion tokens that predict a later token, bucketed by length.** A row whose
   completion has L counted tokens needs the logits of its first L − 1 tokens. Rows are grouped
   by L, longest first, into buckets whose padded positions are at most ``max_padding`` of the
   positions a bucket runs (:func:`length_buckets`); each bucket runs over the expanded cache
   with the concatenated attention mask and the position ids the full forward uses.

**Why it is exact.** In a causal decoder the hidden state at a position depends only on the
tokens at and before it, so a prompt's keys and values are the same whatever completion follows.
Position ids and the attention mask are the full forward's, and the cache keeps the prompt's
column layout, so a sliding attention window covers the same keys. Only the order of
floating-point operations changes. A position after a row's last counted token (after its EOS)
gets the value 0 in every per-token result, instead of the full forward's value for a token that
is masked everywhere anyway.

:class:`PrefixSharing` decides per model which shared forward applies — a decoder-only Hugging
Face causal LM whose forward takes a cache, ``position_ids`` and ``logits_to_keep`` — and
compares it once with the full forward on a small fixed batch, the packed forward first. Where
neither applies, where the comparisons fail, or where a mixture-of-experts routing record
differs between rows that share a prompt, the full forward is used, and the log says so once.

Example (three prompts of a group of two):
    >>> length_buckets([4, 4, 3, 1, 2, 4], max_padding=0.05)
    [Bucket(rows=(0, 1, 5), columns=3), Bucket(rows=(2,), columns=2), Bucket(rows=(4,), columns=1)]
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from trustregion.functional.logprobs import gather_logprobs, token_entropy, token_logprobs
from trustregion.packing import DEFAULT_ROW_TOKENS, packed_logits
from trustregion.rollout import Rollout, completion_logits
from trustregion.routing import replaying_routing
from trustregion.validation import boolean, integer_at_least, number_in

__all__ = [
    "PROBE_TOLERANCE",
    "Bucket",
    "LogitPiece",
    "PositionCount",
    "PrefixSharing",
    "TokenLogits",
    "distinct_prompts",
    "length_buckets",
    "padding_buckets",
    "prompt_routing_agrees",
    "shared_prefix_logits",
    "sharing_order",
    "unsupported_reason",
]

PROBE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
"""Largest ``max |Δ logit| / max |logit|`` between the shared and the full forward that the
one-time check accepts, by the logits' dtype. Reordering moves an fp32 logit by about 1e-6 of
the logits' scale; fp16 rounds each operation to 2⁻¹¹ ≈ 5e-4 and bf16 to 2⁻⁸ ≈ 4e-3 of a value,
and a few layers of reordered sums compound that about tenfold. A wrong position, mask or cache
moves logits by tens of per cent of their scale, far above every tolerance."""

FullForward = Callable[[PreTrainedModel, Rollout], Tensor]

DEFAULT_MAX_UNIT_TOKENS = 128
"""Default ``PrefixSharing(max_unit_tokens=...)``."""

PACKED_METHODS = {"packed": "boolean", "packed_additive": "additive"}
"""The packed forward's methods, tried in this order, and the mask each hands the model."""


@dataclass(frozen=True)
class PositionCount:
    """Positions that forward passes processed, and how many of them were padding.

    >>> PositionCount(100, 4) + PositionCount(50, 1)
    PositionCount(positions=150, padding=5)
    """

    positions: int = 0
    padding: int = 0

    @property
    def padding_fraction(self) -> float:
        """``padding / positions`` (0 before any position)."""
        return self.padding / self.positions if self.positions else 0.0

    def __add__(self, other: PositionCount) -> PositionCount:
        return PositionCount(self.positions + other.positions, self.padding + other.padding)


@dataclass(frozen=True)
class Bucket:
    """Rows whose completions run in one forward over ``columns`` completion tokens."""

    rows: tuple[int, ...]
    columns: int


def padding_buckets(needs: list[int], max_padding: float) -> list[Bucket]:
    """Rows grouped into forward passes: row ``i`` needs ``needs[i]`` positions (rows needing
    none get no bucket). Rows are taken longest first and added to the current bucket while
    its padded positions stay at most ``max_padding`` of the positions it runs (rows ×
    columns, columns = its longest need); then a new bucket starts.

    >>> padding_buckets([4, 2, 4, 3], max_padding=0.1)  # 3 rows × 4 columns: 1 padded ≤ 1.2
    [Bucket(rows=(0, 2, 3), columns=4), Bucket(rows=(1,), columns=2)]
    """
    number_in("max_padding", max_padding, 0.0, 1.0, low_inclusive=True, high_inclusive=False)
    order = sorted((i for i, need in enumerate(needs) if need >= 1), key=lambda i: -needs[i])
    buckets: list[Bucket] = []
    rows: list[int] = []
    columns = padded = 0
    for row in order:
        if rows and padded + columns - needs[row] <= max_padding * (len(rows) + 1) * columns:
            rows.append(row)
            padded += columns - needs[row]
            continue
        if rows:
            buckets.append(Bucket(tuple(rows), columns))
        rows, columns, padded = [row], needs[row], 0
    if rows:
        buckets.append(Bucket(tuple(rows), columns))
    return buckets


def length_buckets(lengths: list[int], max_padding: float) -> list[Bucket]:
    """The completion forwards of rows with ``lengths`` counted completion tokens: a row of
    ``L`` tokens runs its first ``L − 1`` (:func:`padding_buckets` of ``L − 1``).

    >>> length_buckets([5, 3, 5, 2], max_padding=0.0)
    [Bucket(rows=(0, 2), columns=4), Bucket(rows=(1,), columns=2), Bucket(rows=(3,), columns=1)]
    """
    return padding_buckets([max(n - 1, 0) for n in lengths], max_padding)


@dataclass(frozen=True)
class LogitPiece:
    """Logits ``[B, C, V]`` of rows ``rows`` (``[B]``) predicting completion columns
    ``start`` to ``start + C − 1``; or, with ``columns`` (``[M]``), logits ``[M, V]``
    predicting the tokens ``(rows[i], columns[i])`` one by one (the packed forward's)."""

    rows: Tensor
    start: int
    logits: Tensor
    columns: Tensor | None = None


@dataclass(frozen=True)
class TokenLogits:
    """The logits that predict each token of an ``[n, T]`` completion layout, held in pieces
    (one dense ``[n, T, V]`` piece for the full forward), and per-token results built from them
    without a second ``[n, T, V]`` tensor.

    Per-token results (:meth:`token_logprobs`, :meth:`entropy`, :meth:`gather`) are ``[n, T]``
    (``[n, T, K]``); with pieces, positions outside ``mask`` are 0. Gradients flow into each
    piece's logits."""

    pieces: tuple[LogitPiece, ...]
    mask: Tensor
    dense: bool = False

    @classmethod
    def full(cls, logits: Tensor, mask: Tensor) -> TokenLogits:
        """The full forward's ``[n, T, V]`` logits as they are."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        return cls((LogitPiece(rows, 0, logits),), mask, dense=True)

    def scaled(self, temperature: float) -> TokenLogits:
        """Every logit divided by ``temperature``."""
        return replace(self, pieces=tuple(replace(p, logits=p.logits / temperature)
                                          for p in self.pieces))

    def detached(self) -> TokenLogits:
        """The same logits, cut from the autograd graph."""
        return replace(self, pieces=tuple(replace(p, logits=p.logits.detach())
                                          for p in self.pieces))

    def per_token(self, reduce: Callable[[Tensor, Tensor | None], Tensor],
                  inputs: Tensor | None = None) -> Tensor:
        """``reduce(logits [B, C, V], inputs [B, C, ...] or None) → [B, C, ...]`` applied to
        each piece, with ``inputs`` (``[n, T, ...]``, e.g. token ids) cut to the piece's rows
        and columns, and scattered into ``[n, T, ...]``."""
        if self.dense:
            return reduce(self.pieces[0].logits, inputs)
        n, length = self.mask.shape
        width = max([length] + [p.start + p.logits.shape[1] for p in self.pieces])
        if inputs is not None and width > length:
            pad = [0, 0] * (inputs.dim() - 2) + [0, width - length]
            inputs = F.pad(inputs, pad)
        out: Tensor | None = None
        for piece in self.pieces:
            if piece.columns is not None:
                cut = None if inputs is None else inputs[piece.rows, piece.columns][:, None]
                values = reduce(piece.logits[:, None], cut)[:, 0]
                index: tuple[Tensor, Tensor] = (piece.rows, piece.columns)
                trailing = values.shape[1:]
            else:
                columns = torch.arange(piece.start, piece.start + piece.logits.shape[1],
                                       device=piece.rows.device)
                cut = None if inputs is None else inputs[piece.rows][:, columns]
                values = reduce(piece.logits, cut)
                index = (piece.rows[:, None], columns[None, :])
                trailing = values.shape[2:]
            if out is None:
                out = values.new_zeros((n, width, *trailing))
            out = out.index_put(index, values)
        assert out is not None
        out = out[:, :length]
        mask = self.mask.reshape(*self.mask.shape, *([1] * (out.dim() - 2)))
        return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def token_logprobs(self, ids: Tensor) -> Tensor:
        """``[n, T]`` log-probs of ``ids``
        (:func:`~trustregion.functional.logprobs.token_logprobs`)."""
        return self.per_token(lambda logits, cut: token_logprobs(logits, _given(cut)), ids)

    def entropy(self) -> Tensor:
        """``[n, T]`` entropies (:func:`~trustregion.functional.logprobs.token_entropy`)."""
        return self.per_token(lambda logits, _: token_entropy(logits))

    def gather(self, ids: Tensor) -> Tensor:
        """``[n, T, K]`` log-probs of ``ids`` ``[n, T, K]``, ``-1`` an unused slot
        (:func:`~trustregion.functional.logprobs.gather_logprobs`)."""
        return self.per_token(lambda logits, cut: gather_logprobs(logits, _given(cut)), ids)


def _given(inputs: Tensor | None) -> Tensor:
    assert inputs is not None
    return inputs


def distinct_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(first, inverse)``: the first row of each distinct prompt (``[U]``) and each row's
    distinct prompt (``[n]``), found from the prompt ids and mask."""
    key = torch.cat([prompt_ids.long(), prompt_mask.long()], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((int(inverse.max()) + 1,), len(key), device=key.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def sharing_order(prompt_ids: Tensor, prompt_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """``[n]`` sort keys that order rows by prompt, then by completion length, so that
    consecutive rows share a prompt and a length."""
    _, inverse = distinct_prompts(prompt_ids, prompt_mask)
    lengths = completion_mask.long().sum(-1)
    return inverse * (completion_mask.shape[1] + 1) + lengths


def prompt_routing_agrees(routing: Tensor, prompt_ids: Tensor, prompt_mask: Tensor) -> bool:
    """Whether rows with the same prompt recorded the same expert choices at its tokens
    (``routing`` ``[n, layers, positions, top_k]``), so that one row's record replays them
    all."""
    first, inverse = distinct_prompts(prompt_ids, prompt_mask)
    recorded = routing[:, :, :prompt_ids.shape[1]]
    same = (recorded == recorded[first][inverse]).all(-1).all(1)  # [n, P]
    return bool((same | ~prompt_mask.bool()).all())


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot run the shared-prefix forward, or None when it can: it must be a
    decoder-only Hugging Face causal LM whose forward takes a cache (``cache`` or
    ``past_key_values``), ``position_ids`` and ``logits_to_keep``."""
    if not isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} is not a Hugging Face PreTrainedModel"
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    parameters = inspect.signature(model.forward).parameters
    missing = [name for name in ("position_ids", "logits_to_keep") if name not in parameters]
    if _cache_keyword(model) is None:
        missing.insert(0, "cache (or past_key_values)")
    if missing:
        return f"the forward of {type(model).__name__} takes no {', '.join(missing)}"
    return None


def _cache_keyword(model: nn.Module) -> str | None:
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _is_sharded(model: nn.Module) -> bool:
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _replaying(model: nn.Module, routing: Tensor | None) -> Any:
    return replaying_routing(model, routing) if routing is not None else nullcontext()


def shared_prefix_logits(model: PreTrainedModel, rollout: Rollout, *,
                         routing: Tensor | None = None, max_padding: float = 0.05,
                         single_forward: bool = False) -> tuple[TokenLogits, PositionCount]:
    """``model``'s logits predicting ``rollout``'s completion tokens through the shared-prefix
    forward (see the module's description), and the positions its forward passes processed.

    Args:
        routing: a mixture-of-experts routing record to replay (``[n, layers, P + T − 1,
            top_k]``); rows that share a prompt must agree on it (:func:`prompt_routing_agrees`).
        max_padding: the largest share of padded positions in a forward over prompts or
            completions.
        single_forward: run all prompts in one forward and all completions in one forward
            padded to the longest (at least one position), so that every process makes the
            same forward calls (FSDP).
    """
    keyword = _cache_keyword(model)
    if keyword is None:
        raise ValueError(unsupported_reason(model) or "the forward takes no cache")
    prompt_ids, prompt_mask = rollout.prompt_ids, rollout.prompt_mask.bool()
    completion_ids, completion_mask = rollout.completion_ids, rollout.completion_mask.bool()
    n, prompt_width = prompt_ids.shape
    length = completion_ids.shape[1]
    first, inverse = distinct_prompts(prompt_ids, prompt_mask)
    prompts = _prompt_pass(model, keyword, prompt_ids[first], prompt_mask[first],
                           None if routing is None else routing[first][:, :, :prompt_width],
                           max_padding=max_padding, single_forward=single_forward)
    count = prompts.count
    distinct_mask = prompt_mask[first][:, prompt_width - prompts.width:]
    pieces = [LogitPiece(torch.arange(n, device=prompt_ids.device), 0, prompts.last[inverse])]
    layers = prompts.layers

    lengths = [int(n) for n in completion_mask.sum(-1).tolist()]
    if single_forward:
        buckets = [Bucket(tuple(range(n)), max(1, max(lengths) - 1))]
    else:
        buckets = length_buckets(lengths, max_padding)
    width = max([length] + [1 + b.columns for b in buckets])
    positions = (torch.cat([prompt_mask, completion_mask], dim=1).long().cumsum(-1) - 1)
    positions = positions.clamp(min=0)[:, prompt_width:]
    if width > length:  # a forward of one position where every completion has one token
        extra = width - length
        completion_ids = F.pad(completion_ids, (0, extra))
        completion_mask = F.pad(completion_mask, (0, extra))
        positions = torch.cat([positions, positions[:, -1:].expand(n, extra)], dim=1)
    for bucket in buckets:
        rows = torch.tensor(bucket.rows, device=prompt_ids.device)
        columns = bucket.columns
        shared = inverse[rows]
        expanded = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            expanded.update(keys.index_select(0, shared), values.index_select(0, shared), index)
        attention = torch.cat([distinct_mask[shared], completion_mask[rows, :columns]], dim=1)
        replay = None
        if routing is not None:
            replay = routing[rows][:, :, prompt_width:min(prompt_width + columns,
                                                          routing.shape[2])]
        with _replaying(model, replay):
            logits = model(input_ids=completion_ids[rows, :columns],
                           attention_mask=attention.long(),
                           position_ids=positions[rows, :columns],
                           use_cache=True, logits_to_keep=0, **{keyword: expanded}).logits
        pieces.append(LogitPiece(rows, 1, logits))
        real = sum(min(max(lengths[r] - 1, 0), columns) for r in bucket.rows)
        count = count + PositionCount(len(bucket.rows) * columns,
                                      len(bucket.rows) * columns - real)
    return TokenLogits(tuple(pieces), rollout.completion_mask.bool()), count


@dataclass(frozen=True)
class _Prompts:
    last: Tensor  # [U, 1, V] the logits at each distinct prompt's last position
    layers: list[tuple[Tensor, Tensor]]  # per layer, keys and values [U, heads, width, dim]
    width: int  # the prompt columns the cache holds: the last ``width`` of the layout
    count: PositionCount


def _prompt_pass(model: PreTrainedModel, keyword: str, ids: Tensor, mask: Tensor,
                 routing: Tensor | None, *, max_padding: float,
                 single_forward: bool) -> _Prompts:
    """Run the distinct prompts ``ids``/``mask`` (``[U, P]``, left-padded) in forwards grouped
    by length (:func:`padding_buckets`; one forward with ``single_forward``), each over its
    group's last columns. The caches are left-padded with zeros to a common width, which the
    attention mask hides, so that every key keeps its column in the left-padded layout."""
    distinct, prompt_width = ids.shape
    lengths = [int(n) for n in mask.sum(-1).tolist()]
    if min(lengths) < 1:
        raise ValueError("every prompt must hold at least one token")
    groups = ([Bucket(tuple(range(distinct)), max(lengths))] if single_forward
              else padding_buckets(lengths, max_padding))
    width = max(g.columns for g in groups)
    count = PositionCount()
    lasts: list[Tensor] = []
    caches: list[list[tuple[Tensor, Tensor]]] = []
    for group in groups:
        rows = torch.tensor(group.rows, device=ids.device)
        start = prompt_width - group.columns
        group_mask = mask[rows, start:]
        cache = DynamicCache()
        with _replaying(model, None if routing is None else routing[rows][:, :, start:]):
            logits = model(input_ids=ids[rows, start:], attention_mask=group_mask.long(),
                           position_ids=(group_mask.long().cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=1, **{keyword: cache}).logits
        lasts.append(logits[:, -1:])
        layers: list[tuple[Tensor, Tensor]] = []
        for layer in cache.layers:
            if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
                raise ValueError(f"the prompt forward left a {type(layer).__name__} cache layer "
                                 "without keys and values to expand")
            pad = (0, 0, width - group.columns, 0)
            layers.append((F.pad(layer.keys, pad), F.pad(layer.values, pad)))
        if not layers:
            raise ValueError("the prompt forward left the key/value cache empty")
        caches.append(layers)
        real = sum(lengths[r] for r in group.rows)
        count = count + PositionCount(len(group.rows) * group.columns,
                                      len(group.rows) * group.columns - real)
    # back from group order to the distinct prompts' order
    order = torch.tensor([r for g in groups for r in g.rows], device=ids.device)
    back = torch.empty_like(order)
    back[order] = torch.arange(distinct, device=ids.device)
    last = torch.cat(lasts)[back]
    merged = [(torch.cat([c[i][0] for c in caches])[back],
               torch.cat([c[i][1] for c in caches])[back]) for i in range(len(caches[0]))]
    return _Prompts(last, merged, width, count)


def _probe_batch(vocab: int, device: torch.device) -> Rollout:
    """Two prompts of 4 and 2 tokens, three completions each, of 4, 1, 3, 2, 4 and 3 tokens:
    fixed token ids, the same on every process."""
    prompt_ids = ((torch.arange(8) * 5 + 7) % vocab).reshape(2, 4)
    prompt_mask = torch.tensor([[True] * 4, [False, False, True, True]])
    prompt_ids = torch.where(prompt_mask, prompt_ids, 0).repeat_interleave(3, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(3, dim=0)
    completion_ids = ((torch.arange(24) * 11 + 3) % vocab).reshape(6, 4)
    completion_mask = torch.arange(4)[None, :] < torch.tensor([4, 1, 3, 2, 4, 3])[:, None]
    return Rollout(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
                   completion_ids=completion_ids.to(device),
                   completion_mask=completion_mask.to(device),
                   behavior_logp=torch.zeros(6, 4, device=device), examples=[], completions=[])


def _every_process(flag: bool, device: torch.device, sharded: bool) -> bool:
    """``flag`` on every process (True only where it is True everywhere) when ``sharded``."""
    if not (sharded and dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


class PrefixSharing:
    """Which forward computes a model's completion logits: the packed forward
    (:func:`~trustregion.packing.packed_logits`) where it applies and was checked, else the
    shared-cache forward (:func:`shared_prefix_logits`) where that applies and was checked,
    else the full forward.

    Args:
        enabled: share prompts where a shared forward applies; False always uses the full
            forward.
        max_padding: the shared-cache forward's largest share of padded positions in one
            forward, in [0, 1).
        row_tokens: the packed forward's smallest row (:data:`~trustregion.packing.
            DEFAULT_ROW_TOKENS`).
        max_unit_tokens: a micro-batch in which a prompt with its rows' completion tokens
            takes more positions than this runs the shared-cache forward where it applies:
            attention over a packed row costs its length squared, while the shared-cache
            forward attends each completion only to its own sequence (long completions).

    The packed forward makes one forward call per micro-batch. With a policy sharded by FSDP
    every process must make the same forward calls, so there the shared-cache forward (a
    prompt forward, then a completion forward) runs only without gradient (a second forward
    call with gradient would add a gradient exchange); decisions are taken on every process
    alike.

    ``counted`` holds the positions that the forward passes run with ``count=True`` processed,
    and how many of them were padding, over the object's life.
    """

    def __init__(self, enabled: bool = True, *, max_padding: float = 0.05,
                 row_tokens: int = DEFAULT_ROW_TOKENS,
                 max_unit_tokens: int = DEFAULT_MAX_UNIT_TOKENS) -> None:
        self.enabled = boolean("enabled", enabled)
        self.max_padding = number_in("max_padding", max_padding, 0.0, 1.0, low_inclusive=True,
                                     high_inclusive=False)
        self.row_tokens = integer_at_least("row_tokens", row_tokens, 1)
        self.max_unit_tokens = integer_at_least("max_unit_tokens", max_unit_tokens, 1)
        self.counted = PositionCount()
        self._verdicts: weakref.WeakKeyDictionary[nn.Module, str | None] = \
            weakref.WeakKeyDictionary()
        self._cache_verdicts: weakref.WeakKeyDictionary[nn.Module, bool] = \
            weakref.WeakKeyDictionary()
        self._noted: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # the per-model decisions are keyed by live models: a copy in another process decides
        # again for its own models
        state = dict(self.__dict__)
        state["_verdicts"] = state["_cache_verdicts"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._verdicts = weakref.WeakKeyDictionary()
        self._cache_verdicts = weakref.WeakKeyDictionary()

    def method(self, model: PreTrainedModel, *, full_forward: FullForward = completion_logits,
               device: torch.device | None = None) -> str | None:
        """The forward used for ``model``, decided (and checked against ``full_forward``) on
        first use: ``"packed"`` (boolean mask), ``"packed_additive"`` (additive mask),
        ``"cache"`` or None (the full forward)."""
        if not self.enabled:
            return None
        device = device or next(model.parameters()).device
        return self._verdict(model, _is_sharded(model), device, full_forward)

    def logits(self, model: PreTrainedModel, rollout: Rollout, *, temperature: float = 1.0,
               routing: Tensor | None = None, count: bool = False,
               full_forward: FullForward = completion_logits) -> TokenLogits:
        """``model``'s logits predicting ``rollout``'s completion tokens, divided by
        ``temperature``, replaying ``routing`` when given. ``full_forward`` is the
        straightforward forward used where sharing does not apply and checked against once."""
        sharded = _is_sharded(model)
        device = rollout.prompt_ids.device
        method = self.method(model, full_forward=full_forward, device=device)
        if method == "cache" and sharded and torch.is_grad_enabled():
            method = None
            self._note("sharded", "prefix sharing is off for the forward passes with gradient "
                       "of a sharded (FSDP) policy: a second forward call of its layers per "
                       "micro-batch would add a gradient exchange per optimiser step; the "
                       "update uses the full forward, the old and reference log-probs still "
                       "share prompts")
        if method is not None and routing is not None:
            agrees = _every_process(prompt_routing_agrees(routing, rollout.prompt_ids,
                                                        rollout.prompt_mask), device, sharded)
            if not agrees:
                method = None
                self._note("routing", "prefix sharing is skipped for micro-batches whose rows "
                           "with the same prompt recorded different expert choices for it; "
                           "their log-probs come from the full forward")
        if method is None:
            with _replaying(model, routing):
                logits = full_forward(model, rollout) / temperature
            if count:
                processed = rollout.prompt_mask.numel() + rollout.completion_mask.numel()
                real = int(rollout.prompt_mask.sum()) + int(rollout.completion_mask.sum())
                self.counted = self.counted + PositionCount(processed, processed - real)
            return TokenLogits.full(logits, rollout.completion_mask.bool())
        if method in PACKED_METHODS and not sharded and self._units_too_long(rollout) \
                and self._cache_applies(model, device, full_forward):
            method = "cache"
        if method in PACKED_METHODS:
            shared, positions = self._packed(model, rollout, routing,
                                             PACKED_METHODS[method])
        else:
            shared, positions = shared_prefix_logits(
                model, rollout, routing=routing, max_padding=self.max_padding,
                single_forward=sharded)
        if count:
            self.counted = self.counted + positions
        return shared.scaled(temperature)

    def _units_too_long(self, rollout: Rollout) -> bool:
        """Whether some prompt with its rows' completion tokens (a packed unit) is longer than
        ``max_unit_tokens``: attention over a packed row costs its length squared, while the
        shared-cache forward attends each completion only to its own sequence."""
        _, inverse = distinct_prompts(rollout.prompt_ids, rollout.prompt_mask)
        fed = (rollout.completion_mask.long().sum(-1) - 1).clamp(min=0)
        units = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=fed.device)
        prompts = units.scatter_reduce(0, inverse, rollout.prompt_mask.long().sum(-1),
                                       reduce="amax")
        longest = (prompts + units.scatter_add(0, inverse, fed)).max()
        return bool(longest > self.max_unit_tokens)

    def _cache_applies(self, model: PreTrainedModel, device: torch.device,
                       full_forward: FullForward) -> bool:
        if model not in self._cache_verdicts:
            reason = unsupported_reason(model) or self._probe(model, False, device,
                                                              full_forward, packed=None)
            self._cache_verdicts[model] = reason is None
        return self._cache_verdicts[model]

    def _packed(self, model: PreTrainedModel, rollout: Rollout, routing: Tensor | None,
                mask_kind: str) -> tuple[TokenLogits, PositionCount]:
        first, inverse = distinct_prompts(rollout.prompt_ids, rollout.prompt_mask)
        layout, logits = packed_logits(model, rollout, first, inverse, routing=routing,
                                       row_tokens=self.row_tokens, mask_kind=mask_kind)
        rows, width = layout.shape
        piece = LogitPiece(layout.target_rows, 0, logits, columns=layout.target_columns)
        return (TokenLogits((piece,), rollout.completion_mask.bool()),
                PositionCount(rows * width, rows * width - layout.real))

    def _verdict(self, model: PreTrainedModel, sharded: bool, device: torch.device,
                 full_forward: FullForward) -> str | None:
        if model in self._verdicts:
            return self._verdicts[model]
        reason = unsupported_reason(model)
        packed_reason = reason
        method: str | None = None
        for kind in PACKED_METHODS:
            if reason is None:
                packed_reason = self._probe(model, sharded, device, full_forward, packed=kind)
            if _every_process(packed_reason is None, device, sharded):
                method = kind
                break
        if method is None:
            if packed_reason is None:
                packed_reason = "the check against the full forward failed on another process"
            if reason is None:
                reason = self._probe(model, sharded, device, full_forward, packed=None)
            if not _every_process(reason is None, device, sharded) and reason is None:
                reason = "the check against the full forward failed on another process"
            method = "cache" if reason is None else None
            if method is None and packed_reason != reason:
                reason = f"{packed_reason}; {reason}"
            if method == "cache":
                self._note(f"packed:{id(model)}",
                           f"the packed forward is off for {type(model).__name__}: "
                           f"{packed_reason}; prompts are shared through a key/value cache")
        self._verdicts[model] = method
        if method is None:
            self._note(f"model:{id(model)}",
                       f"prefix sharing is off for {type(model).__name__}: {reason}; its "
                       "log-probs come from the full forward (every prompt computed for each "
                       "of its completions)")
        return method

    def _probe(self, model: PreTrainedModel, sharded: bool, device: torch.device,
               full_forward: FullForward, *, packed: str | None) -> str | None:
        batch = _probe_batch(int(model.config.get_text_config().vocab_size), device)
        kind = "packed forward" if packed else "forward over a shared key/value cache"
        try:
            with torch.no_grad():
                full = full_forward(model, batch)
                if packed is not None:
                    shared, _ = self._packed(model, batch, None, PACKED_METHODS[packed])
                else:
                    shared, _ = shared_prefix_logits(model, batch, single_forward=sharded)
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError,
                KeyError, NotImplementedError) as err:
            return f"its {kind} failed ({type(err).__name__}: {err})"
        mask = batch.completion_mask
        worst = torch.zeros((), dtype=torch.float64, device=device)
        for piece in shared.pieces:
            if piece.columns is not None:
                diff = (piece.logits.double() - full[piece.rows, piece.columns].double()).abs()
                worst = torch.maximum(worst, diff.max())
                continue
            columns = torch.arange(piece.start, piece.start + piece.logits.shape[1],
                                   device=device)
            keep = columns < mask.shape[1]
            rows, columns = piece.rows, columns[keep]
            counted = mask[rows][:, columns]
            diff = (piece.logits[:, keep].double() - full[rows][:, columns].double()).abs()
            worst = torch.maximum(worst, diff.amax(-1)[counted].max() if counted.any() else worst)
        scale = full.double().abs()[mask].max().clamp(min=1e-12)
        relative = float(worst / scale)
        tolerance = PROBE_TOLERANCE.get(full.dtype, PROBE_TOLERANCE[torch.float32])
        if not relative <= tolerance:
            return (f"its {kind} gives logits that differ from the full forward's by "
                    f"{relative:.3g} of their scale (more than {tolerance:g}) on a fixed check "
                    "batch")
        return None

    def _note(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            rank_zero_info(message)
