"""Multi-task dialogue model (stage kind "dialogue"): a seq2seq responder + an intent classifier.

ONE Seq2SeqLM whose encoder output also feeds an intent head (the mean of the encoder states over
the real source tokens, then a Linear), trained through the one loop with
loss = response NLL + intent_weight * intent cross-entropy. The data is a data stage run over the
`dialogues` stage's dialogues.jsonl (cleaned, PII anonymized); each row keeps the dialogue's own
split (dialogue_split: by function, so held-out dialogues ask about unseen functions), which is
used here instead of the data stage's text-hash split.

final/ is a BART-layout model directory (servable, transformers-loadable) with the tokenizer files,
generation_config.json (decoder_start_token_id, eos) and the intent head: intent_head.safetensors
+ intent_head.json (labels, pooling), read back by load_intent_head. Held-out test dialogues are
scored: ROUGE-1/2/L, BLEU and exact match of greedy responses (finetune.seq2seq's evaluation),
intent accuracy and macro-F1. Rows, ids and scoring are finetune.seq2seq's (sources end in eos).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lmforge.artifacts import StageContext, require_artifact
from lmforge.common.io import read_jsonl, write_jsonl
from lmforge.config import Section, StageConfig
from lmforge.errors import InputError
from lmforge.finetune.dialogue_data import parse_dialogue
from lmforge.finetune.heads import classification_metrics
from lmforge.finetune.seq2seq import Seq2SeqIds, encode_pairs, seq2seq_eval
from lmforge.model.transformer import next_token_loss
from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import ModelSection

INTENT_HEAD = "intent_head.safetensors"
INTENT_META = "intent_head.json"
DATA_HINT = "run a data stage over @dialogues/dialogues.jsonl (recipe dialogue-assistant)"


class DialogueEval(Section):
    max_examples: int = Field(200, ge=1, description="held-out test dialogues generated")
    max_new_tokens: int = Field(48, ge=1, description="response length cap (tokens)")


class DialogueConfig(StageConfig):
    """`stage: dialogue`: trains the multi-task responder + intent classifier."""

    data: Path = Field(description="data stage directory over the dialogues stage's output")
    tokenizer: Path = Field(description="tokenizer directory")
    model: ModelSection = Field(default_factory=lambda: ModelSection(preset="bart-tiny"))
    intent_weight: float = Field(0.5, ge=0, description="weight of the intent cross-entropy")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: DialogueEval = Field(default_factory=DialogueEval)

    def inputs(self) -> list[Path]:
        return [self.data, self.tokenizer]


class DialogueModel(nn.Module):
    """Seq2SeqLM + intent head over the mean-pooled encoder states."""

    def __init__(self, seq2seq: nn.Module, n_intents: int) -> None:
        super().__init__()
        self.seq2seq = seq2seq
        self.intent_head = nn.Linear(seq2seq.config.n_embd, n_intents)
        nn.init.normal_(self.intent_head.weight, std=seq2seq.config.init_std)
        nn.init.zeros_(self.intent_head.bias)

    def intent_logits(self, memory: Tensor, src_mask: Tensor) -> Tensor:
        m = src_mask.to(memory.dtype)[..., None]  # (B, S, 1)
        pooled = (memory * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, C)
        return self.intent_head(pooled)

    def forward(self, src: Tensor, src_mask: Tensor, dec_in: Tensor) -> tuple[Tensor, Tensor]:
        """(response logits (B, T, V), intent logits (B, n_intents)) from one encoder pass."""
        s2s = self.seq2seq
        memory = s2s.encode(src, src_mask)
        h = s2s.decode(dec_in, s2s.cross_kv(memory), src_mask)
        return s2s.logits(h), self.intent_logits(memory, src_mask)


def _losses(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(response NLL, intent CE, intent logits) of a batch, from one forward pass."""
    logits, intents = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    nll = next_token_loss(logits, batch["labels"])  # as Seq2SeqLM.forward with labels
    return nll, F.cross_entropy(intents.float(), batch["intent"]), intents


