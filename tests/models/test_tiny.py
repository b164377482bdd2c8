import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from trustregion.models import (
    ALPHABET,
    TINY_MODEL_DIR,
    build_char_tokenizer,
    load_tiny_model,
    load_tiny_tokenizer,
    tiny_llama_config,
)
from trustregion.tasks import Arithmetic, DigitSort, Reverse

# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_special_token_ids(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
    )
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == 4 + len(ALPHABET)


@pytest.mark.parametrize(
    "text", ["12+7=", "sort:312=", "rev:abc=", "a b  c\nd\n", " x ", "3*4-5:zz", ALPHABET]
)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids[1:]) == text  # no spaces inserted between characters
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_special_tokens_in_text_and_unknown_characters(tokenizer):
    ids = tokenizer("12<eos>", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 3
    assert tokenizer("A?", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id] * 2


def test_left_padding(tokenizer):
    batch = tokenizer(["1+1=", "12+13="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [0, 0]
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    decoded = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == ["1+1=", "12+13="]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        tiny_llama_config(47, hidden_size=66, num_attention_heads=4)
    config = tiny_llama_config(47)
    assert config.tie_word_embeddings and config.pad_token_id == 0 and config.eos_token_id == 2


# --------------------------------------------------------------------------- shipped artefact


@pytest.fixture(scope="module")
def artefact():
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
        tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    model.eval()
    return model, tok


def test_artefact_is_small():
    files = list(TINY_MODEL_DIR.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) < 5 * 1024 * 1024


def test_artefact_loads_with_auto_classes(artefact, tokenizer):
    model, tok = artefact
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    expected = tiny_llama_config(len(tokenizer))
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(config, key) == getattr(expected, key), key
    assert config.vocab_size == len(tok) == len(tokenizer)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert tok.decode(tok("rev:abc=")["input_ids"], skip_special_tokens=True) == "rev:abc="


def test_load_helpers():
    model = load_tiny_model()
    tok = load_tiny_tokenizer()
    assert not model.training and model.config.vocab_size == len(tok)
    with pytest.raises(FileNotFoundError, match=r"make_tiny_model\.py"):
        load_tiny_model(TINY_MODEL_DIR / "missing")


def generate(model, tok, prompts):
    inputs = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_greedy_generation(artefact):
    model, tok = artefact
    arithmetic, reverse, sort = generate(model, tok, ["12+7=", "rev:abc=", "sort:312="])
    assert arithmetic and set(arithmetic) <= set(ALPHABET)
    assert reverse == "cba"
    assert sort == "123"


def test_starts_with_partial_accuracy(artefact):
    """The artefact knows the format but leaves RL room on arithmetic."""
    model, tok = artefact
    for task, low, high in ((Arithmetic(), 0.2, 0.9), (DigitSort(), 0.5, 1.0), (Reverse(), 0.8, 1)):
        examples = task.examples(64, seed=99)
        completions = generate(model, tok, [ex.prompt for ex in examples])
        accuracy = task.reward(completions, examples).mean().item()
        assert low <= accuracy <= high, (task.name, accuracy)
