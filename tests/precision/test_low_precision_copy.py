"""Behaviour and reference copies of the tiny model: layer swaps, the shared vocabulary,
sync = fresh copy bit for bit, state-dict round trips, bytes, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trustregion.models.loading import load_model
from trustregion.precision import (
    PRECISIONS,
    FP8Linear,
    Int8Linear,
    NF4Linear,
    QuantizedTiedEmbedding,
    load_weights,
    low_precision_copy,
    model_bytes,
)

QUANTIZED = {"int8": Int8Linear, "nf4": NF4Linear, "fp8": FP8Linear}
PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = [(p, False) for p in PRECISIONS] + [(p, True) for p in QUANTIZED]


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    model, _ = load_model("tiny-char-llama")
    return model.eval()


@pytest.fixture(scope="module")
def moved(tiny: nn.Module) -> nn.Module:
    """The tiny model after a few "updates": every weight nudged."""
    model = copy.deepcopy(tiny)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=gen))
    return model


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 12, 30], [1, 44, 3, 3, 7]])


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _linear_numel(model: nn.Module, *, skip: nn.Module | None) -> tuple[int, int]:
    """(weights, output rows) of the model's nn.Linear layers other than ``skip``."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not skip]
    return sum(m.weight.numel() for m in layers), sum(m.out_features for m in layers)


@pytest.mark.parametrize("precision", list(QUANTIZED))
def test_every_linear_but_the_lm_head_is_swapped(tiny: nn.Module, precision: str) -> None:
    q = low_precision_copy(tiny, precision)
    swapped = [m for m in q.modules() if isinstance(m, QUANTIZED[precision])]
    assert len(swapped) == 3 * 7  # 3 layers × (q, k, v, o, gate, up, down)
    lm_head, embedding = q.get_output_embeddings(), q.get_input_embeddings()
    assert type(lm_head) is nn.Linear and lm_head.weight.dtype == torch.bfloat16
    assert embedding.weight is lm_head.weight  # still tied, in the compute dtype
    assert q.model.norm.weight.dtype == torch.bfloat16
    assert not q.training and not any(p.requires_grad for p in q.parameters())
    # the source is untouched
    assert tiny.get_output_embeddings().weight.dtype == torch.float32
    assert all(p.requires_grad for p in tiny.parameters())
    assert q(_ids()).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(("precision", "quantize_lm_head"), FORMATS[3:])
def test_the_model_dtype_is_the_compute_dtype(tiny: nn.Module, precision: str,
                                              quantize_lm_head: bool) -> None:
    # transformers' model.dtype is the dtype of the first floating-point parameter
    q = low_precision_copy(tiny, precision, compute="fp16", quantize_lm_head=quantize_lm_head)
    assert q.dtype == torch.float16


@pytest.mark.parametrize("precision", list(PLAIN))
def test_plain_formats_cast_every_tensor(tiny: nn.Module, precision: str) -> None:
    q = low_precision_copy(tiny, precision, compute="fp32")  # compute is not used here
    expected = copy.deepcopy(tiny).to(PLAIN[precision])
    assert _same_state(q, expected)
    assert q.get_input_embeddings().weight is q.get_output_embeddings().weight
    assert q(_ids()).logits.dtype == PLAIN[precision]


def test_compute_sets_the_dtype_of_the_unquantised_tensors(tiny: nn.Module) -> None:
    q = low_precision_copy(tiny, "fp8", compute="fp16")
    assert q.model.norm.weight.dtype == torch.float16
    assert q.get_input_embeddings().weight.dtype == torch.float16
    assert q(_ids()).logits.dtype == torch.float16


