"""The policy sharded across processes with FSDP2, and what must see whole tensors when it is.

Under Lightning's ``ModelParallelStrategy`` (``data_parallel_size`` = the number of processes,
``tensor_parallel_size: 1``), :meth:`TrustRegionModule.configure_model
<trustregion.module.TrustRegionModule.configure_model>` calls :func:`shard_model` on the policy:
``torch.distributed.fsdp.fully_shard`` makes each decoder layer one unit, whose parameters are
gathered for its own forward and backward only, then the model itself (embeddings, final norm
and the output head, tied or not). Each process keeps ``1 / world_size`` of every weight,
gradient and optimiser moment. Gradients are reduce-scattered as a mean over processes, as under
DDP.

The behaviour and reference models are never sharded: every process holds a whole copy. The
behaviour model is the inference engine each process samples its own prompts with, and the
reference is frozen; both only run forward. Nothing is broadcast: every process must build the
same models (pretrained weights, or a seeded run), and :func:`differing_models` finds those that
differ so that training refuses them. ``fully_shard`` keeps its default mixed-precision policy
(parameters and gradient reductions in the parameters' dtype); the trainer's ``precision``
(``bf16-mixed`` autocast, ``bf16-true``) applies as on one process. Held-out evaluation
generates with the sharded policy, every process stepping together
(:func:`~trustregion.evaluation.evaluate_share` with ``synced=True``).

Four things need the whole policy, and get it here:

- the behaviour sync: :func:`full_state_dict` gathers the full weights on every process;
- gradient clipping: :func:`clip_grad_norm` clips by the norm of the whole gradient, the same on
  every process;
- the non-finite weight check: :func:`nonfinite_counts` counts over whole tensors;
- gradient accumulation: :func:`gradient_sync_skipped` keeps a micro-batch's gradients local
  (no reduce-scatter under FSDP, no all-reduce under DDP) until the last micro-batch of an
  optimiser step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from trustregion.validation import require

__all__ = [
    "SUPPORTED_STRATEGIES",
    "check_fsdp_layout",
    "check_strategy",
    "clip_grad_norm",
    "decoder_layers",
    "differing_models",
    "full_state_dict",
    "gradient_sync_skipped",
    "is_sharded",
    "nonfinite_counts",
    "shard_model",
]


SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
"""The trainer strategies the module trains under: one device, DDP (``ddp``, ``ddp_spawn``) and
FSDP2 through ``ModelParallelStrategy``."""


def check_strategy(strategy: Strategy) -> None:
    """Refuse a trainer strategy the module cannot train under. Lightning's own ``fsdp``
    (FSDP1) and DeepSpeed would wrap the whole module, the frozen and quantised behaviour and
    reference models included, and clip each process's gradient shard by its own norm.

    >>> check_strategy(SingleDeviceStrategy("cpu"))
    """
    require(isinstance(strategy, SUPPORTED_STRATEGIES),
            f"trainer.strategy {type(strategy).__name__} is not supported; use one process "
            "(trainer.strategy: auto), ddp / ddp_spawn, or FSDP2 through "
            "lightning.pytorch.strategies.ModelParallelStrategy (examples/configs/fsdp.yaml; "
            "Lightning's 'fsdp' strategy is FSDP1)")


def check_fsdp_layout(world_size: int, tensor_parallel_size: int) -> None:
    """Refuse process layouts FSDP training cannot use: one process (nothing to shard across)
    and tensor parallelism (the policy is sharded over data-parallel processes only).

    >>> check_fsdp_layout(2, 1)
    >>> check_fsdp_layout(1, 1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: FSDP (ModelParallelStrategy) shards the policy across processes and needs at \
least 2; trainer.devices × trainer.num_nodes gives 1. Use more devices, or train on one ...
    """
    require(world_size >= 2,
            "FSDP (ModelParallelStrategy) shards the policy across processes and needs at "
            f"least 2; trainer.devices × trainer.num_nodes gives {world_size}. Use more "
            "devices, or train on one process with the default strategy (trainer.strategy: auto)")
    require(tensor_parallel_size == 1,
            f"ModelParallelStrategy's tensor_parallel_size must be 1 (the policy is sharded "
            f"with FSDP over data-parallel processes only); got {tensor_parallel_size}. Set "
            f"tensor_parallel_size: 1 and data_parallel_size: {world_size} (the number of "
            "processes)")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the members of its longest ``nn.ModuleList`` (a Hugging
    Face decoder's ``layers``); empty when it has none."""
    lists = [list(m) for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else []


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model` (``fully_shard``)."""
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh: DeviceMesh) -> bool:
    """Shard ``model`` over the processes of ``mesh`` with FSDP2: each decoder layer, then the
    model. Returns False, changing nothing, when it is sharded already."""
    if is_sharded(model):
        return False
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return True


def differing_models(models: Mapping[str, nn.Module | None],
                     group: dist.ProcessGroup | None = None,
                     device: torch.device | str | None = None) -> list[str]:
    """The names of ``models`` whose weights differ between the processes of ``group`` (a
    collective: every process must call it with the same names). Each model's state is reduced
    to a float64 checksum per process (the sum and the sum of squares of every tensor in its
    ``state_dict``, quantised ones included), and checksums are compared across processes on
    ``device`` (the process's own device: NCCL reduces only CUDA tensors; default: where the
    weights are); None entries are skipped."""
    names = [name for name, model in models.items() if model is not None]
    if not names:
        return []
    sums = torch.stack([_checksum(cast(nn.Module, models[name])) for name in names])
    if device is not None:
        sums = sums.to(device)
    highest, lowest = sums.clone(), sums.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=group)
    differs = (highest != lowest).tolist()
    return [name for name, differ in zip(names, differs, strict=True) if differ]


def _checksum(model: nn.Module) -> Tensor:
    tensors = [t for t in model.state_dict().values() if isinstance(t, Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for tensor in tensors:
        values = torch.nan_to_num(tensor.detach().to(torch.float64))
        total += torch.stack([values.sum(), values.square().sum()]).to(device)
    return total.sum()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict with whole tensors: gathered from every process when the model is
    sharded (a collective: every process must call it), its own ``state_dict()`` otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: value for name, value in state.items() if isinstance(value, Tensor)}


def nonfinite_counts(tensors: Sequence[Tensor]) -> Tensor:
    """The number of NaN and ±inf entries of each of ``tensors``, over whole tensors when some
    are sharded (DTensors): one all-reduce for all of them, so every process must call it with
    the same tensors. Returns an int64 tensor on the first tensor's device.

    >>> nonfinite_counts([torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")] * 2)])
    tensor([1, 2])
    """
    require(len(tensors) > 0, "nonfinite_counts needs at least one tensor; got none")
    device = tensors[0].device
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    counts = torch.stack([(~torch.isfinite(t)).sum().to(device) for t in local])
    sharded = [i for i, t in enumerate(tensors)
               if isinstance(t, DTensor) and any(p.is_shard() for p in t.placements)]
    if sharded:
        mesh = cast(DTensor, tensors[sharded[0]]).device_mesh
        shares = torch.zeros_like(counts)
        shares[sharded] = counts[sharded]
        dist.all_reduce(shares, group=mesh.get_group())
        counts[sharded] = shares[sharded]
    return counts


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients of ``parameters`` so that their global 2-norm is at most
    ``max_norm``; return the norm before clipping.

    The same as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``,
    at most 1), but the norm is over the whole gradient when parameters are sharded (DTensors):
    a plain tensor, the same on every process, and so is the coefficient. Parameters without a
    gradient are skipped; a non-finite norm is returned as it is (the gradients are then
    multiplied by NaN, to be dropped by the caller).

    >>> a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    >>> a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    >>> clip_grad_norm([a, b], 1.0)  # √(3² + 4²) = 5
    tensor(5.)
    >>> torch.round(torch.cat([a.grad, b.grad]), decimals=4)  # × 1 / (5 + 1e-6)
    tensor([0.6000, 0.0000, 0.8000])
    """
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    plain = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    squares: list[Tensor] = []
    if sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded])  # type: ignore[misc]
        squares.append(norm.full_tensor().square() if isinstance(norm, DTensor)
                       else norm.square())
    if plain:
        norm = torch.nn.utils.get_total_norm([p.grad for p in plain])  # type: ignore[misc]
        squares.append(norm.square())
    total = squares[0].sqrt() if len(squares) == 1 else \
        torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


@contextmanager
def gradient_sync_skipped(strategy: Strategy, model: nn.Module) -> Iterator[None]:
    """Inside, backward passes accumulate gradients on each process without synchronising
    them; the first backward after it synchronises everything accumulated. ``model`` is the
    trained model: sharded (FSDP2: ``set_requires_gradient_sync``), or under a
    data-parallel strategy (DDP: the strategy's ``block_backward_sync``); otherwise a no-op."""
    if is_sharded(model):
        assert isinstance(model, FSDPModule)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(strategy, ParallelStrategy):
        with strategy.block_backward_sync():
            yield
    else:
        yield
