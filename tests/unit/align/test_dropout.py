"""Dropout off while aligning (TRL's disable_dropout=True): the policy's train-mode log-probs equal
the eval-mode ones they are compared with, and the exported config keeps its rate."""

import json
import math

import pytest
import torch
from torch import nn

from lmforge.align.dropout import disable_dropout
from lmforge.align.stage import AlignConfig, align
from lmforge.finetune.lora import LoraConfig, LoRALinear, inject
from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer

from ..finetune.helpers import make_model_dir
from .test_stage import _prefs


def _only(kind: str) -> Transformer:
    """A micro model with LoRA adapters whose only non-zero dropout is `kind`."""
    torch.manual_seed(0)
    model = Transformer(preset_config("micro", vocab_size=50, dropout=0.5))
    inject(model, LoraConfig(dropout=0.5))
    with torch.no_grad():  # LoRA B starts at 0: give the adapters an output to drop
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora = {id(m.dropout) for m in model.modules() if isinstance(m, LoRALinear)}
    for m in model.modules():
        if isinstance(m, nn.Dropout) and kind != ("lora" if id(m) in lora else "residual"):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float) and kind != "attention":
            m.dropout = 0.0  # the attention's SDPA dropout_p
    return model


@pytest.mark.parametrize("kind", ["residual", "attention", "lora"])
def test_disable_dropout_zeroes_every_kind_of_dropout(kind):
    model, ids = _only(kind), torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        want = model.eval()(ids)
        assert not torch.allclose(model.train()(ids), want)  # this dropout alone is on
        disable_dropout(model)
        assert torch.allclose(model.train()(ids), want, atol=1e-6)
    assert model.config.dropout == 0.5  # exported as trained from


@pytest.mark.parametrize("disable", [True, False])
def test_dpo_starts_at_log_2_only_with_dropout_off(tmp_path, tokenizer_dir, disable):
    """The policy starts as the reference: DPO's first loss is -log sigmoid(0) = log 2 exactly
    when dropout is off; with the model's dropout on, its train-mode log-probs differ."""
    model = make_model_dir(tmp_path / "m", tokenizer_dir, dropout=0.3)
    train = {"max_steps": 1, "seq_len": 48, "micro_batch_size": 8, "warmup_steps": 0,
             "eval_every": 0, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip
    cfg = AlignConfig(
        model=model, data=_prefs(tmp_path / "prefs.jsonl"), out=tmp_path / "dpo", method="dpo",
        disable_dropout=disable, train=train, eval={"rouge_examples": 0},
    )  # fmt: skip
    out = align(cfg)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (abs(first["loss"] - math.log(2)) < 1e-5) is disable
    assert json.loads((out / "final" / "config.json").read_text())["lmforge"]["dropout"] == 0.3
