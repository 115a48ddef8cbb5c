"""`compress distill`: train a smaller student (any preset) from a teacher model.

The loss is Hinton et al.'s: alpha x T^2 x KL(teacher || student) on logits softened by
temperature T, plus (1 - alpha) x cross-entropy on the next tokens. The student trains through
the one training loop on token shards made with the teacher's tokenizer (the student takes the
teacher's vocabulary and block size); the teacher runs frozen, without gradients, beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.transformer import next_token_loss


def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, soft KL term, hard CE term) for logits (B, T, V) and labels (B, T), in fp32."""
    t = temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, 1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, 1)
    soft = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * t * t
    hard = next_token_loss(student_logits, labels)
    return alpha * soft + (1 - alpha) * hard, soft, hard


def make_loss_fn(teacher: nn.Module, temperature: float, alpha: float) -> Any:
    """The loop's loss_fn(student, batch): the teacher's logits come without gradients."""
    teacher.eval().requires_grad_(False)

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids = batch["input_ids"]
        with torch.no_grad():
            teacher_logits = teacher.to(ids.device)(ids)
        loss, soft, hard = distill_loss(model(ids), teacher_logits, batch["labels"],
                                        temperature, alpha)  # fmt: skip
        return loss, {"kl": soft.detach(), "ce": hard.detach()}

    return loss_fn


def distill_method(
    cfg: Any, ctx: Any, src: Path, original: Any, texts: list[str] | None
) -> dict[str, Any]:
    """final/ (the trained student) measured against the teacher."""
    from lmforge.compress.files import write_final
    from lmforge.compress.measure import model_report
    from lmforge.compress.prune import shard_loaders
    from lmforge.errors import ConfigError
    from lmforge.evals.lm import EvalModel
    from lmforge.model.config import preset_config
    from lmforge.model.transformer import Transformer
    from lmforge.train.loop import train
    from lmforge.train.pretrain import lm_loss

    if cfg.tokens is None:
        raise ConfigError("compress distill needs tokens: token shards made with the teacher's "
                          "tokenizer (lmforge tokenizer encode --tokenizer MODEL ...)")  # fmt: skip
    settings, teacher = cfg.distill, original.model
    torch.manual_seed(cfg.train.seed)
    student = Transformer(preset_config(settings.student, vocab_size=teacher.config.vocab_size,
                                        block_size=teacher.config.block_size))  # fmt: skip
    loader, evaluate = shard_loaders(Path(cfg.tokens), src, cfg.train, lm_loss)
    result = train(student, make_loss_fn(teacher, settings.temperature, settings.alpha), loader,
                   cfg.train, ctx, eval_fn=evaluate, resume=False)  # fmt: skip
    student.eval()
    final = write_final(student, src, ctx)
    return {
        "after": model_report(EvalModel.load(final), final, texts, cfg.speed),
        "distillation": {
            "student": settings.student, "temperature": settings.temperature,
            "alpha": settings.alpha, "steps": result.step, "val_loss": result.val_loss,
            "teacher_params": teacher.num_params(), "student_params": student.num_params(),
        },
    }  # fmt: skip
