"""bitsandbytes int8 and nf4 layers: codes and scales, error bounds, state-dict round trips,
copies and dtype casts."""

from __future__ import annotations

import copy
import operator

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

from trustregion.precision import Int8Linear, NF4Linear
from trustregion.precision.bnb_layers import NF4_QUANT_STATE_BYTES

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _random(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- int8


def test_int8_codes_and_row_scales_by_hand() -> None:
    layer = Int8Linear.from_linear(_linear(torch.tensor([[127.0, -63.5, 1.0],
                                                          [254.0, 127.0, -1.0]])))
    # row 0: SCB = 127, CB = round(127·w/127) = [127, −63.5 → −64 (half to even), 1]
    # row 1: SCB = 254, CB = round(w/2) = [127, 63.5 → 64, −0.5 → 0]
    assert layer.weight.dtype == torch.int8
    assert layer.weight.tolist() == [[127, -64, 1], [127, 64, 0]]
    assert layer.row_statistics().tolist() == [127.0, 254.0]
    # CB·SCB/127 = [127, −64, 1] and [254, 128, 0]
    assert layer.dequantized_weight(torch.float32).flatten().tolist() == pytest.approx(
        [127.0, -64.0, 1.0, 254.0, 128.0, 0.0], rel=1e-6)


def test_int8_matches_bitsandbytes_own_quantisation() -> None:
    weight = _random(32, 64, 0).half().float()  # fp16 values: bitsandbytes' own cast is exact
    ours = Int8Linear.from_linear(_linear(weight))
    theirs = bnb.nn.Int8Params(weight.clone(), requires_grad=False,
                               has_fp16_weights=False).to("cpu")
    assert torch.equal(ours.weight.data, theirs.data)
    assert torch.equal(ours.row_statistics(), theirs.SCB)


def test_int8_forward_quantises_activations_per_row() -> None:
    weight, x = _random(16, 64, 1), _random(5, 64, 2)
    layer = Int8Linear.from_linear(_linear(weight))
    dequantized = layer.dequantized_weight(torch.float32)
    out = layer(x)
    # bitsandbytes rounds each activation row to fp16 (2⁻¹¹ relative) and then to int8
    # (half a step: absmax_row/254), so the output moves by at most that times Σ|W|
    step = x.abs().amax(dim=1, keepdim=True) * (1 / 254 + 2.0**-11)
    bound = step @ dequantized.abs().sum(dim=1)[None, :]
    assert out.dtype == torch.float32
    assert bool(((out - x @ dequantized.T).abs() <= bound + 1e-4).all())


def test_int8_round_trip_after_forward_and_deepcopy() -> None:
    source = Int8Linear.from_linear(_linear(_random(16, 32, 3), torch.ones(16)))
    target = Int8Linear.from_linear(_linear(_random(16, 32, 4), torch.zeros(16)))
    x = _random(3, 32, 5)
    target(x)  # bitsandbytes moves its statistics into the layer's state on a forward
    duplicate = copy.deepcopy(target)
    target.load_state_dict(source.state_dict())
    duplicate.load_state_dict(source.state_dict())
    bare = Int8Linear(32, 16)
    bare.load_state_dict(source.state_dict())
    for loaded in (target, duplicate, bare):
        assert torch.equal(loaded(x), source(x))
        assert torch.equal(loaded.row_statistics(), source.row_statistics())


def test_int8_survives_a_module_cast() -> None:
    layer = Int8Linear.from_linear(_linear(_random(16, 32, 6), torch.ones(16)))
    codes, scb = layer.weight.data.clone(), layer.row_statistics().clone()
    before = layer(_random(2, 32, 7).bfloat16())
    nn.Sequential(layer).to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight.data, codes)
    assert torch.equal(layer.row_statistics(), scb) and scb.dtype == torch.float32
    assert layer.bias is not None and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer(_random(2, 32, 7).bfloat16()), before)


