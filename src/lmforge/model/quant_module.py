"""What QuantLinear and QuantEmbedding share: where an int4 weight's codes live and how they
travel in state dicts.

An int4 weight stays in our layout (model.quant_rounding) or, `kernel_packed`, only in torch's
CPU int4 kernel layout (model.int4pack); state dicts always hold our layout, packed again at load
for this machine's kernel, since the kernel's bytes differ with the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lmforge.model import int4pack


class QuantModule(nn.Module):
    """Base of the quantized modules: the buffers of a kernel-packed int4 weight, its rows read
    back, and state dicts in our layout (int4pack.state_to_ours): checkpoints that load on any
    CPU. Subclasses set `kernel_packed`, `group_size` and `weight_shape` in __init__."""

    kernel_packed: bool
    group_size: int
    weight_shape: tuple[int, int]  # (rows, columns) of the weight stood for, no kernel padding

    @property
    def stored_codes(self) -> Tensor:
        """The tensor holding the codes, in whichever layout the module keeps them."""
        return self.int4pack if self.kernel_packed else self.codes

    def register_kernel_buffers(self, rows: int, cols: int, group_size: int) -> None:
        """An int4 (rows, cols) weight's buffers in torch's int4 kernel layout (model.int4pack),
        its rows padded to the kernel's multiple, and that layout (`layout`), read here rather
        than in forward: under torch.compile int4pack_layout's cache and device context would
        break the graph at every such layer."""
        self.layout = int4pack.int4pack_layout()
        rows = int4pack.padded_rows(rows)
        self.register_buffer("int4pack", torch.empty(rows, cols // 2, dtype=torch.uint8))
        groups = torch.empty(cols // group_size, rows, 2, dtype=torch.bfloat16)
        self.register_buffer("scales_and_zeros", groups)

    def kernel_args(self) -> tuple[Tensor, Tensor, int]:
        """(packed, scales_and_zeros, group_size) of a kernel-packed weight."""
        return self.int4pack, self.scales_and_zeros, self.group_size

    def kernel_packed_rows(self, rows: Tensor | None) -> Tensor:
        """Float32 rows (all of them for None) of a kernel-packed weight, read back from its
        bytes."""
        n_rows = self.weight_shape[0]
        if rows is None:
            return int4pack.dequantize(*self.kernel_args(), self.layout, n_rows)
        packed, scales_and_zeros, group_size = self.kernel_args()
        # the padding rows' scales out of reach: a row past the weight raises
        return int4pack.dequantize_rows(
            packed, scales_and_zeros[:, :n_rows], group_size, rows, self.layout
        )

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_packed:
            int4pack.state_to_ours(destination, prefix, self.weight_shape[0])

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.kernel_packed:
            error = int4pack.state_to_kernel(state_dict, prefix, self.weight_shape, self.group_size)
            error_msgs += [error] if error else []
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        """nn.Module._apply (model.to(dtype), .float(), .half(), .cuda()) with a kernel-packed
        weight's scales_and_zeros kept as they are, bf16: the kernel takes no other dtype (torch
        2.13: "expected scalar type BFloat16"), bf16 -> fp16 would lose range, and a tied pair
        keeps sharing them."""
        if not self.kernel_packed:
            return super()._apply(fn, recurse)
        scales = self.scales_and_zeros
        super()._apply(fn, recurse)
        self.scales_and_zeros = scales.to(self.int4pack.device)
        return self
