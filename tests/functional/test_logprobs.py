from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trustregion.functional.logprobs import gather_logprobs, token_entropy, token_logprobs

B, T, V = 5, 7, 37  # N = 35 rows
CHUNKS = [1, 4, 6, 35, 1000, None]  # 4 and 6 do not divide 35


def _logits(dtype: torch.dtype, *shape: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(*(shape or (B, T, V)), generator=gen, dtype=torch.float64)).to(dtype)


def _ids(*shape: int, vocab: int = V, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape or (B, T), generator=gen)


def _naive_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(acc), -1).gather(-1, ids[..., None])[..., 0]


def _naive_entropy(logits: Tensor) -> Tensor:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc), -1)
    return -(logp.exp() * logp).sum(-1)


def _grad(fn, logits: Tensor, upstream: Tensor) -> Tensor:
    leaf = logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(leaf), leaf, grad_outputs=upstream)
    return grad


# ---------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_token_logprobs_matches_naive(dtype: torch.dtype, chunk_size: int | None) -> None:
    logits, ids = _logits(dtype), _ids()
    out = token_logprobs(logits, ids, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    assert out.shape == (B, T)
    torch.testing.assert_close(out, _naive_logprobs(logits, ids), atol=1e-5, rtol=0)


def test_token_logprobs_at_full_vocabulary_is_within_1e5_of_float64() -> None:
    # 64 rows of bf16 logits with std 3 over V = 49152, as in benchmarks/logprobs.py: log p
    # reaches about −22, where one float32 ulp is 1.9e-6. The exact value is the float64
    # log-softmax of the same bf16 logits. Both float32 computations are a few ulps from it
    # (here: chunked logsumexp 1.0e-6, naive log_softmax 3.5e-6; over the benchmark's 4096
    # rows 1.4e-6 and 1.1e-5), so the 1e-5 tolerance is asserted against the exact value and
    # the two float32 results agree within 2e-5.
    logits, ids = _logits(torch.bfloat16, 64, 49152), _ids(64, vocab=49152)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, ids[:, None])[:, 0]
    ours = token_logprobs(logits, ids)
    assert float((ours.double() - exact).abs().max()) <= 1e-5
    torch.testing.assert_close(ours, _naive_logprobs(logits, ids), atol=2e-5, rtol=0)


def test_token_logprobs_float64_stays_float64() -> None:
    logits, ids = _logits(torch.float64), _ids()
    out = token_logprobs(logits, ids, chunk_size=4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _naive_logprobs(logits, ids), atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_token_logprobs_grad_matches_naive_float64(chunk_size: int | None) -> None:
    logits, ids = _logits(torch.float64), _ids()
    upstream = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = _grad(lambda x: token_logprobs(x, ids, chunk_size=chunk_size), logits, upstream)
    ref = _grad(lambda x: _naive_logprobs(x, ids), logits, upstream)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_grad_in_logits_dtype(dtype: torch.dtype) -> None:
    logits, ids = _logits(dtype), _ids()
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    ours = _grad(lambda x: token_logprobs(x, ids, chunk_size=6), logits, upstream)
    ref = _grad(lambda x: _naive_logprobs(x, ids), logits, upstream)
    assert ours.dtype == dtype
    # Same float32 maths, rounded once to the logits' dtype: at most one ulp apart.
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(ours.double(), ref.double(), atol=1e-6, rtol=ulp)


def test_token_logprobs_gradcheck() -> None:
    logits = _logits(torch.float64, 3, 5).requires_grad_(True)
    ids = torch.tensor([4, 0, 2])
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, chunk_size=2), (logits,))