def test_int8_rows_are_an_exact_lookup() -> None:
    layer = Int8Linear.from_linear(_linear(_random(10, 16, 8)))
    ids = torch.tensor([[2, 9, 2]])
    rows = layer.dequantized_rows(ids, torch.bfloat16)
    assert rows.shape == (1, 3, 16)
    assert torch.equal(rows, layer.dequantized_weight(torch.bfloat16)[ids])


def test_int8_re_quantises_in_place() -> None:
    layer = Int8Linear.from_linear(_linear(_random(8, 16, 9)))
    storage = layer.weight.data_ptr()
    new_weight = _random(8, 16, 10)
    layer.load_full_weight(new_weight, None)
    assert layer.weight.data_ptr() == storage
    assert torch.equal(layer.weight.data, Int8Linear.from_linear(_linear(new_weight)).weight.data)


# --------------------------------------------------------------------------- nf4


def test_nf4_dequantised_error_is_within_half_a_level_gap() -> None:
    weight = _random(64, 256, 11)
    layer = NF4Linear.from_linear(_linear(weight), torch.float32)
    state = layer.quantization()
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 64 * 256 // 2
    levels = state.code.sort().values
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2  # (1 − 0.6962)/2 ≈ 0.152
    true_absmax = weight.reshape(-1, 64).abs().amax(dim=1)
    stored_absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    # the block absmaxes are stored in 8 bits: within 1 % of the true ones
    assert bool(((stored_absmax - true_absmax).abs() <= 0.01 * true_absmax).all())
    # each weight is rounded to the nearest level of w/absmax, then rescaled by the stored absmax
    error = (layer.dequantized_weight(torch.float32) - weight).reshape(-1, 64).abs()
    bound = half_gap * true_absmax + (stored_absmax - true_absmax).abs()
    assert bool((error <= bound[:, None] + 1e-6).all())


@pytest.mark.parametrize("in_features", [128, 48])  # whole blocks per row, and not
def test_nf4_rows_are_the_dequantised_matrix_rows(in_features: int) -> None:
    layer = NF4Linear.from_linear(_linear(_random(10, in_features, 12)), torch.bfloat16)
    ids = torch.tensor([[7, 0], [7, 9]])
    rows = layer.dequantized_rows(ids, torch.bfloat16)
    assert rows.shape == (2, 2, in_features)
    assert torch.equal(rows, layer.dequantized_weight(torch.bfloat16)[ids])


def test_nf4_round_trip_after_forward_and_deepcopy() -> None:
    source = NF4Linear.from_linear(_linear(_random(16, 64, 13), torch.ones(16)), torch.float32)
    target = NF4Linear.from_linear(_linear(_random(16, 64, 14), torch.zeros(16)), torch.float32)
    x = _random(3, 64, 15)
    target(x)
    duplicate = copy.deepcopy(target)
    # bitsandbytes' own Linear4bit refuses this: "Unexpected key(s) ... weight.absmax"
    target.load_state_dict(source.state_dict())
    duplicate.load_state_dict(source.state_dict())
    bare = NF4Linear(64, 16, compute_dtype=torch.float32)
    bare.load_state_dict(source.state_dict())
    for loaded in (target, duplicate, bare):
        assert torch.equal(loaded(x), source(x))
        assert torch.equal(loaded.dequantized_weight(torch.float32),
                           source.dequantized_weight(torch.float32))


def test_nf4_survives_a_module_cast() -> None:
    layer = NF4Linear.from_linear(_linear(_random(16, 64, 16)), torch.bfloat16)
    x = _random(2, 64, 17).bfloat16()
    before, codes = layer(x), layer.weight.data.clone()
    nn.Sequential(layer).to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight.data, codes)
    assert layer.quantization().dtype == torch.float32
    assert torch.equal(layer(x), before)


# --------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("build", [
    lambda linear: Int8Linear.from_linear(linear),
    lambda linear: NF4Linear.from_linear(linear, torch.float32),
], ids=["int8", "nf4"])
def test_every_state_dict_key_is_an_attribute_path(build) -> None:
    # torch.distributed.checkpoint's get_model_state_dict (Lightning's FSDP checkpoints) looks
    # each key up with getattr, one dotted name at a time
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    layer = build(_linear(_random(16, 64, 21), torch.ones(16)))
    state = layer.state_dict()
    for key in state:
        operator.attrgetter(key)(layer)
    distributed = get_model_state_dict(layer)
    assert distributed.keys() == state.keys()
    assert all(torch.equal(distributed[key], state[key]) for key in state)