@pytest.mark.parametrize("precision", list(QUANTIZED))
def test_a_quantised_lm_head_shares_the_vocabulary_with_the_embedding(
        tiny: nn.Module, precision: str) -> None:
    q = low_precision_copy(tiny, precision, quantize_lm_head=True)
    lm_head, embedding = q.get_output_embeddings(), q.get_input_embeddings()
    assert isinstance(lm_head, QUANTIZED[precision])
    assert isinstance(embedding, QuantizedTiedEmbedding) and embedding.output_layer is lm_head
    assert (embedding.num_embeddings, embedding.embedding_dim) == (47, 128)
    ids = _ids()
    assert torch.equal(embedding(ids), lm_head.dequantized_weight(torch.bfloat16)[ids])
    # stored once: the embedding adds no key and no parameter
    keys = q.state_dict().keys()
    assert "model.embed_tokens.weight" not in keys and "lm_head.weight" in keys
    assert len(list(embedding.parameters())) == 0


@pytest.mark.parametrize(("precision", "quantize_lm_head"), FORMATS)
def test_sync_equals_a_fresh_copy_bit_for_bit(tiny: nn.Module, moved: nn.Module,
                                              precision: str, quantize_lm_head: bool) -> None:
    behaviour = low_precision_copy(tiny, precision, quantize_lm_head=quantize_lm_head)
    behaviour(_ids())  # used before the sync, as in a run
    load_weights(behaviour, moved.state_dict())
    fresh = low_precision_copy(moved, precision, quantize_lm_head=quantize_lm_head)
    assert _same_state(behaviour, fresh)
    assert torch.equal(behaviour(_ids()).logits, fresh(_ids()).logits)
    assert not torch.equal(behaviour(_ids()).logits,
                           low_precision_copy(tiny, precision, quantize_lm_head=quantize_lm_head)(
                               _ids()).logits)


@pytest.mark.parametrize(("precision", "quantize_lm_head"), FORMATS)
def test_state_dict_round_trip(tiny: nn.Module, moved: nn.Module, precision: str,
                               quantize_lm_head: bool) -> None:
    saved = low_precision_copy(moved, precision, quantize_lm_head=quantize_lm_head)
    target = low_precision_copy(tiny, precision, quantize_lm_head=quantize_lm_head)
    target(_ids())
    duplicate = copy.deepcopy(target)
    for loaded in (target, duplicate):
        loaded.load_state_dict(saved.state_dict())
        assert _same_state(loaded, saved)
        assert torch.equal(loaded(_ids()).logits, saved(_ids()).logits)


@pytest.mark.parametrize(("precision", "quantize_lm_head"), FORMATS[3:])
def test_a_bf16_module_cast_keeps_quantised_models_as_they_are(
        tiny: nn.Module, precision: str, quantize_lm_head: bool) -> None:
    # Lightning's bf16-true precision calls .to(torch.bfloat16) on the whole LightningModule
    q = low_precision_copy(tiny, precision, quantize_lm_head=quantize_lm_head)
    before = copy.deepcopy(q)
    q.to(torch.bfloat16)
    assert _same_state(q, before)
    assert torch.equal(q(_ids()).logits, before(_ids()).logits)


def test_model_bytes_by_hand() -> None:
    assert model_bytes(nn.Linear(4, 3)) == (12 + 3) * 4
    embedding, head = nn.Embedding(5, 2), nn.Linear(2, 5, bias=False)
    head.weight = embedding.weight
    assert model_bytes(nn.ModuleList([embedding, head])) == 10 * 4  # tied: counted once
    # int8 128×128: codes 16384 B + SCB 128·4 B
    assert model_bytes(Int8Linear(128, 128, bias=False)) == 16384 + 512
    # fp8 128×128: codes 16384 B + scales 128·4 B
    assert model_bytes(FP8Linear(128, 128, bias=False)) == 16384 + 512
    # nf4 128×128: two codes a byte 8192 B, 256 block absmaxes in 8 bits 256 B, the 16-entry
    # code table 64 B; nested: 1 absmax of absmaxes 4 B, its 256-entry table 1024 B, offset 4 B
    assert model_bytes(NF4Linear(128, 128, bias=False)) == 8192 + 256 + 64 + 4 + 1024 + 4


