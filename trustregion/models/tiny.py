"""The tiny character-level models the project ships, for quick starts and tests on a CPU.

Each artefact in :data:`TINY_MODELS` is a small causal LM of one architecture, briefly fine-tuned
(supervised) on the built-in tasks so that it starts with partial accuracy and leaves room for RL
to improve it; ``scripts/make_tiny_model.py --arch ARCH`` rebuilds it, and the ``README.md`` next
to the weights is its model card. Each loads with the usual Hugging Face classes::

    model = AutoModelForCausalLM.from_pretrained(TINY_MODELS["tiny-char-gpt2"])
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODELS["tiny-char-gpt2"])

or by name as a model source (:func:`trustregion.models.loading.load_model`), which never
touches the network.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig

from trustregion.models.architectures import tiny_config

__all__ = ["ASSETS_DIR", "TINY_ARCHITECTURES", "TINY_MODELS", "TINY_MODEL_DIR",
           "tiny_llama_config"]

ASSETS_DIR: Path = Path(__file__).resolve().parent.parent / "assets"
"""Directory holding one ``tiny-char-<name>`` directory per shipped model."""

TINY_ARCHITECTURES: dict[str, str] = {
    "tiny-char-llama": "llama",
    "tiny-char-qwen3": "qwen3",
    "tiny-char-gpt2": "gpt2",
    "tiny-char-moe": "qwen3_moe",
}
"""Shipped model name -> its architecture (a key of
:data:`trustregion.models.architectures.ARCHITECTURES`)."""

TINY_MODELS: dict[str, Path] = {name: ASSETS_DIR / name for name in TINY_ARCHITECTURES}
"""Shipped model name -> directory of its model and tokenizer (``save_pretrained`` layout,
safetensors, model card in ``README.md``)."""

TINY_MODEL_DIR: Path = TINY_MODELS["tiny-char-llama"]
"""Directory of the shipped Llama, the default model of the examples."""


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 64,
) -> LlamaConfig:
    """A Llama configuration small enough to train and sample from on a laptop CPU: the
    ``llama`` family of :func:`trustregion.models.architectures.tiny_config`.

    Token ids of ``<pad>``, ``<bos>`` and ``<eos>`` follow :mod:`trustregion.models.char_tokenizer`;
    input and output embeddings are tied.
    """
    config = tiny_config("llama", vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads,
                         intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings)
    assert isinstance(config, LlamaConfig)
    return config
