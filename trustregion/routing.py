"""Mixture-of-experts routing: record the behaviour's expert choices and replay them.

In a mixture-of-experts (MoE) model every layer's router sends each token to its top-k experts.
The behaviour model samples with its own numerics (bf16, int8, FP8, a stale copy), so its router
can pick a different expert set than the policy's router picks for the same token in the
training forward. A flipped expert changes the hidden state, so the policy's recomputed
log-prob of the token moves although no weight changed: drift that no update caused.

**Routing replay** removes that part of the mismatch. While the behaviour generates, each MoE
layer's chosen expert indices are recorded for every position it processes (the whole prompt at
prefill, then one position per decode step), and stored on the rollout
(:attr:`trustregion.rollout.Rollout.routing`, ``[N, layers, positions, top_k]``). In the
policy's forward over the same sequences the router still computes its logits, and the gating
weights are still its softmax, taken over the replayed experts and renormalised as the family
does, so gradients reach the router; only the expert *set* is the behaviour's. The last position
of a sequence is never fed to the behaviour (nothing is sampled after it); there the policy
keeps its own choice, which affects no completion log-prob.

Supported router modules (transformers 5): :data:`SUPPORTED_ROUTERS`. They all return
``(router_logits, gating_weights, expert_indices)``; replay runs through forward hooks on them,
so the models' own code runs unchanged.

Example:
    >>> import transformers
    >>> from trustregion.models import build_char_tokenizer
    >>> from trustregion.models.architectures import tiny_config
    >>> model = transformers.AutoModelForCausalLM.from_config(
    ...     tiny_config("qwen3_moe", len(build_char_tokenizer()), num_hidden_layers=2))
    >>> len(moe_routers(model)), routing_dtype(model)
    (2, torch.int8)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from trustregion.functional.drift import kl_k3, log_ratio, tv
from trustregion.functional.logprobs import token_logprobs
from trustregion.validation import number_in, require

if TYPE_CHECKING:
    from trustregion.rollout import Rollout

__all__ = [
    "SUPPORTED_ROUTERS",
    "RolloutDrift",
    "RoutingRecorder",
    "check_routing_replay",
    "moe_routers",
    "own_routing",
    "recording_routing",
    "replaying_routing",
    "rollout_drift",
    "routed_positions",
    "routing_agreement",
    "routing_bytes_per_token",
    "routing_dtype",
]

SUPPORTED_ROUTERS: dict[str, type[nn.Module]] = {
    "qwen3_moe": Qwen3MoeTopKRouter,
    "mixtral": MixtralTopKRouter,
    "olmoe": OlmoeTopKRouter,
}
"""Model family → the transformers router class whose choices can be recorded and replayed."""


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The supported MoE routers of ``model``, one per MoE layer, in module order."""
    kinds = tuple(SUPPORTED_ROUTERS.values())
    return [module for module in model.modules() if isinstance(module, kinds)]


def check_routing_replay(model: nn.Module) -> list[nn.Module]:
    """The routers of ``model`` (:func:`moe_routers`); ``ValueError`` if it has none, naming the
    supported families."""
    routers = moe_routers(model)
    if not routers:
        unknown = sorted({type(m).__name__ for m in model.modules()
                          if type(m).__name__.endswith(("Router", "SparseMoeBlock", "MoE"))})
        found = (f"; its MoE modules ({', '.join(unknown)}) are not supported"
                 if unknown else " (a dense model has no routing to replay)")
        raise ValueError(
            f"routing_replay needs a mixture-of-experts model with a supported router, but "
            f"{type(model).__name__} has none{found}. Supported families: "
            f"{', '.join(SUPPORTED_ROUTERS)}; set routing_replay: false for other models")
    return routers


def routing_dtype(model: nn.Module) -> torch.dtype:
    """The smallest signed integer dtype that holds every expert index of ``model``."""
    experts = max(int(getattr(r, "num_experts", 0)) for r in check_routing_replay(model))
    for dtype in (torch.int8, torch.int16):
        if experts - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def routing_bytes_per_token(model: nn.Module) -> int:
    """Bytes the routing record takes per token: layers × top_k × the index dtype's size."""
    routers = check_routing_replay(model)
    return sum(int(getattr(r, "top_k", 0)) for r in routers) * routing_dtype(model).itemsize


