"""Many LoRA adapters on one served base model, their rows mixed in one batch (vLLM's multi-LoRA).

`attach_adapters(model, adapters)` swaps every linear an adapter targets for a MultiLoRALinear:
the base linear plus all adapters' A stacked row-wise, (n * r, in), and their B column-wise,
(out, n * r), each adapter's rank zero-padded to the layer's largest and alpha / r folded into B.
Before each forward the engine names each row's adapter (AdapterSlots.select); the layer runs x
through every adapter's A in one matmul, zeroes in each row the columns of the adapters it does
not use (torch.where with a (B, n * r) mask: exact zeros even where another adapter's column
overflowed; a base row's are all zeros), and adds the result through B in a second matmul: rows of several adapters and of the base run in one forward pass, prefill (whole
or chunked) or decoding step, over the same KV cache layout, and each row gets exactly its own
B A x (the other columns add exact zeros). Two dense matmuls cost less on a CPU than a gather of
each row's A and B and two batched matmuls (B tiny ones per decoding step) while n * r stays
small next to the layer's width (docs/benchmarks.md, multi-LoRA). A forward with no adapter row
runs the base alone, as before. A change of the adapters while serving (Engine.load_adapter)
builds the new stacks beside the model (stack_adapters, from the installed stacks' views and the
new adapter's updates: each adapter is held once) and installs them between two steps (install),
unwrapping the linears no adapter targets any more.

The selection is thread-local: the engine's thread sets it, and another thread running the same
module (the base's /v1/embeddings embedder) sees none and gets the base. Not supported, and
refused at start-up: a quantized base linear (kept-quantized int8/int4: the adapter would add to
weights it was not trained on) and the compiled decoding step (its graph does not see the slots).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.finetune.lora import replace_module


class AdapterSlots:
    """Adapter name -> slot (1..n; 0 is the base) in every MultiLoRALinear's stacks, and each
    row's slot for the next forward passes of the calling thread (None: no row has an adapter)."""

    def __init__(
        self,
        names: Sequence[str] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.slot = {name: i + 1 for i, name in enumerate(names)}
        self.device = torch.device(device)
        self._local = threading.local()

    def select(self, adapters: Sequence[str | None]) -> None:
        """Each row's adapter name (None: the base) for this thread's next forward passes."""
        if not self.slot:
            return
        slots = [0 if name is None else self.slot[name] for name in adapters]
        self._local.index = (
            torch.tensor(slots, dtype=torch.long, device=self.device) if any(slots) else None
        )
        self._local.masks = {}

    def current(self) -> Tensor | None:
        """(B,) the rows' slots as the calling thread last selected them; None: all base."""
        return getattr(self._local, "index", None)

    def mask(self, rank: int) -> Tensor:
        """(B, n * rank) True where a column belongs to the row's adapter, for the selected rows
        (one per layer rank, built once per selection)."""
        masks = self._local.masks
        if rank not in masks:
            owner = torch.arange(len(self.slot) * rank, device=self.device) // rank + 1
            masks[rank] = owner[None, :] == self._local.index[:, None]
        return masks[rank]


class MultiLoRALinear(nn.Module):
    """A base linear plus every adapter's low-rank update, picked per row (see module)."""

    def __init__(self, base: nn.Linear, a: Tensor, b: Tensor, slots: AdapterSlots) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a, persistent=False)  # (n * r, in)
        self.register_buffer("lora_b", b, persistent=False)  # (out, n * r), scaling folded in
        self.slots = slots
        self.rank = a.size(0) // len(slots.slot)

    @property
    def in_features(self) -> int:  # read when another adapter is checked against the model
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, in), or (B, in) (a head on last states)
        y = self.base(x)
        index = self.slots.current()
        if index is None:
            return y
        mask = self.slots.mask(self.rank)  # (B, n * r)
        mask = mask.view(mask.size(0), *[1] * (x.dim() - 2), mask.size(1))
        # where, not a 0/1 product: another adapter's column overflowing to inf (float16) would
        # give inf * 0 = NaN in this row; where's zero is exact whatever the column holds
        h = torch.where(mask, x @ self.lora_a.T, 0.0)  # (B, T, n * r)
        return y + h @ self.lora_b.T  # (B, T, out)


