"""An input embedding that reads its rows from a quantised output layer.

Models such as SmolLM2 tie the input embedding to the lm_head: one vocab × hidden matrix
serves both. When the lm_head is quantised (``precision.quantize_lm_head``), the embedding
looks its rows up in that same quantised matrix, so the vocabulary is stored once, in the
quantised format. With int8 and fp8 a row is its codes times its row scale, so the lookup is
exact and costs only the rows asked for; with nf4 each row is dequantised from its blocks.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = ["QuantizedTiedEmbedding", "RowLookup"]


class RowLookup(Protocol):
    """A quantised layer whose dequantised weight rows can be looked up."""

    in_features: int
    out_features: int

    def dequantized_rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor: ...


class QuantizedTiedEmbedding(nn.Module):
    """``embedding(ids) = dequantised rows ids of output_layer's weight``, in ``dtype``.

    The output layer is held by reference, not as a submodule: it stays registered once, as
    the model's lm_head, so state dicts, ``parameters()`` and device moves see it once. The
    output dtype follows module casts (``model.to(torch.bfloat16)`` makes it bf16), as an
    ordinary embedding's weight would.
    """

    output_layer: RowLookup

    def __init__(self, output_layer: RowLookup, dtype: torch.dtype) -> None:
        super().__init__()
        # plain attribute on purpose: registering it would give the lm_head a second name
        object.__setattr__(self, "output_layer", output_layer)
        self.num_embeddings = output_layer.out_features
        self.embedding_dim = output_layer.in_features
        # an empty buffer whose dtype module casts update: the dtype of the looked-up rows
        self.register_buffer("dtype_marker", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the embeddings this layer returns."""
        return self.get_buffer("dtype_marker").dtype

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.output_layer.dequantized_rows(input_ids, self.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantised "
                f"{type(self.output_layer).__name__}")
