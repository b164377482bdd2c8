import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from trustregion.models import ALPHABET, TINY_MODEL_DIR, loading, tiny_llama_config
from trustregion.models.loading import TINY, load_model
from trustregion.tasks import Arithmetic, DigitSort, Reverse

# --------------------------------------------------------------------------- tokenizer


def test_special_token_ids(char_tokenizer):
    tok = char_tokenizer
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    assert len(tok) == 4 + len(ALPHABET)


@pytest.mark.parametrize(
    "text", ["12+7=", "sort:312=", "rev:abc=", "a b  c\nd\n", " x ", "3*4-5:zz", ALPHABET]
)
def test_round_trip(char_tokenizer, text):
    tok = char_tokenizer
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text  # no spaces inserted between characters
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_special_tokens_in_text_and_unknown_characters(char_tokenizer):
    tok = char_tokenizer
    ids = tok("12<eos>", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id and len(ids) == 3
    assert tok("A?", add_special_tokens=False)["input_ids"] == [tok.unk_token_id] * 2


def test_left_padding(char_tokenizer):
    batch = char_tokenizer(["1+1=", "12+13="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [0, 0]
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    decoded = char_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == ["1+1=", "12+13="]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        tiny_llama_config(47, hidden_size=66, num_attention_heads=4)
    config = tiny_llama_config(47)
    assert config.tie_word_embeddings and config.pad_token_id == 0 and config.eos_token_id == 2


# --------------------------------------------------------------------------- shipped artefact


@pytest.fixture(scope="module")
def artefact():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
        tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model.eval()
    return model, tok


def test_artefact_is_small():
    files = list(TINY_MODEL_DIR.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) < 5 * 1024 * 1024


def test_artefact_loads_with_auto_classes(artefact, char_tokenizer):
    model, tok = artefact
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    expected = tiny_llama_config(len(char_tokenizer))
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
    assert config.vocab_size == len(tok) == len(char_tokenizer)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    assert tok.get_vocab() == char_tokenizer.get_vocab()
    assert tok.decode(tok("rev:abc=")["input_ids"], skip_special_tokens=True) == "rev:abc="


def test_loads_as_a_model_source():
    model, tok = load_model(TINY)
    assert not model.training and model.config.vocab_size == len(tok)


def test_a_missing_artefact_says_how_to_rebuild_it(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "TINY_MODEL_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"make_tiny_model\.py"):
        load_model(TINY)


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
