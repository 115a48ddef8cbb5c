"""LoRA by module replacement: inject adapters, train only them, merge, save in PEFT's format.

`inject(model, LoraConfig)` freezes the model and swaps every nn.Linear whose name matches a
target pattern for a LoRALinear: y = base(x) + (alpha / r) * B(A(dropout(x))), with B zero at
the start so the model is unchanged until it trains. With `quantize: int8|int4` the frozen base
Linear is first replaced by a weight-only QuantLinear (QLoRA-style; an int4 base's forward runs
torch's CPU int4 kernel, in training too, where it takes the shape: model.quant. The base then
computes with bf16 activations (its output cast back to the model's dtype; the adapters stay in
it) and bf16-rounded scales, which merge() keeps: the weights it trained with). `merge(model)`
folds the adapters back into plain nn.Linear weights. `save_peft_adapter` writes
adapter_config.json + adapter_model.safetensors under PEFT's key names for the Hugging Face export
of the same model, splitting our fused q/k/v and gate/up projections with the export's own name
table; `load_peft_adapter` reads one back, ours or Hugging Face PEFT's, exactly
(finetune/peft_adapter.py, the reading serving shares).
"""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lmforge.common.io import atomic_path, atomic_write_json
from lmforge.config import Section
from lmforge.errors import ConfigError
from lmforge.model.quant import QuantLinear, quantized_numel
from lmforge.model.t5 import wraps_transformers

DEFAULT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]


class LoraConfig(Section):
    """Where adapters go and how big they are (the `lora:` section of finetune)."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: updates scale by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="module name patterns to adapt: a suffix ('attn.qkv') or a glob ('blocks.0.*')",
    )
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="weight-only quantize the frozen base (QLoRA-style): none|int8|int4"
    )
    group_size: int = Field(32, ge=2, description="int4: input columns sharing one scale")


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (PEFT's lora_A / lora_B)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        in_f, out_f = base.in_features, base.out_features
        self.lora_A = nn.Linear(in_f, r, bias=False)
        self.lora_B = nn.Linear(r, out_f, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.lora_A.in_features

    @property
    def out_features(self) -> int:
        return self.lora_B.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> Tensor:
        """The update as a dense (out, in) matrix: scaling * B @ A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding base + update (dequantized when the base was quantized:
        an int4 base packed for the kernel with its bf16 scales)."""
        base = self.base
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None)
        with torch.no_grad():
            weight = base.weight.detach().float() + self.delta_weight().detach().float()
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias.detach())
        return linear.to(self.lora_A.weight.device, self.lora_A.weight.dtype)


def matches(name: str, patterns: list[str]) -> bool:
    """True when a module name equals, ends with ('.' + pattern) or globs one of the patterns."""
    return any(
        name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freezes `model` and replaces matching nn.Linear modules with LoRALinear (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    tied = _tied_linear_names(model)
    chosen = [n for n in names if matches(n, cfg.targets) and n not in tied]
    if not chosen:
        raise ConfigError(
            f"lora.targets {cfg.targets} match no linear layer; linear layers are e.g. "
            f"{', '.join(names[:6])}"
        )
    for name in chosen:
        base = model.get_submodule(name)
        if cfg.quantize != "none":
            base = QuantLinear.from_linear(base, cfg.quantize, cfg.group_size)
        device = next(iter(model.parameters())).device
        replace_module(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout).to(device))
    return model


def _tied_linear_names(model: nn.Module) -> set[str]:
    """Linears whose weight is shared with another module (a tied lm_head): not adaptable."""
    seen: dict[int, str] = {}
    tied = set()
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen and isinstance(module, nn.Linear):
                tied.add(name)
            seen.setdefault(id(p), name)
    return tied


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Name -> LoRALinear of every adapter in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base: the model becomes a plain Transformer again."""
    for name, module in lora_modules(model).items():
        replace_module(model, name, module.merged())
    return model


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors count once, quantized codes count."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    total += quantized_numel(model)
    return sum(p.numel() for p in params if p.requires_grad), total


# --------------------------------------------------------------------------- PEFT format


