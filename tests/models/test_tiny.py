import functools

import lightning as L
import pytest
import torch
from row_logger import RowLogger
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from trustregion.batching import BatchSettings
from trustregion.models import (
    ALPHABET,
    TINY_ARCHITECTURES,
    TINY_MODEL_DIR,
    TINY_MODELS,
    loading,
    tiny_llama_config,
)
from trustregion.models.loading import SOURCES_HELP, TINY, load_model
from trustregion.module import TrustRegionModule
from trustregion.rollout import SamplingSettings
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


# --------------------------------------------------------------------------- every shipped model
# Prompts that each model card lists among its right greedy answers, with those answers.
GREEDY_RIGHT = {
    "tiny-char-llama": {"rev:abc=": "cba", "sort:312=": "123"},
    "tiny-char-qwen3": {"20+16=": "36", "5-6=": "-1", "rev:abc=": "cba", "sort:312=": "123"},
    "tiny-char-gpt2": {"9+19=": "28", "5-5=": "0", "rev:abc=": "cba", "sort:312=": "123"},
    "tiny-char-moe": {"10+6=": "16", "0-6=": "-6", "rev:abc=": "cba", "sort:312=": "123"},
}


@functools.cache
def shipped(name: str):
    """(model, tokenizer) of a shipped model, loaded once through the model source."""
    return load_model(name)


def test_the_table_of_shipped_models():
    assert list(TINY_MODELS) == ["tiny-char-llama", "tiny-char-qwen3", "tiny-char-gpt2",
                                 "tiny-char-moe"]
    assert TINY_MODELS[TINY] == TINY_MODEL_DIR
    for name in TINY_MODELS:
        assert f"'{name}'" in SOURCES_HELP


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_each_shipped_model_is_small_and_has_a_model_card(name):
    files = {f.name: f.stat().st_size for f in TINY_MODELS[name].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert sum(files.values()) < 5 * 1024 * 1024
    card = (TINY_MODELS[name] / "README.md").read_text(encoding="utf-8")
    assert card.startswith(f"# {name}\n")


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_each_shipped_model_loads_by_name(char_tokenizer, name):
    model, tok = shipped(name)
    assert model.config.model_type == TINY_ARCHITECTURES[name]
    assert not model.training
    # tied: the output projection is the input embedding matrix itself
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tok.get_vocab() == char_tokenizer.get_vocab()
    assert model.config.vocab_size == len(char_tokenizer) == 4 + len(ALPHABET)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (0, 2)
    assert tok.padding_side == "left"


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_each_model_card_states_the_parameter_count(name):
    model, _ = shipped(name)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    card = (TINY_MODELS[name] / "README.md").read_text(encoding="utf-8")
    assert f"A {n_params / 1e6:.2f} M-parameter " in card
    if name != TINY:  # the Llama's card does not name the architecture in its first line
        assert f"M-parameter `{TINY_ARCHITECTURES[name]}` model" in card


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_each_shipped_model_answers_greedily_as_its_card_says(name):
    model, tok = shipped(name)
    prompts = list(GREEDY_RIGHT[name])
    assert generate(model, tok, prompts) == [GREEDY_RIGHT[name][p] for p in prompts]


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if n != TINY])
def test_each_new_model_starts_with_partial_accuracy(name):
    """Greedy exact match on 64 fixed prompts per task, in the same bands as tiny-char-llama:
    arithmetic partly right, leaving RL room; the easier tasks mostly right."""
    model, tok = shipped(name)
    for task, low, high in ((Arithmetic(), 0.2, 0.9), (DigitSort(), 0.5, 1.0), (Reverse(), 0.8, 1)):
        examples = task.examples(64, seed=99)
        completions = generate(model, tok, [ex.prompt for ex in examples])
        accuracy = task.reward(completions, examples).mean().item()
        assert low <= accuracy <= high, (name, task.name, accuracy)


@pytest.mark.parametrize("name", ["tiny-char-mistral", "tiny-char-", "tiny-char-LLAMA"])
def test_an_unknown_shipped_name_lists_the_shipped_ones(name):
    with pytest.raises(ValueError, match=r"unknown shipped model") as error:
        load_model(name)
    for shipped_name in TINY_MODELS:
        assert f"'{shipped_name}'" in str(error.value)


def test_a_local_directory_named_like_a_shipped_model_still_loads(monkeypatch, tmp_path):
    model, tok = shipped("tiny-char-gpt2")
    model.save_pretrained(tmp_path / "tiny-char-mine")
    tok.save_pretrained(tmp_path / "tiny-char-mine")
    monkeypatch.chdir(tmp_path)
    loaded, _ = load_model("tiny-char-mine")
    assert loaded.config.model_type == "gpt2"


@pytest.mark.parametrize("name", ["tiny-char-gpt2", "tiny-char-moe"])
def test_a_missing_shipped_model_says_how_to_rebuild_it(monkeypatch, tmp_path, name):
    monkeypatch.setitem(TINY_MODELS, name, tmp_path / "missing")
    with pytest.raises(FileNotFoundError,
                       match=rf"make_tiny_model\.py --arch {TINY_ARCHITECTURES[name]}"):
        load_model(name)


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if n != TINY])
def test_each_new_model_trains_from_its_name(tmp_path, name):
    """Two rollout batches of RL on arithmetic: one logged row per batch, and the policy moved
    away from the shipped weights."""
    torch.manual_seed(0)
    module = TrustRegionModule(policy=name, task=Arithmetic(), seed=0,
                               batching=BatchSettings(group_size=4, prompts_per_step=4,
                                                      mini_batch_size=16),
                               sampling=SamplingSettings(max_new_tokens=4))
    shipped_weights = {k: v.clone() for k, v in module.policy.state_dict().items()}
    logger = RowLogger(tmp_path)
    L.Trainer(max_steps=2, log_every_n_steps=1, logger=logger, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module)
    assert [step for step, _ in logger.rows] == [0, 1]
    for _, row in logger.rows:
        assert {"reward/mean", "train/loss"} <= row.keys()
        assert 0.0 <= row["reward/mean"] <= 1.0  # exact-match reward of 16 completions
    trained = module.policy.state_dict()
    changed = [k for k, v in shipped_weights.items() if not torch.equal(trained[k], v)]
    assert changed, "no policy weight changed in two rollout batches"