def test_bytes_of_the_quantised_tiny_model(tiny: nn.Module) -> None:
    full = model_bytes(tiny)
    lm_head = tiny.get_output_embeddings()
    weights, rows = _linear_numel(tiny, skip=lm_head)
    assert (weights, rows) == (3 * 163840, 3 * 1152)
    rest = full - 4 * weights  # embeddings, norms and buffers: halved in bf16
    int8 = model_bytes(low_precision_copy(tiny, "int8"))
    assert int8 == weights + 4 * rows + rest // 2
    assert model_bytes(low_precision_copy(tiny, "fp8")) == int8
    vocab = lm_head.weight.numel()  # 47·128, kept once in bf16 → once in int8 + 47 scales
    shared = model_bytes(low_precision_copy(tiny, "int8", quantize_lm_head=True))
    assert shared == int8 - 2 * vocab + vocab + 4 * 47
    # behaviour + reference together against their fp32 bytes: targets 30 % (int8), 20 % (nf4)
    assert int8 / full <= 0.30 and shared / full <= 0.30
    assert model_bytes(low_precision_copy(tiny, "nf4")) / full <= 0.20


def test_unknown_precision_and_compute_are_refused(tiny: nn.Module) -> None:
    with pytest.raises(ValueError) as info:
        low_precision_copy(tiny, "int4", setting="precision.reference")
    assert str(info.value) == ("precision.reference must be one of 'fp32', 'bf16', 'fp16', "
                               "'int8', 'nf4', 'fp8'; got 'int4'")
    with pytest.raises(ValueError, match=r"precision\.compute must be one of 'fp32', 'bf16', "
                                         r"'fp16'; got 'int8'"):
        low_precision_copy(tiny, "nf4", compute="int8")


@pytest.mark.parametrize("precision", list(QUANTIZED))
def test_a_model_without_linear_layers_is_refused(precision: str) -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError) as info:
        low_precision_copy(model, precision, setting="precision.reference")
    message = str(info.value)
    assert message.startswith(f"precision.reference={precision!r} swaps nn.Linear layers for ")
    assert message.endswith("but Sequential has no nn.Linear layer to swap; choose one of "
                            "'fp32', 'bf16', 'fp16' for precision.reference")


