"""k-fold training for the finetune stage: one model per held-out fold in folds/<name>/, and
with augment.compare the same folds trained without augmentation (folds/augment_compare.json)."""

from __future__ import annotations

import shutil
from typing import Any

from lmforge.artifacts import StageContext
from lmforge.common.logging import MetricsWriter
from lmforge.data.augment import Augmenter, attach_augmented, separate_augmented
from lmforge.finetune import heads
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.fit import fit
from lmforge.finetune.kfold import assign_folds, summarize
from lmforge.finetune.prepare import prepare
from lmforge.tokenizer.files import TokenizerFiles


def _fit_fold(
    cfg: FinetuneConfig, ctx: StageContext, tok: TokenizerFiles, name: str,
    train_ex: list, held: list, labels: list[str],
) -> dict[str, Any]:  # fmt: skip
    """Trains on train_ex in folds/<name>/ and returns the held-out metrics."""
    fold_dir = ctx.out / "folds" / name
    shutil.rmtree(fold_dir, ignore_errors=True)
    fold_ctx = StageContext(
        out=fold_dir, stage=f"{ctx.stage}/{name}", log=ctx.log,
        metrics=MetricsWriter(fold_dir / "metrics.jsonl"),
    )  # fmt: skip
    data = prepare(cfg, tok, train_ex, held, labels)
    fold_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"ckpt_every": 0})})
    model, _, result = fit(fold_cfg, fold_ctx, data)
    fold_ctx.metrics.close()
    preds = heads.predict(model, data.val_rows)
    metrics = heads.classification_metrics(data.val_rows["class_labels"], preds, len(labels))
    return {"val_loss": result.val_loss, "train_examples": len(train_ex), **metrics}


def cross_validate(
    cfg: FinetuneConfig, ctx: StageContext, tok: TokenizerFiles, examples: list,
    labels: list[str], augmenter: Augmenter | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Trains one model per held-out fold (in folds/fold_i/); mean and std of val metrics.

    Only original rows are folded; already-augmented rows follow their source into training.
    With an augmenter each fold augments its own training part (never the held-out fold), and
    with augment.compare the same fold is also trained without augmentation (folds/fold_i_noaug/)
    so folds/augment_compare.json holds both, mean and std over the same folds.
    """
    originals, augmented = separate_augmented(examples)
    folds = assign_folds(originals, cfg.kfold.k, cfg.kfold.seed)
    per_fold, plain = [], []
    for f in range(cfg.kfold.k):
        held = [e for e, g in zip(originals, folds, strict=True) if g == f]
        rest = attach_augmented(
            [e for e, g in zip(originals, folds, strict=True) if g != f], augmented
        )
        train_ex = rest + augmenter.augment(rest, "train") if augmenter else rest
        per_fold.append(_fit_fold(cfg, ctx, tok, f"fold_{f}", train_ex, held, labels))
        ctx.metrics.log(fold=f, **per_fold[-1])
        if augmenter is not None and cfg.augment.compare:
            plain.append(_fit_fold(cfg, ctx, tok, f"fold_{f}_noaug", rest, held, labels))
    ctx.atomic_write_json(ctx.out / "folds" / "folds.json", per_fold)
    out: dict[str, Any] = summarize(per_fold)
    if plain:
        without = summarize(plain)
        compare = {
            "k": cfg.kfold.k, "methods": cfg.augment.methods, "alpha": cfg.augment.alpha,
            "copies": cfg.augment.copies, "synonyms": augmenter.synonym_source,  # type: ignore[union-attr]
            "with": out, "without": without, "per_fold": {"with": per_fold, "without": plain},
        }  # fmt: skip
        ctx.atomic_write_json(ctx.out / "folds" / "augment_compare.json", compare)
        out = {**out, **{f"noaug_{k}": v for k, v in without.items() if k != "cv_folds"}}
    return out