def test_token_logprobs_grad_flows_through_non_leaf_logits() -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, 8, dtype=torch.float64, generator=gen)
    weight = torch.randn(V, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = _ids()
    ours_loss = token_logprobs(hidden @ weight.T, ids, chunk_size=4).sum()
    (ours,) = torch.autograd.grad(ours_loss, weight)
    (ref,) = torch.autograd.grad(_naive_logprobs(hidden @ weight.T, ids).sum(), weight)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def test_token_logprobs_non_contiguous_and_1d_logits() -> None:
    logits = _logits(torch.float32, T, B, V).transpose(0, 1)  # [B, T, V], not contiguous
    ids = _ids()
    torch.testing.assert_close(
        token_logprobs(logits, ids, chunk_size=4), _naive_logprobs(logits, ids), atol=1e-5, rtol=0
    )
    row, tok = _logits(torch.float32, V), torch.tensor(3)
    out = token_logprobs(row, tok)
    assert out.shape == ()
    torch.testing.assert_close(out, torch.log_softmax(row, -1)[3], atol=1e-6, rtol=0)


def test_token_logprobs_accepts_int32_ids() -> None:
    logits, ids = _logits(torch.float32), _ids()
    torch.testing.assert_close(
        token_logprobs(logits, ids.int()), _naive_logprobs(logits, ids), atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------------- gather_logprobs


def _topk_ids() -> Tensor:
    ids = _ids(B, T, 4)
    ids[..., 1] = ids[..., 0]  # duplicate ids: both slots get the same value, gradients add up
    ids[0, 0, 3] = -1
    ids[2, :, 2:] = -1
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_gather_logprobs_matches_naive(dtype: torch.dtype, chunk_size: int | None) -> None:
    logits, ids = _logits(dtype), _topk_ids()
    unused = ids == -1
    out = gather_logprobs(logits, ids, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    assert out.shape == (B, T, 4)
    assert torch.equal(torch.isneginf(out), unused)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, ids.clamp(min=0))
    torch.testing.assert_close(out[~unused], ref[~unused], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 6, None])
def test_gather_logprobs_grad_ignores_unused_slots(chunk_size: int | None) -> None:
    logits, ids = _logits(torch.float64), _topk_ids()
    unused = ids == -1
    upstream = torch.randn(B, T, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ours = _grad(lambda x: gather_logprobs(x, ids, chunk_size=chunk_size), logits, upstream)
    ref = _grad(
        lambda x: torch.log_softmax(x, -1).gather(-1, ids.clamp(min=0)),
        logits,
        upstream.masked_fill(unused, 0.0),
    )
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    # A row whose slots are all unused gets exactly zero gradient.
    all_unused = torch.full((B, T, 2), -1)
    grad = _grad(lambda x: gather_logprobs(x, all_unused), logits, torch.ones(B, T, 2))
    assert torch.equal(grad, torch.zeros_like(logits))


def test_gather_logprobs_gradcheck() -> None:
    logits = _logits(torch.float64, 3, 5).requires_grad_(True)
    ids = torch.tensor([[4, 1], [0, -1], [2, 2]])
    fn = lambda x: gather_logprobs(x, ids, chunk_size=2).masked_fill(ids == -1, 0.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


def test_gather_logprobs_k1_equals_token_logprobs() -> None:
    logits, ids = _logits(torch.bfloat16), _ids()
    assert torch.equal(gather_logprobs(logits, ids[..., None])[..., 0], token_logprobs(logits, ids))


# ---------------------------------------------------------------------------- token_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_token_entropy_matches_naive(dtype: torch.dtype, chunk_size: int | None) -> None:
    logits = _logits(dtype)
    out = token_entropy(logits, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    assert out.shape == (B, T)
    torch.testing.assert_close(out, _naive_entropy(logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_token_entropy_grad_matches_naive_float64(chunk_size: int | None) -> None:
    logits = _logits(torch.float64)
    upstream = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours = _grad(lambda x: token_entropy(x, chunk_size=chunk_size), logits, upstream)
    ref = _grad(_naive_entropy, logits, upstream)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


def test_token_entropy_gradcheck() -> None:
    logits = _logits(torch.float64, 3, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_size=2), (logits,))


def test_token_entropy_known_values() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    out = token_entropy(logits)
    torch.testing.assert_close(out, torch.tensor([torch.log(torch.tensor(4.0)).item(), 0.0]))


def test_token_entropy_with_masked_vocab() -> None:
    logits = _logits(torch.float64, 4, 6)
    masked = logits.clone()
    masked[:, 4:] = float("-inf")
    ours_value = token_entropy(masked, chunk_size=3)
    torch.testing.assert_close(ours_value, _naive_entropy(logits[:, :4]), atol=1e-12, rtol=0)
    upstream = torch.ones(4, dtype=torch.float64)
    ours = _grad(lambda x: token_entropy(x, chunk_size=3), masked, upstream)
    ref = _grad(_naive_entropy, logits[:, :4], upstream)
    assert torch.equal(ours[:, 4:], torch.zeros(4, 2, dtype=torch.float64))
    torch.testing.assert_close(ours[:, :4], ref, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- memory behaviour


class _AllocationLog(TorchDispatchMode):
    """Records (op, dtype, numel, storage) of every tensor produced while active."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, torch.dtype, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                ptr = t.untyped_storage().data_ptr()
                self.outputs.append((str(func), t.dtype, t.numel(), ptr))
        return out

    def storages(self, min_numel: int) -> set[tuple[torch.dtype, int]]:
        return {(dt, ptr) for _, dt, n, ptr in self.outputs if n >= min_numel}

    def largest(self, dtype: torch.dtype, exclude: int = -1) -> int:
        """Largest tensor of ``dtype`` produced, ignoring those sharing storage ``exclude``."""
        return max((n for _, dt, n, p in self.outputs if dt == dtype and p != exclude), default=0)


CASES = {
    "token_logprobs": lambda x, c: token_logprobs(x, _ids(6, 8, vocab=50), chunk_size=c),
    "gather_logprobs": lambda x, c: gather_logprobs(
        x, _ids(6, 8, 3, vocab=50).masked_fill(torch.eye(8, 3, dtype=torch.bool), -1), chunk_size=c
    ),
    "token_entropy": lambda x, c: token_entropy(x, chunk_size=c),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_full_size_float32_temporaries(name: str, dtype: torch.dtype) -> None:
    fn, chunk = CASES[name], 5
    logits = _logits(dtype, 6, 8, 50).requires_grad_(True)  # 48 rows, 10 chunks
    full = logits.numel()
    storage = logits.untyped_storage().data_ptr()

    with _AllocationLog() as fwd:
        out = fn(logits, chunk)
    # Forward: the only full-size tensors are views of the logits themselves.
    assert fwd.storages(full) == {(dtype, storage)}
    assert fwd.largest(torch.float32, exclude=storage) <= chunk * 50

    with _AllocationLog() as bwd:
        out.masked_fill(torch.isinf(out), 0.0).sum().backward()
    # Backward: exactly one new full-size buffer, the gradient, in the logits' dtype.
    assert logits.grad is not None
    assert bwd.storages(full) == {(dtype, logits.grad.untyped_storage().data_ptr())}
    grad_storage = logits.grad.untyped_storage().data_ptr()
    assert bwd.largest(torch.float32, exclude=grad_storage) <= chunk * 50


def test_allocation_log_sees_the_naive_upcast() -> None:
    logits = _logits(torch.bfloat16, 6, 8, 50).requires_grad_(True)
    with _AllocationLog() as log:
        _naive_logprobs(logits, _ids(6, 8, vocab=50)).sum().backward()
    assert log.largest(torch.float32) == logits.numel()
    assert len(log.storages(logits.numel())) > 2


@pytest.mark.parametrize("name", list(CASES))
def test_saves_logits_by_reference(name: str) -> None:
    logits = _logits(torch.bfloat16, 6, 8, 50).requires_grad_(True)
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CASES[name](logits, 5)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1
    assert big[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    # Everything else is per row (lse) or per selected token (ids): at most N·K = 48·3 elements.
    assert all(t.numel() <= 48 * 3 for t in saved if t is not big[0])


def test_default_chunk_holds_at_most_2_pow_24_elements() -> None:
    vocab = 2**22
    logits = torch.zeros(8, vocab, dtype=torch.bfloat16)
    with _AllocationLog() as log:
        out = token_logprobs(logits, torch.zeros(8, dtype=torch.long))
    assert log.largest(torch.float32) == 2**24  # 4 rows of 2**22
    torch.testing.assert_close(out, torch.full((8,), -22 * torch.log(torch.tensor(2.0)).item()))


# ---------------------------------------------------------------------------- input validation


def test_rejects_bad_token_ids() -> None:
    logits = _logits(torch.float32)
    with pytest.raises(ValueError, match=r"token_ids must have an integer dtype.*torch.float32"):
        token_logprobs(logits, _ids().float())
    with pytest.raises(ValueError, match=r"token_ids must have an integer dtype.*torch.bool"):
        token_logprobs(logits, _ids() > 3)
    with pytest.raises(ValueError, match=r"token_ids has shape \(5, 6\), expected \(5, 7\)"):
        token_logprobs(logits, _ids(B, T - 1))
    with pytest.raises(ValueError, match=r"token_ids has shape \(5, 7, 1\), expected \(5, 7\)"):
        token_logprobs(logits, _ids()[..., None])
    with pytest.raises(ValueError, match=r"must lie in \[0, 37\).*got values in \[\d+, 37\]"):
        token_logprobs(logits, _ids().index_fill(1, torch.tensor([2]), V))
    with pytest.raises(ValueError, match=r"must lie in \[0, 37\).*got values in \[-1, "):
        token_logprobs(logits, _ids().index_fill(1, torch.tensor([2]), -1))


def test_gather_logprobs_rejects_bad_token_ids() -> None:
    logits = _logits(torch.float32)
    with pytest.raises(ValueError, match=r"token_ids_k must be a tensor of shape \[\.\.\., K\]"):
        gather_logprobs(logits, _ids())
    with pytest.raises(ValueError, match=r"has shape \(5, 6, 2\), expected \(5, 7, 2\)"):
        gather_logprobs(logits, _ids(B, T - 1, 2))
    with pytest.raises(ValueError, match=r"token_ids_k must have an integer dtype"):
        gather_logprobs(logits, _ids(B, T, 2).double())
    with pytest.raises(ValueError, match=r"must lie in \[-1, 37\) \(-1 marks an unused slot\)"):
        gather_logprobs(logits, _ids(B, T, 2).index_fill(2, torch.tensor([1]), -2))


def test_rejects_bad_logits_and_chunk_size() -> None:
    with pytest.raises(ValueError, match=r"logits must have a floating-point dtype.*torch.int64"):
        token_logprobs(_ids(B, T, V), _ids())
    with pytest.raises(ValueError, match=r"V >= 1"):
        token_entropy(torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int.*got 0"):
        token_entropy(_logits(torch.float32), chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int.*got 2.0"):
        token_logprobs(_logits(torch.float32), _ids(), chunk_size=2.0)  # type: ignore[arg-type]