class RoutingRecorder:
    """The expert indices each router chose, forward call by forward call, while active; see
    :func:`recording_routing`."""

    def __init__(self, routers: list[nn.Module], rows: int, dtype: torch.dtype) -> None:
        self.rows = rows
        self.dtype = dtype
        self.calls: list[list[Tensor]] = [[] for _ in routers]

    def hook(self, layer: int) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            indices = output[2]
            self.calls[layer].append(indices.detach().reshape(self.rows, -1, indices.shape[-1])
                                     .to(self.dtype))
        return record

    def expand(self, repeats: int) -> None:
        """Repeat each row of what was recorded so far ``repeats`` times, adjacent
        (``repeat_interleave``), and expect ``rows × repeats`` rows from the next forward pass
        on: a sampler that prefills each prompt once and then samples its group calls this
        between the prefill and the first decode step."""
        self.calls = [[call.repeat_interleave(repeats, dim=0) for call in calls]
                      for calls in self.calls]
        self.rows *= repeats

    def routing(self) -> Tensor:
        """``[rows, layers, positions, top_k]``: every recorded position, in call order."""
        require(all(self.calls), "no forward pass was recorded")
        return torch.stack([torch.cat(calls, dim=1) for calls in self.calls], dim=1)


@contextmanager
def recording_routing(model: nn.Module, rows: int) -> Iterator[RoutingRecorder]:
    """Record the expert indices of every forward pass of ``model`` over ``rows`` sequences
    inside the block (a prefill over the prompts and each decode step of ``generate`` append
    their positions; :meth:`RoutingRecorder.expand` repeats the rows recorded so far)."""
    routers = check_routing_replay(model)
    recorder = RoutingRecorder(routers, rows, routing_dtype(model))
    handles = [r.register_forward_hook(recorder.hook(i)) for i, r in enumerate(routers)]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def _renormalises(router: nn.Module) -> bool:
    """Whether the family divides the top-k gating weights by their sum (Mixtral always does;
    Qwen3-MoE and OLMoE when ``norm_topk_prob``)."""
    if isinstance(router, MixtralTopKRouter):
        return True
    return bool(getattr(router, "norm_topk_prob", False))


@dataclass
class _Replay:
    router: nn.Module
    experts: Tensor  # [rows, recorded positions, top_k]

    def __call__(self, module: nn.Module, args: Any, output: Any) -> tuple[Tensor, Tensor, Tensor]:
        logits, weights, own = output
        rows, recorded, top_k = self.experts.shape
        tokens = own.numel() // own.shape[-1]
        # the forward runs over the recorded sequences: each row holds the recorded positions,
        # plus the last completion token, which the behaviour never fed back
        require(own.shape[-1] == top_k and tokens in (rows * recorded, rows * (recorded + 1)),
                f"the routing record holds {rows} rows of {recorded} positions of top-{top_k} "
                f"choices, but the router chose {own.shape[-1]} experts for {tokens} tokens; "
                f"a replayed forward must run over the same {rows} rows with {recorded} or "
                f"{recorded + 1} positions each ({rows * recorded} or {rows * (recorded + 1)} "
                "tokens): replay each micro-batch with the routing of the rows it holds "
                "(Rollout.select)")
        own = own.reshape(rows, -1, top_k)
        chosen = own.clone()
        chosen[:, :recorded] = self.experts.to(own.dtype)
        chosen = chosen.reshape(-1, top_k)
        probs = torch.softmax(logits.float(), dim=-1)
        gates = probs.gather(-1, chosen)
        if _renormalises(self.router):
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, gates.to(weights.dtype), chosen


