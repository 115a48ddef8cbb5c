"""QuantEmbedding: an embedding table kept as int8/int4 codes, dequantized a looked-up row at a
time (a kept-quantized checkpoint's token table, model.quant_checkpoint)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lmforge.model.quant_kernels import tracing
from lmforge.model.quant_module import QuantModule
from lmforge.model.quant_rounding import dequantize_weight


class QuantEmbedding(QuantModule):
    """An embedding table kept as int8/int4 codes (a scale per row or per group of columns):
    a lookup dequantizes only the rows it gathers. `kernel_packed`: int4 held in torch's int4
    kernel layout like QuantLinear's (a table tied to the LM head shares the head's bytes);
    rows come out in `dtype` (the model's), as they would from our own layout's scales."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int,
        kernel_packed: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight_shape = (num_embeddings, embedding_dim)
        self.bits, self.group_size, self.kernel_packed = bits, group_size, kernel_packed
        self.dtype = dtype
        if kernel_packed:
            self.register_kernel_buffers(num_embeddings, embedding_dim, group_size)
        elif bits == 8:
            self.register_buffer(
                "codes", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8)
            )
            self.register_buffer("scale", torch.empty(num_embeddings, 1))
        else:
            packed = (num_embeddings, embedding_dim // 2)
            self.register_buffer("codes", torch.empty(packed, dtype=torch.uint8))
            self.register_buffer(
                "scale", torch.empty(num_embeddings, embedding_dim // group_size, 1)
            )

    @property
    def weight(self) -> Tensor:
        """The whole dequantized table (num_embeddings, embedding_dim)."""
        if self.kernel_packed:
            return self.kernel_packed_rows(None).to(self.dtype)
        return dequantize_weight(self.codes, self.scale, self.bits, self.group_size)

    def forward(self, idx: Tensor) -> Tensor:
        flat = idx.reshape(-1)
        # not under torch.compile/export, where the data-dependent branch would break the graph
        # at every step; a compiled decoding step (model.compiled_decode) is fed only the ids
        # it sampled from logits as wide as the table, the prompt having passed the eager,
        # checked prefill
        if not tracing():
            self._check_ids(flat)
        if self.kernel_packed:
            rows = self.kernel_packed_rows(flat).to(self.dtype)
        else:
            rows = dequantize_weight(self.codes[flat], self.scale[flat], self.bits, self.group_size)
        return rows.reshape(*idx.shape, self.embedding_dim)

    def _check_ids(self, flat: Tensor) -> None:
        """IndexError naming the first id outside 0..num_embeddings - 1, as nn.Embedding refuses
        them: indexing the codes would read a negative id's row from the table's end (the
        kernel layout's, from another block's bytes) without a word."""
        outside = (flat < 0) | (flat >= self.num_embeddings)
        if bool(outside.any()):
            bad = int(flat[outside][0])
            raise IndexError(
                f"token id {bad} is out of range for an embedding table of "
                f"{self.num_embeddings} rows (ids 0..{self.num_embeddings - 1})"
            )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # rows follow model.to(dtype)
        return super()._apply(fn, recurse)