def peft_tensors(model: nn.Module) -> tuple[dict[str, Tensor], list[str], bool]:
    """(PEFT state dict, HF module names adapted, fan_in_fan_out) for the model's HF export."""
    rules = _hf_rules(model)
    tensors: dict[str, Tensor] = {}
    hf_modules: list[str] = []
    for name, module in lora_modules(model).items():
        rule = rules.get(f"{name}.weight")
        if rule is None:
            raise ConfigError(
                f"adapted module {name} has no Hugging Face name; drop it from lora.targets"
            )
        a = module.lora_A.weight.detach().cpu().contiguous()
        b = module.lora_B.weight.detach().cpu()
        parts = b.split(list(rule.sizes), dim=0) if rule.sizes else (b,)
        for hf_name, b_part in zip(rule.hf_names, parts, strict=True):
            hf_module = hf_name.removesuffix(".weight")
            hf_modules.append(hf_module)
            tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a.clone()
            tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b_part.contiguous()
    fan_in_fan_out = any(r.transpose for r in rules.values())
    return tensors, hf_modules, fan_in_fan_out


def _hf_rules(model: nn.Module) -> dict:
    """Our parameter name -> hf_families.Rule for the model's Hugging Face export."""
    from lmforge.model.hf_families import FAMILIES, family_for
    from lmforge.model.hf_families.rules import Rule

    if wraps_transformers(model):  # the T5 adapter: names are transformers' own under "hf."
        names = [f"{n}.weight" for n in lora_modules(model)]
        return {n: Rule(n, (n.removeprefix("hf."),)) for n in names}
    model_type = family_for(model.config)
    if model_type is None:
        raise ConfigError(
            "this model has no Hugging Face equivalent, so PEFT adapters cannot be written; "
            "use a llama/mistral/qwen2/gpt2-style model"
        )
    return {r.ours: r for r in FAMILIES[model_type].rules(model.config)}


def save_peft_adapter(
    model: nn.Module,
    out_dir: Path,
    base_model: str = "",
    head: dict[str, Tensor] | None = None,
    task_type: str | None = None,
) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors that peft.PeftModel loads.

    head: a task head trained in full next to the adapters (an encoder classifier's pooler and
    classifier, under transformers' names): saved as PEFT's modules_to_save, so the adapter on
    the base's *ForSequenceClassification / *ForTokenClassification is the tuned model.
    """
    from safetensors.torch import save_file

    tensors, hf_modules, fan_in_fan_out = peft_tensors(model)
    head = head or {}
    tensors.update({f"base_model.model.{k}": v.contiguous() for k, v in head.items()})
    # whole modules, as PEFT wraps them: "classifier" (which SEQ_CLS/TOKEN_CLS wrap anyway) and
    # BERT's "bert.pooler.dense"
    modules_to_save = (
        sorted({"classifier" if k.startswith("classifier.") else k.rsplit(".", 1)[0] for k in head})
        or None
    )
    first = next(iter(lora_modules(model).values()))
    shapes = {(m.r, m.alpha): n for n, m in lora_modules(model).items()}
    if len(shapes) > 1:  # one r and lora_alpha in adapter_config.json for every module
        (r1, a1), (r2, a2) = list(shapes)[:2]
        raise ConfigError(
            f"the adapters have several ranks ({shapes[(r1, a1)]}: r={r1} alpha={a1}, "
            f"{shapes[(r2, a2)]}: r={r2} alpha={a2}; a Hugging Face adapter loaded with "
            "separate q/k/v A), which one adapter_config.json cannot say; merge them "
            "(finetune.lora.merge) and save the merged model instead"
        )
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    # Exact module names as one regex, so PEFT adapts these modules and no others.
    targets = "^(" + "|".join(re.escape(m) for m in hf_modules) + ")$"
    config = {
        "peft_type": "LORA",
        "task_type": task_type
        or ("SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"),
        "base_model_name_or_path": base_model,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": modules_to_save,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out_dir / "adapter_config.json", config)
    return out_dir


def load_peft_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Freezes `model` and adds the adapter of `adapter_dir` (our export or Hugging Face PEFT's,
    read exactly by finetune/peft_adapter.py) as LoRALinear modules. A fused linear whose PEFT
    parts have their own A gets rank the sum of theirs, alpha scaled to keep PEFT's factor
    (alpha / r, or alpha / sqrt(r) with use_rslora), so its outputs are PEFT's."""
    from lmforge.finetune.peft_adapter import peft_scaling, read_peft_updates

    updates, config = read_peft_updates(model, adapter_dir)
    scaling = peft_scaling(config)
    dropout = float(config.get("lora_dropout") or 0.0)
    device = next(iter(model.parameters())).device
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for name, (a, b) in updates.items():
            base = model.get_submodule(name)
            rank = a.size(0)
            module = LoRALinear(base, rank, scaling * rank, dropout)
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
            replace_module(model, name, module.to(device))
    return model
