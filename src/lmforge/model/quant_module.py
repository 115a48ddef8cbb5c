"""What QuantLinear and QuantEmbedding share: where an int4 weight's codes live and how they
travel in state dicts.

An int4 weight stays in our layout (model.quant_rounding) or, `kernel_packed`, only in torch's
CPU int4 kernel layout (model.int4pack); state dicts always hold our layout, packed again at load
for this machine's kernel, since the kernel's bytes differ with the CPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from lmforge.model import int4pack

# A table tied to the LM head holds one packed weight (int4pack, scales_and_zeros) in both
# modules. Its state dict entries in our layout are then one pair of tensors too (stored once:
# train.checkpoint.save_weights' aliases, torch.save's shared storage), and a state dict's one
# pair packs once at load, so the modules stay tied under load_state_dict(assign=True). Both
# maps hold the other side weakly: nothing outlives the state dict or the module holding it.
# An unpacked pair serves only the state dict it is written into, so each state_dict() call
# unpacks afresh (a write to the buffers that no version counter sees, through .data, cannot
# leave a later one stale); a packed pair serves any later load of the same two tensors, as
# load_state_dict hands each module a dict of its own.
_OURS_OF_PACKED = WeakIdKeyDictionary()  # a module's int4pack -> Shared (codes, scale)
_PACKED_OF_OURS = WeakIdKeyDictionary()  # a state dict's codes -> Shared (int4pack, s_and_z)


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
        if not self.kernel_packed:
            return
        names = (prefix + "codes", prefix + "scale")
        key, partner = self.int4pack, self.scales_and_zeros
        ours = _shared(_OURS_OF_PACKED, key, partner, scope=destination)
        if ours is None:  # unpacked here, unless a module sharing the weight already did
            int4pack.state_to_ours(destination, prefix, self.weight_shape[0])
            ours = tuple(destination[n] for n in names)
            _OURS_OF_PACKED[key] = _Shared(key, partner, *ours, scope=destination)
        else:
            del destination[prefix + "int4pack"], destination[prefix + "scales_and_zeros"]
        destination[names[0]], destination[names[1]] = ours

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
            error_msgs += self._pack_loaded(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _pack_loaded(self, state_dict: dict, prefix: str) -> list[str]:
        """state_dict's codes and scale under prefix packed for this machine's kernel, in place
        (int4pack.state_to_kernel), once for a pair another module packed already; its error."""
        codes, scale = state_dict.get(prefix + "codes"), state_dict.get(prefix + "scale")
        packed = None if codes is None else _shared(_PACKED_OF_OURS, codes, scale)
        if packed is not None:
            del state_dict[prefix + "codes"], state_dict[prefix + "scale"]
            state_dict[prefix + "int4pack"], state_dict[prefix + "scales_and_zeros"] = packed
            return []
        error = int4pack.state_to_kernel(state_dict, prefix, self.weight_shape, self.group_size)
        if error is None and codes is not None and scale is not None:
            packed = (state_dict[prefix + "int4pack"], state_dict[prefix + "scales_and_zeros"])
            _PACKED_OF_OURS[codes] = _Shared(codes, scale, *packed)
        return [error] if error else []

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        """nn.Module._apply (model.to(device or dtype), .float(), .half(), .cuda()) converting
        each buffer once per call (_once_per_call): a table tied to the LM head and the head go
        on sharing one tensor, where nn.Module would give each module a copy of its own. A
        kernel-packed weight's scales_and_zeros only move, staying bf16: the kernel takes no
        other dtype (torch 2.13: "expected scalar type BFloat16"), bf16 -> fp16 would lose range."""
        convert = fn
        if self.kernel_packed:
            scales = self.scales_and_zeros
            device = fn(torch.empty(0, device=scales.device)).device

            def convert(t: Tensor) -> Tensor:
                return t.to(device) if t is scales else fn(t)

        return super()._apply(_once_per_call(fn, convert), recurse)


# One model.to()'s conversion (its fn, which nn.Module._apply passes down to every submodule)
# -> the tensors it converted -> their results; an entry lives as long as that fn.
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _once_per_call(fn: Callable[[Tensor], Tensor], convert: Callable[[Tensor], Tensor]):
    """convert, run once per tensor across the modules one call of fn reaches: the modules that
    shared a tensor before share its result. A result is reused only while the tensor is
    unchanged (its version counter; an inference tensor keeps none and is not written to). An fn
    that takes no weak reference (model._apply(torch.Tensor.half)) gets convert as it is, as from
    nn.Module: no call to tell apart, so the modules' results are their own."""
    try:
        done = _CONVERTED.setdefault(fn, WeakIdKeyDictionary())
    except TypeError:  # "cannot create weak reference to 'method_descriptor' object"
        return convert

    def once(t: Tensor) -> Tensor:
        version = _versions(t)
        hit = done.get(t)
        if hit is not None and hit[0] == version:
            return hit[1]
        out = convert(t)
        done[t] = (version, out)
        return out

    return once


class _Shared:
    """Weak references to the pair (first, second) made from a key tensor and its partner, and
    the versions of all four: stale once any is gone or was written to in place (never reused
    when one is an inference tensor, whose writes no version counter sees)."""

    def __init__(
        self, key: Tensor, partner: Tensor, first: Tensor, second: Tensor, scope: object = None
    ) -> None:
        self.partner = weakref.ref(partner)
        self.first, self.second = weakref.ref(first), weakref.ref(second)
        self.versions = _versions(key, partner, first, second)
        self.scope = _weak_or_none(scope)  # the one state dict the pair serves, if any


def _weak_or_none(obj: object) -> weakref.ref | None:
    """A weak reference to obj; None for None or an object that takes none (a plain dict)."""
    try:
        return None if obj is None else weakref.ref(obj)
    except TypeError:
        return None


def _shared(
    made: WeakIdKeyDictionary, key: Tensor, partner: Tensor | None, scope: object = None
) -> tuple[Tensor, Tensor] | None:
    """The pair made[key] made from key and partner, if all four are alive and unchanged (and,
    with scope, made for scope)."""
    entry = made.get(key)
    if entry is None or partner is None or entry.partner() is not partner:
        return None
    if scope is not None and (entry.scope is None or entry.scope() is not scope):
        return None
    first, second = entry.first(), entry.second()
    if first is None or second is None:
        return None
    versions = _versions(key, partner, first, second)
    if versions is None or versions != entry.versions:
        return None
    return first, second


def _versions(*tensors: Tensor) -> tuple[int, ...] | None:
    """The tensors' version counters; None if one was made under torch.inference_mode, which
    keeps none (reading it raises), so an in-place write to it cannot be told."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple(t._version for t in tensors)
