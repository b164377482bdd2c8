"""Completion logits from one packed forward: each prompt once, no padding between sequences.

The straightforward forward (:func:`~trustregion.rollout.completion_logits`) runs every row's
prompt and completion, left-padded to ``[n, P + T]``. In a GRPO micro-batch the completions of a
group share their prompt, and completions of different lengths leave padded positions. The
packed forward lays the micro-batch out as *units*, one per distinct prompt: the prompt's tokens,
then the completion tokens of every row with that prompt that predict a later token (a completion
of ``L`` counted tokens feeds its first ``L − 1``). Units are packed first-fit-decreasing into a
few rows of ``C = max(longest unit, row_tokens)`` positions (:func:`pack_units`), and one forward
runs them with a custom attention mask (a tree mask)::

    token i attends token j  ⇔  same unit, j at or before i, and j is a prompt token or belongs
                                to the same completion as i  (and, for a sliding-window model,
                                pos_i − pos_j < window)

with each token's position id its position in its own sequence (``prompt length + t`` for
completion token ``t``). Every token therefore sees exactly the keys it sees in the full forward,
so the logits are the same up to the order of floating-point operations; only the rows' tail
padding is wasted. The logits predicting completion token 0 are the last prompt token's, shared
by the unit's rows; gradients flow back into the one copy of each prompt.

Mixture-of-experts routing records are replayed token by token (:func:`packed_routing`). The
mask is passed to the model as an already-prepared 4-D mask, which Hugging Face decoders using
``create_causal_mask`` take as it is; :class:`~trustregion.prefix_sharing.PrefixSharing` checks
the packed forward against the full forward once per model and falls back where it differs.

Example (units of 6, 3 and 5 positions, rows of at least 8: rows of 8 would hold 6 | 5 3, 16
slots for 14 positions; one row of 14 wastes none):
    >>> pack_units([6, 3, 5], row_tokens=8)
    ([0, 0, 0], [0, 11, 6], 14)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

from trustregion.rollout import Rollout
from trustregion.routing import replaying_routing
from trustregion.validation import integer_at_least, one_of

__all__ = [
    "DEFAULT_ROW_TOKENS",
    "MASK_KINDS",
    "PackedLayout",
    "pack_units",
    "packed_layout",
    "packed_logits",
    "packed_routing",
    "sliding_window_of",
    "tree_attention_mask",
]

DEFAULT_ROW_TOKENS = 256
"""Smallest packed row: short units share rows up to this many positions. Attention over a row
costs ``O(C²)``; at 256 positions it stays small next to the model's matrix multiplies."""


def _first_fit_decreasing(lengths: list[int], capacity: int
                          ) -> tuple[list[int], list[int], list[int]]:
    fill: list[int] = []
    row_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    for unit in sorted(range(len(lengths)), key=lambda u: -lengths[u]):
        row = next((r for r, used in enumerate(fill) if used + lengths[unit] <= capacity), None)
        if row is None:
            row = len(fill)
            fill.append(0)
        row_of[unit], offset_of[unit] = row, fill[row]
        fill[row] += lengths[unit]
    return row_of, offset_of, fill


