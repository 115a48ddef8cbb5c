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
overall and per intent, intent accuracy and macro-F1. Rows, ids and scoring are finetune.seq2seq's
(sources end in eos).

With `retrieval.kb` (a knowledge-base stage) the responder is retrieval-augmented: each source is
the user turn + the top `retrieval.passages` passages KnowledgeBase.search finds for it (those
scoring under `retrieval.min_score` left out), laid out by serve.retrieval_spec.RetrievalSpec.source --
the function the serving engine formats chat and completion sources with -- and
final/retrieval.json records the spec, so the server builds the same sources
(finetune.dialogue_retrieval). Held-out scores then include retrieval recall@k (the asked-about
function's passage among the top k) and, with `retrieval.compare`, the same training without
passages (no_retrieval/).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lmforge.artifacts import StageContext, require_artifact
from lmforge.common.io import read_jsonl, write_jsonl
from lmforge.common.logging import MetricsWriter
from lmforge.config import NOT_HASHED, Section, StageConfig
from lmforge.errors import InputError
from lmforge.finetune.dialogue_data import parse_dialogue
from lmforge.finetune.dialogue_retrieval import Retrieved, recall_at_k, retrieve
from lmforge.finetune.heads import classification_metrics, mean_pool
from lmforge.finetune.seq2seq import Seq2SeqIds, encode_pairs, seq2seq_eval
from lmforge.model.transformer import IGNORE_INDEX, next_token_loss
from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import ModelSection

INTENT_HEAD = "intent_head.safetensors"
INTENT_META = "intent_head.json"
DATA_HINT = "run a data stage over @dialogues/dialogues.jsonl (recipe dialogue-assistant)"


class DialogueEval(Section):
    max_examples: int = Field(200, ge=1, description="held-out test dialogues generated")
    max_new_tokens: int = Field(48, ge=1, description="response length cap (tokens)")
    batch_size: int = Field(
        32,
        ge=1,
        description="test dialogues decoded (and intent-classified) together; answers do not change",
        json_schema_extra=NOT_HASHED,
    )


class DialogueRetrieval(Section):
    """`retrieval:` sources = the user turn + its top passages from a knowledge-base stage."""

    kb: Path | None = Field(None, description="knowledge-base stage directory (none: no passages)")
    passages: int = Field(3, ge=1, description="passages per source (top k for the user turn)")
    min_score: float = Field(
        0.0, ge=0, description="BM25 floor: weaker passages are left out (0: none), as served"
    )
    compare: bool = Field(
        True, description="also train without passages (same steps, seed) in no_retrieval/"
    )


class DialogueConfig(StageConfig):
    """`stage: dialogue`: trains the multi-task responder + intent classifier."""

    data: Path = Field(description="data stage directory over the dialogues stage's output")
    tokenizer: Path = Field(description="tokenizer directory")
    model: ModelSection = Field(default_factory=lambda: ModelSection(preset="bart-tiny"))
    intent_weight: float = Field(0.5, ge=0, description="weight of the intent cross-entropy")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: DialogueEval = Field(default_factory=DialogueEval)
    retrieval: DialogueRetrieval = Field(default_factory=DialogueRetrieval)

    def inputs(self) -> list[Path]:
        return [self.data, self.tokenizer, *([self.retrieval.kb] if self.retrieval.kb else [])]


class DialogueModel(nn.Module):
    """Seq2SeqLM + intent head over the mean-pooled encoder states."""

    def __init__(self, seq2seq: nn.Module, n_intents: int) -> None:
        super().__init__()
        self.seq2seq = seq2seq
        self.intent_head = nn.Linear(seq2seq.config.n_embd, n_intents)
        nn.init.normal_(self.intent_head.weight, std=seq2seq.config.init_std)
        nn.init.zeros_(self.intent_head.bias)

    def intent_logits(self, memory: Tensor, src_mask: Tensor) -> Tensor:
        return self.intent_head(mean_pool(memory, src_mask))

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

    def __init__(self, rows: list[dict[str, Any]], sources: list[str], tok: TokenizerFiles,
                 ids: Seq2SeqIds, max_len: int, intents: list[str]) -> None:  # fmt: skip
        self.examples = [{"source": src, "target": r["response"]}
                         for src, r in zip(sources, rows, strict=True)]  # fmt: skip
        self.rows, self.truncated = encode_pairs(tok, self.examples, ids, max_len)
        index = {name: i for i, name in enumerate(intents)}
        self.rows["intent"] = np.array([index[r["intent"]] for r in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, idx: np.ndarray) -> dict[str, Tensor]:
        return trim({k: torch.from_numpy(v[idx]) for k, v in self.rows.items()})


def trim(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A batch cut to its longest source and target. encode_pairs pads a split's rows to its
    longest ones; padding is masked, so cutting it changes only the compute, which matters once
    sources carry passages (padded to the source budget, every row costs the longest)."""
    s = int(batch["attention_mask"].sum(1).max())
    t = int((batch["labels"] != IGNORE_INDEX).sum(1).max())
    cut = {"input_ids": s, "attention_mask": s, "decoder_input_ids": t, "labels": t}
    return {k: v[:, : cut[k]] if k in cut else v for k, v in batch.items()}


class TrimmedBatches:
    """The loop's loader: RowBatches (whose state checkpoints save) with each batch trimmed."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def __iter__(self) -> TrimmedBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return trim(next(self.batches))

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches.load_state_dict(state)


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


def per_intent_scores(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ROUGE-L, BLEU and exact match of the responses to each intent's dialogues."""
    from lmforge.evals.metrics import bleu, exact_match, rouge

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        groups[s["intent"]].append(s)
    out = {}
    for intent, group in sorted(groups.items()):
        hyp, ref = [s["prediction"] for s in group], [s["reference"] for s in group]
        out[intent] = {"rougeL": round(float(rouge(hyp, ref)["rougeL"]), 4),
                       "bleu": round(float(bleu(hyp, ref)["bleu"]), 4),
                       "exact_match": round(float(exact_match(hyp, ref)), 4),
                       "n": len(group)}  # fmt: skip
    return out


def evaluate(model: DialogueModel, test: Encoded, rows: list[dict[str, Any]],
             found: list[list[str]], tok: TokenizerFiles, cfg: DialogueConfig, ids: Seq2SeqIds,
             intents: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """Held-out responses (finetune.seq2seq's ROUGE/BLEU/exact match) and intents."""
    n = min(len(rows), cfg.eval.max_examples)
    scores, outputs = seq2seq_eval(model.seq2seq, tok, test.examples[:n], ids,
                                   cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)  # fmt: skip
    pred = predict_intents(model, test, cfg.eval.batch_size)
    samples = [{"context": rows[i]["context"], "passages": found[i], "source": o["source"],
                "reference": o["target"],
                "prediction": o["output"], "intent": rows[i]["intent"],
                "predicted_intent": intents[int(pred[i])]}
               for i, o in enumerate(outputs)]  # fmt: skip
    cls = classification_metrics(test.rows["intent"].tolist(), pred.tolist(), len(intents))
    metrics = {
        **{f"test_{k}": v for k, v in scores.items()},
        "test_responses": n,
        **{f"intent_{k}": v for k, v in cls.items()},
        "intent_test_dialogues": len(test),
    }
    return metrics, samples


def fit(cfg: DialogueConfig, ctx: StageContext, tok: TokenizerFiles,
        splits: dict[str, list[dict[str, Any]]], sources: dict[str, Retrieved], ids: Seq2SeqIds,
        intents: list[str]) -> tuple[DialogueModel, Any, dict[str, Encoded]]:  # fmt: skip
    """Trains one responder + intent head on the given sources: (model, TrainResult, splits)."""
    from lmforge.model.config import preset_config
    from lmforge.model.seq2seq import Seq2SeqLM
    from lmforge.train.distributed import unwrap
    from lmforge.train.loader import RowBatches
    from lmforge.train.loop import train

    enc = {s: Encoded(rows, sources[s].sources, tok, ids, cfg.train.seq_len, intents)
           for s, rows in splits.items()}  # fmt: skip
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
    loader = TrimmedBatches(RowBatches(enc["train"].rows, batch_size, seed=cfg.train.seed))
    result = train(
        model, make_loss(cfg.intent_weight), loader, cfg.train, ctx,
        eval_fn=eval_fn_for(enc["val"], cfg.train.micro_batch_size, cfg.intent_weight),
    )  # fmt: skip
    return unwrap(result.model).cpu().float(), result, enc


def score(model: DialogueModel, enc: dict[str, Encoded], splits: dict[str, list[dict[str, Any]]],
          found: list[list[str]], tok: TokenizerFiles, cfg: DialogueConfig, ids: Seq2SeqIds,
          intents: list[str], out: Path) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """(headline metrics, per-intent scores) on the test split; samples.jsonl into out."""
    metrics, samples = evaluate(model, enc["test"], splits["test"], found, tok, cfg, ids, intents)
    write_jsonl(out / "samples.jsonl", samples)
    per_intent = per_intent_scores(samples)
    metrics.update({f"test_rougeL_{k}": v["rougeL"] for k, v in per_intent.items()})
    return metrics, per_intent


def without_retrieval(cfg: DialogueConfig, ctx: StageContext, tok: TokenizerFiles,
                      splits: dict[str, list[dict[str, Any]]], ids: Seq2SeqIds,
                      intents: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The same training (steps, seed) on user turns alone, in no_retrieval/: its scores."""
    out = ctx.out / "no_retrieval"
    shutil.rmtree(out, ignore_errors=True)
    sub = StageContext(out=out, stage=f"{ctx.stage}/no_retrieval", log=ctx.log,
                       metrics=MetricsWriter(out / "metrics.jsonl"))  # fmt: skip
    plain = {s: Retrieved(rows, tok, None, None) for s, rows in splits.items()}
    once = cfg.model_copy(update={"train": cfg.train.model_copy(update={"ckpt_every": 0})})
    try:
        model, _, enc = fit(once, sub, tok, splits, plain, ids, intents)
    finally:
        sub.metrics.close()
    return score(model, enc, splits, plain["test"].found, tok, cfg, ids, intents, out)


def build(cfg: DialogueConfig, ctx: StageContext) -> dict[str, Any]:
    from lmforge.model.convert import save_pretrained

    tok = TokenizerFiles.load(cfg.tokenizer)
    splits = load_splits(cfg.data)
    intents = sorted({r["intent"] for rows in splits.values() for r in rows})
    ids = Seq2SeqIds.of({}, tok)  # from scratch: the tokenizer's eos, bos as decoder start
    spec, sources = retrieve(cfg, tok, splits)
    model, result, enc = fit(cfg, ctx, tok, splits, sources, ids, intents)
    metrics, per_intent = score(model, enc, splits, sources["test"].found, tok, cfg, ids, intents,
                                ctx.out)  # fmt: skip
    report: dict[str, Any] = {"intents": intents, **metrics, "per_intent": per_intent}
    if spec is not None:
        recall = recall_at_k(splits["test"], sources["test"].found)
        metrics.update(retrieval_passages=spec.passages, test_recall_at_k=recall.get("all"))
        report.update(retrieval={"passages": spec.passages, "min_score": spec.min_score,
                                 "recall_at_k": recall})  # fmt: skip
    special = ids.config(tok.bos_id)
    with ctx.atomic_path(ctx.out / "final") as tmp:
        save_pretrained(model.seq2seq, tmp, extra_config=special, generation_config=special)
        copy_tokenizer_files(cfg.tokenizer, tmp)
        save_intent_head(model, intents, tmp)
        if spec is not None:
            spec.save(tmp)
    if spec is not None and cfg.retrieval.compare:
        plain, plain_intents = without_retrieval(cfg, ctx, tok, splits, ids, intents)
        report["without_retrieval"] = {**plain, "per_intent": plain_intents}
        keep = ("test_rougeL", "test_bleu", "test_exact_match")
        metrics.update({f"norag_{k}": v for k, v in plain.items()
                        if k in keep or k.startswith("test_rougeL_")})  # fmt: skip
    ctx.atomic_write_json(ctx.out / "eval.json", report)
    return {"train_loss": round(float(result.train_loss), 4),
            "val_loss": round(float(result.val_loss), 4) if result.val_loss is not None else None,
            "steps": result.step, "truncated": enc["train"].truncated, **metrics}  # fmt: skip