@contextmanager
def replaying_routing(model: nn.Module, routing: Tensor) -> Iterator[None]:
    """Inside the block, ``model``'s routers use the experts in ``routing``
    (``[rows, layers, positions, top_k]``, as recorded) for the first ``positions`` positions of
    every forward pass over ``rows`` sequences; the one position after them, the last
    completion token, keeps the router's own choice. A forward over other rows or other lengths
    raises ``ValueError``. Gating weights are the router's softmax over the replayed experts,
    renormalised as the family does."""
    routers = check_routing_replay(model)
    require(routing.dim() == 4 and routing.shape[1] == len(routers),
            f"routing must be [rows, {len(routers)} layers, positions, top_k]; got shape "
            f"{tuple(routing.shape)}")
    handles = [r.register_forward_hook(_Replay(r, routing[:, i].long()))
               for i, r in enumerate(routers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def own_routing(model: PreTrainedModel, rollout: Rollout) -> tuple[Tensor, Tensor]:
    """``model``'s expert choices in its forward over ``rollout``'s sequences, as
    ``[N, layers, P + T, top_k]``, and the logits of that forward
    (:func:`~trustregion.rollout.completion_logits`). Run it inside :func:`replaying_routing`
    to see the replayed choices."""
    from trustregion.rollout import completion_logits  # the rollout module records with ours

    with recording_routing(model, len(rollout)) as recorder:
        logits = completion_logits(model, rollout)
    return recorder.routing(), logits


def routed_positions(prompt_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """``[N, P + T − 1]`` True at the positions a routing record covers that hold a real token:
    the prompt's tokens and every counted completion token but the last column."""
    return torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1).bool()


def routing_agreement(first: Tensor, second: Tensor, positions: Tensor) -> Tensor:
    """Fraction of (token, layer) routing decisions where ``first`` and ``second``
    (``[N, layers, S, top_k]``, S ≥ the columns of ``positions``) chose the same expert set,
    over the True entries of ``positions`` (``[N, S']``, see :func:`routed_positions`).

    Example (one token, two layers; the second layer's set differs):
        >>> a = torch.tensor([[[[0, 1]], [[2, 3]]]]); b = torch.tensor([[[[1, 0]], [[2, 4]]]])
        >>> float(routing_agreement(a, b, torch.tensor([[True]])))
        0.5
    """
    columns = positions.shape[1]
    same = (first[:, :, :columns].sort(-1).values == second[:, :, :columns].sort(-1).values)
    same = same.all(-1)  # [N, layers, S']
    mask = positions[:, None, :].expand_as(same)
    require(bool(mask.any()), "positions selects no token")
    return same[mask].float().mean()


@dataclass(frozen=True)
class RolloutDrift:
    """How far a policy's recomputed log-probs are from the behaviour's on one rollout, over its
    counted completion tokens (:mod:`trustregion.functional.drift`).

    Attributes:
        tokens: counted completion tokens.
        tv: mean |π − μ| of the sampled tokens.
        kl_k3: mean k3 = 1/r − 1 + log r, r = π/μ (the drift monitor's estimator).
        abs_log_ratio: mean |log π − log μ|.
        max_abs_log_ratio: largest |log π − log μ|.
        routing_agreement: fraction of (token, layer) routing decisions where the policy chose
            the behaviour's expert set, over prompt and completion tokens
            (:func:`routing_agreement`); None without a routing record.
    """

    tokens: int
    tv: float
    kl_k3: float
    abs_log_ratio: float
    max_abs_log_ratio: float
    routing_agreement: float | None


@torch.no_grad()
def rollout_drift(policy: PreTrainedModel, rollout: Rollout, *, temperature: float = 1.0,
                  replay: bool = False) -> RolloutDrift:
    """The drift between ``rollout``'s behaviour log-probs and ``policy``'s recomputed ones at
    ``temperature``; with ``replay``, the policy replays ``rollout.routing``. The routing
    agreement compares ``rollout.routing`` (when recorded) with the experts the policy used.

    Example: see ``benchmarks/moe_drift.py``.
    """
    number_in("temperature", temperature, 0.0)
    require(not replay or rollout.routing is not None,
            "replay=True needs a rollout with a routing record (generate_rollout(..., "
            "record_routing=True))")
    with replaying_routing(policy, rollout.routing) if replay and rollout.routing is not None \
            else _no_replay():
        if rollout.routing is not None:
            used, logits = own_routing(policy, rollout)
            positions = routed_positions(rollout.prompt_mask, rollout.completion_mask)
            agreement: float | None = float(routing_agreement(rollout.routing, used, positions))
        else:
            from trustregion.rollout import completion_logits

            logits, agreement = completion_logits(policy, rollout), None
    logp = token_logprobs(logits / temperature, rollout.completion_ids)
    mask = rollout.completion_mask
    log_r = log_ratio(logp, rollout.behavior_logp)[mask]
    return RolloutDrift(
        tokens=int(mask.sum()),
        tv=float(tv(logp, rollout.behavior_logp)[mask].mean()),
        kl_k3=float(kl_k3(logp, rollout.behavior_logp)[mask].mean()),
        abs_log_ratio=float(log_r.abs().mean()),
        max_abs_log_ratio=float(log_r.abs().max()),
        routing_agreement=agreement)


@contextmanager
def _no_replay() -> Iterator[None]:
    yield