def pack_units(lengths: list[int], row_tokens: int = DEFAULT_ROW_TOKENS
               ) -> tuple[list[int], list[int], int]:
    """First-fit-decreasing packing of units of ``lengths`` positions into rows. Returns each
    unit's row, its offset in the row, and the width of the packed rows (the fullest row's
    fill).

    The row capacity is the one among ``base = max(max(lengths), row_tokens)`` and 32 steps up
    to ``2 · base`` that leaves the fewest padded positions (rows × width − Σ lengths); ties go
    to the smaller capacity, whose attention is cheaper.
    """
    integer_at_least("row_tokens", row_tokens, 1)
    base = max(max(lengths), row_tokens)
    best: tuple[int, list[int], list[int], int] | None = None
    for capacity in range(base, 2 * base + 1, max(1, base // 32)):
        row_of, offset_of, fill = _first_fit_decreasing(lengths, capacity)
        slots = len(fill) * max(fill)
        if best is None or slots < best[0]:
            best = (slots, row_of, offset_of, max(fill))
        if slots == sum(lengths):
            break
    assert best is not None
    return best[1], best[2], best[3]


@dataclass(frozen=True)
class PackedLayout:
    """Where every token of a micro-batch sits in the packed rows ``[R, C]`` (flat index
    ``r · C + c``).

    Attributes:
        input_ids, position_ids: ``[R, C]`` (0 at padded slots).
        unit, segment: ``[R, C]`` each slot's unit (−1 padding) and segment (0 the prompt,
            ``i + 1`` row ``i``'s completion).
        source_row, source_column: ``[R, C]`` the slot's token in the ``[n, P + T]`` layout
            (prompt columns, then completion columns).
        target_rows, target_columns, predictor: ``[M]`` every counted completion token
            ``(row, column)`` and the flat slot whose logits predict it.
        real: slots holding a token.
    """

    input_ids: Tensor
    position_ids: Tensor
    unit: Tensor
    segment: Tensor
    source_row: Tensor
    source_column: Tensor
    target_rows: Tensor
    target_columns: Tensor
    predictor: Tensor
    real: int

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.input_ids.shape
        return int(rows), int(width)


def packed_layout(rollout: Rollout, first: Tensor, inverse: Tensor,
                  row_tokens: int = DEFAULT_ROW_TOKENS) -> PackedLayout:
    """The packed layout of ``rollout`` whose rows have distinct prompts ``first`` (one row
    per distinct prompt) and ``inverse`` (each row's distinct prompt), from
    :func:`~trustregion.prefix_sharing.distinct_prompts`."""
    prompt_mask = rollout.prompt_mask.bool().cpu()
    completion_mask = rollout.completion_mask.bool().cpu()
    first_rows, inverse_rows = first.cpu().tolist(), inverse.cpu().tolist()
    prompt_width = prompt_mask.shape[1]
    prompt_lengths = prompt_mask.sum(-1).tolist()
    fed = (completion_mask.sum(-1) - 1).clamp(min=0).tolist()
    members: list[list[int]] = [[] for _ in first_rows]
    for row, unit in enumerate(inverse_rows):
        members[unit].append(row)
    lengths = [prompt_lengths[first_rows[u]] + sum(fed[r] for r in members[u])
               for u in range(len(first_rows))]
    row_of, offset_of, width = pack_units(lengths, row_tokens)
    rows = max(row_of) + 1
    slots = rows * width
    src_row, src_col, position = [0] * slots, [0] * slots, [0] * slots
    unit_of, segment = [-1] * slots, [0] * slots
    target_rows: list[int] = []
    target_cols: list[int] = []
    predictors: list[int] = []
    counted = completion_mask.sum(-1).tolist()
    for unit, prompt_row in enumerate(first_rows):
        start = row_of[unit] * width + offset_of[unit]
        length = prompt_lengths[prompt_row]
        end = start + length
        src_row[start:end] = [prompt_row] * length
        src_col[start:end] = range(prompt_width - length, prompt_width)
        position[start:end] = range(length)
        unit_of[start:end] = [unit] * length
        last_prompt = end - 1
        cursor = end
        for row in members[unit]:
            count = fed[row]
            end = cursor + count
            src_row[cursor:end] = [row] * count
            src_col[cursor:end] = range(prompt_width, prompt_width + count)
            position[cursor:end] = range(length, length + count)
            unit_of[cursor:end] = [unit] * count
            segment[cursor:end] = [row + 1] * count
            target_rows.extend([row] * counted[row])
            target_cols.extend(range(counted[row]))
            predictors.append(last_prompt)
            predictors.extend(range(cursor, cursor + counted[row] - 1))
            cursor = end
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    device = ids.device

    def grid(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device).view(rows, width)

    unit_grid, row_grid, column_grid = grid(unit_of), grid(src_row), grid(src_col)
    input_ids = torch.where(unit_grid >= 0, ids[row_grid, column_grid], 0)
    return PackedLayout(
        input_ids=input_ids, position_ids=grid(position), unit=unit_grid,
        segment=grid(segment), source_row=row_grid, source_column=column_grid,
        target_rows=torch.tensor(target_rows, dtype=torch.long, device=device),
        target_columns=torch.tensor(target_cols, dtype=torch.long, device=device),
        predictor=torch.tensor(predictors, dtype=torch.long, device=device), real=sum(lengths))


def tree_attention_mask(layout: PackedLayout, *, dtype: torch.dtype | None = None,
                        sliding_window: int | None = None) -> Tensor:
    """The ``[R, 1, C, C]`` attention mask of ``layout``: boolean (True where a token may
    attend, see the module's description) with ``dtype`` None, else additive in ``dtype`` (0
    where a token may attend, the dtype's lowest value elsewhere), for attention
    implementations that add the mask to the scores. A padded slot attends only itself, so
    that no row of the softmax is empty."""
    unit, segment, position = layout.unit, layout.segment, layout.position_ids
    width = unit.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=unit.device).tril()
    same_unit = (unit[:, :, None] == unit[:, None, :]) & (unit[:, None, :] >= 0)
    visible = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])
    allowed = same_unit & visible & causal
    if sliding_window is not None:
        allowed &= (position[:, :, None] - position[:, None, :]) < sliding_window
    allowed |= torch.eye(width, dtype=torch.bool, device=unit.device) & (unit[:, :, None] < 0)
    if dtype is None:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=unit.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def packed_routing(routing: Tensor, layout: PackedLayout) -> Tensor:
    """A routing record ``[n, layers, P + T − 1, top_k]`` rearranged to the packed slots,
    ``[R, layers, C, top_k]`` (padded slots take expert 0; their outputs are never read)."""
    rows, width = layout.shape
    column = layout.source_column.clamp(max=routing.shape[2] - 1)
    picked = routing[layout.source_row.reshape(-1), :, column.reshape(-1)]  # [R·C, layers, k]
    picked = torch.where((layout.unit.reshape(-1) >= 0)[:, None, None], picked,
                         torch.zeros_like(picked))
    return picked.view(rows, width, *picked.shape[1:]).permute(0, 2, 1, 3).contiguous()