class _EmbeddingAndHead(nn.Module):
    """A model whose only Linear layer is its lm_head, tied to its embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_a_model_whose_only_linear_is_the_lm_head(tiny: nn.Module) -> None:
    model = _EmbeddingAndHead()
    with pytest.raises(ValueError, match=r"has no nn.Linear layer to swap \(the lm_head is kept "
                                         r"in the compute dtype unless precision.quantize_lm_head "
                                         r"is true\)"):
        low_precision_copy(model, "int8")
    q = low_precision_copy(model, "int8", quantize_lm_head=True)
    assert isinstance(q.head, Int8Linear) and isinstance(q.embed, QuantizedTiedEmbedding)
    assert q(torch.tensor([[3, 4]])).shape == (1, 2, 32)


def test_load_weights_refuses_missing_and_extra_keys(tiny: nn.Module) -> None:
    q = low_precision_copy(tiny, "int8")
    state = dict(tiny.state_dict())
    del state["model.layers.0.self_attn.q_proj.weight"]
    state["value_head.weight"] = torch.zeros(1)
    before = copy.deepcopy(q)
    with pytest.raises(ValueError) as info:
        load_weights(q, state)
    assert str(info.value) == (
        "load_weights needs a full-precision state dict keyed like the target model's source "
        "(its policy's state_dict()); keys missing from the source: "
        "model.layers.0.self_attn.q_proj.weight; not in the target: value_head.weight")
    assert _same_state(q, before)  # nothing changed


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_load_weights_refuses_an_untied_source_for_a_tied_target(
        tiny: nn.Module, quantize_lm_head: bool) -> None:
    q = low_precision_copy(tiny, "fp8", quantize_lm_head=quantize_lm_head)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["lm_head.weight"] += 1.0
    with pytest.raises(ValueError) as info:
        load_weights(q, state)
    assert str(info.value) == (
        "the target's model.embed_tokens reads its rows from lm_head, but the source's "
        "model.embed_tokens.weight and lm_head.weight differ" if quantize_lm_head else
        "the target ties lm_head.weight and model.embed_tokens.weight, but their source values "
        "differ")


@pytest.mark.parametrize(("precision", "quantize_lm_head"), FORMATS)
def test_every_tensor_of_a_copy_passes_through_gloo(tiny: nn.Module, precision: str,
                                                    quantize_lm_head: bool) -> None:
    # DDP broadcasts every parameter and buffer of the LightningModule at start-up; gloo (the
    # CPU backend) refuses float8 tensors with "Invalid scalar type"
    group = torch.distributed.ProcessGroupGloo(torch.distributed.HashStore(), 0, 1)
    q = low_precision_copy(tiny, precision, quantize_lm_head=quantize_lm_head)
    for tensor in [*q.parameters(), *q.buffers()]:
        group.broadcast([tensor.detach()]).wait()


@pytest.mark.parametrize(("precision", "quantize_lm_head"), FORMATS)
def test_state_dict_shapes_do_not_change_with_the_weights(
        tiny: nn.Module, moved: nn.Module, precision: str, quantize_lm_head: bool) -> None:
    # a sharded checkpoint loads into the current model's tensors, which must match the saved
    # ones in shape: nf4's packed quant-state settings once grew or shrank with the weights
    q = low_precision_copy(tiny, precision, quantize_lm_head=quantize_lm_head)
    before = {key: (tensor.shape, tensor.dtype) for key, tensor in q.state_dict().items()}
    load_weights(q, moved.state_dict())
    after = {key: (tensor.shape, tensor.dtype) for key, tensor in q.state_dict().items()}
    assert after == before


@pytest.mark.parametrize("full_state_dict", [False, True])
@pytest.mark.parametrize(("precision", "quantize_lm_head"), FORMATS)
def test_distributed_state_dict_round_trip(tiny: nn.Module, moved: nn.Module, precision: str,
                                           quantize_lm_head: bool, full_state_dict: bool) -> None:
    # Lightning's FSDP checkpoints go through these two functions, which look every state-dict
    # key up as an attribute path of the model; no process group is needed for an unsharded one
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    options = StateDictOptions(full_state_dict=full_state_dict)
    saved = low_precision_copy(moved, precision, quantize_lm_head=quantize_lm_head)
    target = low_precision_copy(tiny, precision, quantize_lm_head=quantize_lm_head)
    target(_ids())
    state = get_model_state_dict(saved, options=options)
    assert state.keys() == saved.state_dict().keys()
    set_model_state_dict(target, state, options=options)
    assert _same_state(target, saved)
    assert torch.equal(target(_ids()).logits, saved(_ids()).logits)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize(("precision", "quantize_lm_head"), FORMATS[3:])
def test_sharded_checkpoint_round_trip(tiny: nn.Module, moved: nn.Module, tmp_path,
                                       precision: str, quantize_lm_head: bool) -> None:
    # what resuming a Lightning FSDP run does: torch.distributed.checkpoint loads the saved
    # tensors in place into the current model's state dict, then sets it on the model
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    saved = low_precision_copy(moved, precision, quantize_lm_head=quantize_lm_head)
    target = low_precision_copy(tiny, precision, quantize_lm_head=quantize_lm_head)
    dcp.save(get_model_state_dict(saved), checkpoint_id=tmp_path, no_dist=True)
    state = get_model_state_dict(target)
    dcp.load(state, checkpoint_id=tmp_path, no_dist=True)
    set_model_state_dict(target, state)
    assert _same_state(target, saved)
    assert torch.equal(target(_ids()).logits, saved(_ids()).logits)