Stacks = dict[str, tuple[Tensor, Tensor]]  # linear's name -> (A stack, B stack)
Updates = dict[str, dict[str, tuple[Tensor, Tensor]]]  # adapter -> linear -> (A (r, in), B)


def attach_adapters(model: nn.Module, updates: Updates) -> AdapterSlots:
    """Installs the adapters (name -> our linear's name -> (A (r, in), B (out, r) scaled),
    serve/lora_adapters.py) into `model` in place; their slots, in the order given."""
    slots, stacks, _ = stack_adapters(model, updates)
    install(model, slots, stacks)
    return slots


def stack_adapters(model: nn.Module, updates: Updates) -> tuple[AdapterSlots, Stacks, Updates]:
    """The slots, every targeted linear's stacks (in the model's device and dtype) for exactly
    these adapters, and each adapter's updates as views into those stacks, built without
    touching the model (a runtime change is built beside the running model, then installed
    between two steps). The views are what the next change is built from: the adapters are
    held once, in the stacks, not again as the float32 updates they were read as."""
    params = next(model.parameters())
    slots = AdapterSlots(list(updates), params.device)
    n = len(updates)
    stacks: Stacks = {}
    views: Updates = {name: {} for name in updates}
    for module_name in sorted({module for adapter in updates.values() for module in adapter}):
        base = _base_linear(model, module_name)
        rank = max(adapter[module_name][0].size(0) for adapter in updates.values()
                   if module_name in adapter)  # fmt: skip
        a = torch.zeros(n * rank, base.in_features, device=params.device, dtype=params.dtype)
        b = torch.zeros(base.out_features, n * rank, device=params.device, dtype=params.dtype)
        for i, (name, adapter) in enumerate(updates.items()):
            if module_name in adapter:  # else its columns stay zero: the base for it
                a_i, b_i = adapter[module_name]
                cols = slice(i * rank, i * rank + a_i.size(0))
                a[cols], b[:, cols] = a_i, b_i
                views[name][module_name] = (a[cols], b[:, cols])
        _check_finite(a, b, module_name, params.dtype)
        stacks[module_name] = (a, b)
    return slots, stacks, views


def _check_finite(a: Tensor, b: Tensor, module_name: str, dtype: torch.dtype) -> None:
    """An adapter whose weights overflow the model's dtype would put inf, and NaN (inf * 0),
    into every row of the layer, not only its own."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ConfigError(
            f"{module_name}: a LoRA adapter's A or B (alpha / r folded in) overflows the "
            f"served model's {dtype}; serve the base in float32 or bfloat16, or rescale the "
            "adapter"
        )


def install(model: nn.Module, slots: AdapterSlots, stacks: Stacks) -> None:
    """Every linear in `stacks` becomes (or stays) a MultiLoRALinear with these stacks; one that
    an earlier set of adapters wrapped and this set does not target is its base linear again."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    for module_name in wrapped - set(stacks):
        replace_module(model, module_name, model.get_submodule(module_name).base)
    for module_name, (a, b) in stacks.items():
        base = _base_linear(model, module_name)
        replace_module(model, module_name, MultiLoRALinear(base, a, b, slots))


def _base_linear(model: nn.Module, module_name: str) -> nn.Linear:
    module = model.get_submodule(module_name)
    base = module.base if isinstance(module, MultiLoRALinear) else module
    if type(base) is not nn.Linear:
        raise ConfigError(
            f"{module_name} is a {type(base).__name__}, not a plain linear layer: served "
            "adapters update linear layers of an unquantized base only (a kept-quantized "
            "base's are quantized modules; an embedding is not served adapted); serve the "
            "unquantized base, or merge the adapter (finetune.lora.merge) and serve that"
        )
    return base
