"""torchao float8 training of the policy: which layers convert, gradients within the FP8
rounding bound, the missing-extra error, and a quiet import."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trustregion.models.loading import load_model
from trustregion.precision import enable_fp8_training, low_precision_copy
from trustregion.precision.settings import FP8_INSTALL_HINT

torchao = pytest.importorskip("torchao")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.odd = nn.Linear(32, 24)   # 24 is not a multiple of 16: FP8 kernels refuse it
        self.head = nn.Linear(32, 16)  # the lm_head: converted only when asked

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x))))


def test_linear_layers_convert_except_the_lm_head_and_odd_sizes() -> None:
    model = _Small()
    with pytest.warns(UserWarning, match=r"leaves odd \(24×32\) in its own precision"):
        assert enable_fp8_training(model) == 2
    assert isinstance(model.up, Float8Linear) and isinstance(model.down, Float8Linear)
    assert type(model.odd) is nn.Linear and type(model.head) is nn.Linear
    # a second call converts what is left and allowed: the lm_head, once asked
    with pytest.warns(UserWarning, match=r"leaves odd \(24×32\)"):
        assert enable_fp8_training(model, quantize_lm_head=True) == 1
    assert isinstance(model.head, Float8Linear) and type(model.odd) is nn.Linear


def test_the_tiny_llama_trains_in_fp8(random_model_dir: Path) -> None:
    model, _ = load_model(f"config:{random_model_dir}")
    assert enable_fp8_training(model) == 7  # q, k, v, o, gate, up, down of its one layer
    assert type(model.get_output_embeddings()) is nn.Linear  # lm_head (vocab 47) untouched
    ids = torch.tensor([[1, 5, 9, 12], [1, 7, 7, 3]])
    model(ids, labels=ids).loss.backward()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Float8Linear)
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0


def test_gradients_are_within_the_fp8_rounding_bound() -> None:
    gen = torch.Generator().manual_seed(0)

    def magnitudes(*shape: int) -> torch.Tensor:
        # values in ±[0.5, 1]: all stay normal numbers after torchao's tensor-wise scaling
        signs = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        return signs * (0.5 + 0.5 * torch.rand(shape, generator=gen))

    reference = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        reference.weight.copy_(magnitudes(16, 32))
    model = nn.Sequential(copy.deepcopy(reference))
    assert enable_fp8_training(model) == 1
    x, g = magnitudes(8, 32), magnitudes(8, 16)
    (model(x) * g).sum().backward()
    (reference(x) * g).sum().backward()
    fp8_grad, fp32_grad = model[0].weight.grad, reference.weight.grad
    assert fp8_grad is not None and fp32_grad is not None
    # dL/dW = gᵀx, with g cast to e5m2 (unit roundoff 2⁻³) and x to e4m3 (2⁻⁴): each product
    # is off by at most (2⁻³ + 2⁻⁴ + 2⁻⁷)·|g||x|
    bound = (2.0**-3 + 2.0**-4 + 2.0**-7) * (g.abs().T @ x.abs())
    assert bool(((fp8_grad - fp32_grad).abs() <= bound + 1e-5).all())
    assert not torch.equal(fp8_grad, fp32_grad)  # it really ran in float8


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_copies_of_an_fp8_trained_policy_run_their_own_format(random_model_dir: Path,
                                                              precision: str) -> None:
    policy, _ = load_model(f"config:{random_model_dir}")
    plain = copy.deepcopy(policy)
    enable_fp8_training(policy)
    behaviour = low_precision_copy(policy, precision)
    assert not any(isinstance(m, Float8Linear) for m in behaviour.modules())
    expected = low_precision_copy(plain, precision)
    assert behaviour.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in behaviour.state_dict().items())
    # the policy keeps training in float8
    assert isinstance(policy.model.layers[0].mlp.up_proj, Float8Linear)


def test_no_convertible_layer_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        enable_fp8_training(nn.Sequential(nn.Linear(10, 20)))
    assert str(info.value) == (
        "precision.policy='fp8' found no nn.Linear layer of Sequential to train in float8 "
        "(layers need in and out features that are multiples of 16; the lm_head is skipped "
        "unless precision.quantize_lm_head is true); use precision.policy='auto'")


def test_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ValueError) as info:
        enable_fp8_training(_Small())
    message = str(info.value)
    assert message.startswith("precision.policy='fp8' trains with torchao float8, which is not "
                              "installed (")
    assert message.endswith(f"install the fp8 extra: {FP8_INSTALL_HINT}")


def test_only_torchao_known_import_messages_are_dropped(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    import trustregion  # noqa: F401  (installs the filter)

    torchao_log, pytree_log = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING):
        torchao_log.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        pytree_log.warning("<enum 'KernelPreference'> is an Enum subclass ... Calling "
                           "register_constant() on Enum subclasses is deprecated")
        torchao_log.warning("a different torchao warning")
        pytree_log.warning("a different pytree warning")
    assert [r.getMessage() for r in caplog.records] == [
        "a different torchao warning", "a different pytree warning"]


@pytest.mark.gpu
@needs_cuda
def test_fp8_training_on_the_gpu() -> None:
    model = _Small().cuda().to(torch.bfloat16)
    with pytest.warns(UserWarning, match="leaves odd"):
        assert enable_fp8_training(model) == 2
    x = torch.randn(16, 32, device="cuda", dtype=torch.bfloat16)
    model(x).float().square().mean().backward()
    assert model.up.weight.grad is not None and bool(model.up.weight.grad.isfinite().all())


def test_a_layer_left_out_for_its_sizes_is_named() -> None:
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 47))
    with pytest.warns(UserWarning, match=r"leaves 1 \(47×16\) in its own precision: FP8 "
                                         r"matmuls need sizes that are multiples of 16"):
        assert enable_fp8_training(model) == 1