def sliding_window_of(model: PreTrainedModel) -> int | None:
    """The attention window of a model whose every layer uses one, else None."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if kinds == {"sliding_attention"}:
        return int(window)
    if "sliding_attention" not in kinds:
        return None
    raise ValueError(f"{type(model).__name__} mixes sliding-window and full attention layers; "
                     "one packed attention mask cannot serve both")


MASK_KINDS = ("boolean", "additive")
"""How the packed forward hands its mask to the model: ``boolean`` (True: attend; what the sdpa
and flex attention implementations take) or ``additive`` (added to the scores, for the eager
implementation)."""


def packed_logits(model: PreTrainedModel, rollout: Rollout, first: Tensor, inverse: Tensor, *,
                  routing: Tensor | None = None, row_tokens: int = DEFAULT_ROW_TOKENS,
                  mask_kind: str = "boolean") -> tuple[PackedLayout, Tensor]:
    """One packed forward of ``model`` over ``rollout`` (see the module's description).
    Returns the layout and the logits ``[M, V]`` predicting each counted completion token
    ``(layout.target_rows, layout.target_columns)``; ``routing`` is replayed when given;
    ``mask_kind`` is one of :data:`MASK_KINDS`."""
    layout = packed_layout(rollout, first, inverse, row_tokens)
    window = sliding_window_of(model)
    dtype = None
    if one_of("mask_kind", mask_kind, MASK_KINDS) == "additive":
        parameter = next(model.parameters())
        device_type = parameter.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else parameter.dtype)
    mask = tree_attention_mask(layout, dtype=dtype, sliding_window=window)
    rows, width = layout.shape
    columns = torch.unique(layout.predictor % width)
    replay = (replaying_routing(model, packed_routing(routing, layout)) if routing is not None
              else nullcontext())
    # PyTorch's CPU flash-attention kernel returns NaN gradients for long masked rows whose
    # scores are extreme (a policy whose weights blew up), where the full forward's short rows
    # stay finite; the math kernel does not, and at packed-row sizes it costs the same.
    kernel = (sdpa_kernel([SDPBackend.MATH]) if layout.input_ids.device.type == "cpu"
              else nullcontext())
    with replay, kernel:
        logits = model(input_ids=layout.input_ids, attention_mask=mask,
                       position_ids=layout.position_ids, use_cache=False,
                       logits_to_keep=columns).logits  # [R, K, V]
    slot = torch.full((width,), -1, dtype=torch.long, device=columns.device)
    slot[columns] = torch.arange(len(columns), device=columns.device)
    flat = (layout.predictor // width) * len(columns) + slot[layout.predictor % width]
    return layout, logits.reshape(rows * len(columns), -1)[flat]