def test_int8_scb_and_weight_format_attributes_hold_the_state_dict_values() -> None:
    layer = Int8Linear.from_linear(_linear(torch.tensor([[127.0, -63.5], [254.0, 1.0]])))
    state = layer.state_dict()
    assert sorted(state) == ["SCB", "weight", "weight_format"]
    # SCB: the absmax of each row, 127 and 254; weight_format: bitsandbytes' row-major code 0
    assert layer.SCB is not None and layer.SCB.tolist() == [127.0, 254.0]
    assert torch.equal(state["SCB"], layer.SCB)
    assert state["weight_format"].dtype == torch.uint8 and int(state["weight_format"]) == 0
    assert int(layer.weight_format) == 0


def test_nf4_packed_settings_are_padded_to_a_fixed_length() -> None:
    key = "weight.quant_state.bitsandbytes__nf4"
    ones = NF4Linear.from_linear(_linear(torch.ones(16, 64)), torch.float32)
    # every block's absmax is 1, so the nested offset (their mean) is 1.0
    settings = ('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [16, 64], '
                '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1.0}')
    packed = ones.state_dict()[key]
    assert packed.dtype == torch.uint8 and packed.shape == (NF4_QUANT_STATE_BYTES,)
    assert bytes(packed.tolist()).decode() == settings.ljust(NF4_QUANT_STATE_BYTES)
    # a random weight's offset has many more digits, and the same length
    random = NF4Linear.from_linear(_linear(_random(16, 64, 22)), torch.float32)
    assert random.state_dict()[key].shape == (NF4_QUANT_STATE_BYTES,)
    unpadded = random.quantization().as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert unpadded.numel() > len(settings)


def test_nf4_loads_padded_and_unpadded_settings() -> None:
    key = "weight.quant_state.bitsandbytes__nf4"
    source = NF4Linear.from_linear(_linear(_random(16, 64, 23), torch.ones(16)), torch.float32)
    padded = source.state_dict()
    unpadded = dict(padded)  # bitsandbytes' own layout, as older checkpoints hold it
    unpadded[key] = torch.tensor(list(bytes(padded[key].tolist()).rstrip()), dtype=torch.uint8)
    assert unpadded[key].numel() < NF4_QUANT_STATE_BYTES
    for state in (padded, unpadded):
        loaded = NF4Linear(64, 16, compute_dtype=torch.float32)
        loaded.load_state_dict(state)
        assert torch.equal(loaded.dequantized_weight(torch.float32),
                           source.dequantized_weight(torch.float32))
        assert torch.equal(loaded.quantization().offset, source.quantization().offset)
        assert torch.equal(loaded.state_dict()[key], padded[key])


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("build", [
    lambda linear: Int8Linear.from_linear(linear),
    lambda linear: NF4Linear.from_linear(linear, torch.bfloat16),
], ids=["int8", "nf4"])
def test_layers_built_on_cpu_run_after_moving_to_cuda(build) -> None:
    layer = build(_linear(_random(64, 128, 18), torch.ones(64)))
    x = _random(4, 128, 19).bfloat16()
    on_cpu = layer(x).float()
    nn.Sequential(layer).to("cuda")
    on_gpu = layer(x.cuda()).float().cpu()
    assert on_gpu.shape == (4, 64)
    # same codes and scales; CPU and CUDA kernels may round bf16 outputs differently
    assert bool(((on_gpu - on_cpu).abs() <= 0.02 * on_cpu.abs() + 0.05).all())
    layer.load_full_weight(_random(64, 128, 20), None)  # a CPU weight into a CUDA layer
    assert layer.weight.device.type == "cuda"
    assert layer(x.cuda()).device.type == "cuda"