def make_loss(intent_weight: float):
    """The loop's loss_fn: response NLL + intent_weight * intent CE."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        nll, ce, _ = _losses(model, batch)
        return nll + intent_weight * ce, {"response_nll": nll.detach(), "intent_ce": ce.detach()}

    return loss_fn


class Encoded:
    """A split's dialogues as finetune.seq2seq's padded rows plus each one's intent index."""

    def __init__(self, rows: list[dict[str, Any]], tok: TokenizerFiles, ids: Seq2SeqIds,
                 max_len: int, intents: list[str]) -> None:  # fmt: skip
        self.examples = [{"source": r["context"], "target": r["response"]} for r in rows]
        self.rows, self.truncated = encode_pairs(tok, self.examples, ids, max_len)
        index = {name: i for i, name in enumerate(intents)}
        self.rows["intent"] = np.array([index[r["intent"]] for r in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, idx: np.ndarray) -> dict[str, Tensor]:
        return {k: torch.from_numpy(v[idx]) for k, v in self.rows.items()}


def load_splits(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The data stage's rows regrouped by their dialogue split."""
    require_artifact(data_dir, ["train.jsonl.zst"], hint=DATA_HINT)
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for name in out:
        path = data_dir / f"{name}.jsonl.zst"
        for row in read_jsonl(path) if path.exists() else ():
            d = parse_dialogue(row, str(path))
            out[d["split"]].append(d)
    for name, rows in out.items():
        if not rows:
            raise InputError(f"{data_dir}: no {name} dialogues after cleaning; {DATA_HINT}")
    return out


def eval_fn_for(val: Encoded, batch_size: int, intent_weight: float):
    @torch.no_grad()
    def eval_fn(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        losses, nlls, hits = [], [], 0
        for lo in range(0, len(val), batch_size):
            idx = np.arange(lo, min(lo + batch_size, len(val)))
            batch = {k: v.to(device) for k, v in val.batch(idx).items()}
            nll, ce, intents = _losses(model, batch)
            losses.append(float(nll + intent_weight * ce) * len(idx))
            nlls.append(float(nll) * len(idx))
            hits += int((intents.argmax(-1) == batch["intent"]).sum())
        n = len(val)
        return {"val_loss": sum(losses) / n, "val_response_nll": sum(nlls) / n,
                "val_intent_accuracy": hits / n}  # fmt: skip

    return eval_fn


def save_intent_head(model: DialogueModel, intents: list[str], out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.intent_head.state_dict().items()}
    save_file(state, str(out / INTENT_HEAD))
    meta = {"labels": intents, "pooling": "mean of encoder states over source tokens"}
    (out / INTENT_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_intent_head(model_dir: Path | str) -> tuple[nn.Linear, list[str]]:
    """The intent head saved beside a dialogue model, and its labels."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    require_artifact(model_dir, [INTENT_HEAD, INTENT_META], hint="train it with stage dialogue")
    labels = json.loads((model_dir / INTENT_META).read_text(encoding="utf-8"))["labels"]
    state = load_file(str(model_dir / INTENT_HEAD))
    head = nn.Linear(state["weight"].shape[1], len(labels))
    head.load_state_dict(state)
    return head.eval(), labels


@torch.no_grad()
def predict_intents(model: DialogueModel, data: Encoded, batch_size: int = 64) -> np.ndarray:
    """Intent of each of data's dialogues from the encoder alone."""
    model.eval()
    device, out = next(model.parameters()).device, []
    for lo in range(0, len(data), batch_size):
        b = data.batch(np.arange(lo, min(lo + batch_size, len(data))))
        src, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        out.append(model.intent_logits(model.seq2seq.encode(src, mask), mask).argmax(-1).cpu())
    return torch.cat(out).numpy()


def evaluate(model: DialogueModel, test: Encoded, rows: list[dict[str, Any]],
             tok: TokenizerFiles, cfg: DialogueConfig, ids: Seq2SeqIds,
             intents: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """Held-out responses (finetune.seq2seq's ROUGE/BLEU/exact match) and intents."""
    n = min(len(rows), cfg.eval.max_examples)
    scores, outputs = seq2seq_eval(model.seq2seq, tok, test.examples[:n], ids,
                                   cfg.eval.max_new_tokens, batch_size=32)  # fmt: skip
    pred = predict_intents(model, test)
    samples = [{"context": o["source"], "reference": o["target"], "prediction": o["output"],
                "intent": rows[i]["intent"], "predicted_intent": intents[int(pred[i])]}
               for i, o in enumerate(outputs)]  # fmt: skip
    cls = classification_metrics(test.rows["intent"].tolist(), pred.tolist(), len(intents))
    metrics = {
        **{f"test_{k}": v for k, v in scores.items()},
        "test_responses": n,
        **{f"intent_{k}": v for k, v in cls.items()},
        "intent_test_dialogues": len(test),
    }
    return metrics, samples


def build(cfg: DialogueConfig, ctx: StageContext) -> dict[str, Any]:
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM
    from lmforge.train.distributed import unwrap
    from lmforge.train.loader import RowBatches
    from lmforge.train.loop import train

    tok = TokenizerFiles.load(cfg.tokenizer)
    splits = load_splits(cfg.data)
    intents = sorted({r["intent"] for rows in splits.values() for r in rows})
    ids = Seq2SeqIds.of({}, tok)  # from scratch: the tokenizer's eos, bos as decoder start
    enc = {s: Encoded(rows, tok, ids, cfg.train.seq_len, intents) for s, rows in splits.items()}
    overrides = {"vocab_size": tok.vocab_size, **cfg.model.overrides()}
    mcfg = preset_config(cfg.model.preset, **overrides)
    if not mcfg.n_dec_layer:
        raise InputError(f"model.preset {cfg.model.preset!r} is not encoder-decoder; use bart-*")
    torch.manual_seed(cfg.train.seed)
    model = DialogueModel(Seq2SeqLM(mcfg), len(intents))
    ctx.log.info("dialogue: %s, %.2fM parameters, %d intents, %s dialogues", cfg.model.preset,
                 sum(p.numel() for p in model.parameters()) / 1e6, len(intents),
                 {s: len(e) for s, e in enc.items()})  # fmt: skip
    batch_size = min(cfg.train.micro_batch_size, len(enc["train"]))
    loader = RowBatches(enc["train"].rows, batch_size, seed=cfg.train.seed)
    result = train(
        model, make_loss(cfg.intent_weight), loader, cfg.train, ctx,
        eval_fn=eval_fn_for(enc["val"], cfg.train.micro_batch_size, cfg.intent_weight),
    )  # fmt: skip
    model = unwrap(result.model).cpu().float()
    metrics, samples = evaluate(model, enc["test"], splits["test"], tok, cfg, ids, intents)
    special = ids.config(tok.bos_id)
    with ctx.atomic_path(ctx.out / "final") as tmp:
        save_pretrained(model.seq2seq, tmp, extra_config=special, generation_config=special)
        copy_tokenizer_files(cfg.tokenizer, tmp)
        save_intent_head(model, intents, tmp)
    write_jsonl(ctx.out / "samples.jsonl", samples)
    ctx.atomic_write_json(ctx.out / "eval.json", {"intents": intents, **metrics})
    return {"train_loss": round(float(result.train_loss), 4),
            "val_loss": round(float(result.val_loss), 4) if result.val_loss is not None else None,
            "steps": result.step, "truncated": enc["train"].truncated, **metrics}  # fmt: skip
