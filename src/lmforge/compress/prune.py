"""`compress prune`: magnitude (unstructured) or structured pruning, then optional recovery.

- magnitude: zero the smallest |w| of the blocks' matrices (q/k/v, attention output, MLP) to a
  target sparsity, ranked over all of them (scope=global) or within each matrix (scope=layer).
  The tensors keep their shape, so the file does not shrink; sparsity is what a sparse kernel or
  a compressor would exploit.
- neurons: drop the least important MLP hidden units of every layer; importance of unit j =
  ||rows of fc for j (gate and up)|| x ||column j of mlp.proj||. intermediate_size shrinks.
- heads: drop the least important key/value groups of every layer (a kv head with the query
  heads that share it, so grouped-query attention keeps its ratio); importance = ||q rows|| x
  ||attention-output columns|| of the group's heads. n_head and n_kv_head shrink, head_dim stays.

Recovery (with `tokens`): a short fine-tune through the one training loop on the token shards,
next-token loss; magnitude pruning keeps its zeros by masking the gradients of pruned weights. A
sequence classifier recovers on labelled `examples` instead, its classification loss
(compress.prune_classifier), with its accuracy before and after pruning and after recovery.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.transformer import Transformer


def block_matrices(model: Transformer) -> dict[str, nn.Parameter]:
    """The blocks' weight matrices (what magnitude pruning ranks), by parameter name."""
    return {
        name: p
        for name, p in model.named_parameters()
        if name.startswith("blocks.") and p.dim() == 2
    }


@torch.no_grad()
def magnitude_prune(model: Transformer, sparsity: float, scope: str) -> dict[str, Tensor]:
    """Zero the smallest weights in place; returns each pruned matrix's keep-mask."""
    mats = block_matrices(model)
    if scope == "global":
        scores = torch.cat([p.abs().flatten() for p in mats.values()])
        k = int(sparsity * scores.numel())
        cut = scores.kthvalue(k).values if k > 0 else scores.new_tensor(-1.0)
        masks = {n: p.abs() > cut for n, p in mats.items()}
    else:
        masks = {}
        for n, p in mats.items():
            k = int(sparsity * p.numel())
            cut = p.abs().flatten().kthvalue(k).values if k > 0 else p.new_tensor(-1.0)
            masks[n] = p.abs() > cut
    for n, p in mats.items():
        p.mul_(masks[n])
    return masks


def keep_top(scores: Tensor, n_keep: int) -> Tensor:
    """Indices of the n_keep highest scores, in their original order."""
    return scores.topk(n_keep).indices.sort().values


@torch.no_grad()
def prune_neurons(model: Transformer, fraction: float) -> Transformer:
    """A smaller model without the least important MLP hidden units of each layer."""
    cfg = model.config
    if cfg.num_experts:
        raise ConfigError(
            f"prune.kind=neurons scores dense MLP units; this model routes to {cfg.num_experts} "
            "experts (model.num_experts); use prune.kind=magnitude or heads"
        )
    hidden = cfg.intermediate_size
    n_keep = max(1, round(hidden * (1 - fraction)))
    new = _empty_like(model, replace(cfg, intermediate_size=n_keep))
    for old_b, new_b in zip(model.blocks, new.blocks, strict=True):
        fc, proj = old_b.mlp.fc, old_b.mlp.proj
        rows = fc.weight.view(-1, hidden, cfg.n_embd)  # (2 or 1, hidden, C): [gate; up] or fc
        score = rows.norm(dim=(0, 2)) * proj.weight.norm(dim=0)  # (hidden,)
        keep = keep_top(score, n_keep)
        fc_rows = torch.cat([keep + i * hidden for i in range(rows.size(0))])
        new_b.mlp.fc.weight.copy_(fc.weight[fc_rows])
        new_b.mlp.proj.weight.copy_(proj.weight[:, keep])
        if fc.bias is not None:
            new_b.mlp.fc.bias.copy_(fc.bias[fc_rows])
            new_b.mlp.proj.bias.copy_(proj.bias)
        _copy_rest(old_b, new_b, skip=("mlp.fc", "mlp.proj"))
    return new


@torch.no_grad()
def prune_heads(model: Transformer, fraction: float) -> Transformer:
    """A smaller model without the least important key/value groups of each layer."""
    cfg = model.config
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.hd
    group = nh // nkv
    kv_keep = max(1, round(nkv * (1 - fraction)))
    if kv_keep == nkv:
        raise ConfigError(
            f"prune.sparsity={fraction} removes no key/value group of {nkv}; raise it to at "
            f"least {1 / nkv:.3g} (heads are pruned a kv group = {group} query heads at a time)"
        )
    new = _empty_like(model, replace(cfg, n_head=kv_keep * group, n_kv_head=kv_keep, head_dim=hd))
    for old_b, new_b in zip(model.blocks, new.blocks, strict=True):
        qkv, proj = old_b.attn.qkv, old_b.attn.proj
        q = qkv.weight[: nh * hd].view(nkv, group * hd, -1)  # (nkv, group*hd, C)
        out_cols = proj.weight.view(-1, nkv, group * hd)  # (C, nkv, group*hd)
        score = q.norm(dim=(1, 2)) * out_cols.norm(dim=(0, 2))  # (nkv,)
        keep = keep_top(score, kv_keep)
        q_rows = _rows(keep, group * hd)
        kv_rows = _rows(keep, hd)
        rows = torch.cat([q_rows, nh * hd + kv_rows, (nh + nkv) * hd + kv_rows])
        new_b.attn.qkv.weight.copy_(qkv.weight[rows])
        if qkv.bias is not None:
            new_b.attn.qkv.bias.copy_(qkv.bias[rows])
        new_b.attn.proj.weight.copy_(proj.weight[:, q_rows])
        if proj.bias is not None:
            new_b.attn.proj.bias.copy_(proj.bias)
        _copy_rest(old_b, new_b, skip=("attn.qkv", "attn.proj"))
    return new


def _rows(groups: Tensor, width: int) -> Tensor:
    """Row indices of whole groups of `width` rows."""
    return (groups[:, None] * width + torch.arange(width)).flatten()


def _empty_like(model: Transformer, cfg: Any) -> Transformer:
    """A model of config cfg with model's embeddings, final norm and head copied."""
    new = Transformer(cfg).eval()
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    new.load_state_dict(own, strict=False)
    new.tie_weights()
    return new


def _copy_rest(old: nn.Module, new: nn.Module, skip: tuple[str, ...]) -> None:
    """Copy every parameter of a block that pruning did not change (norms, the other half)."""
    state = {k: v for k, v in old.state_dict().items() if not k.startswith(skip)}
    new.load_state_dict(state, strict=False)


def sparsity_of(model: Transformer) -> float:
    """Fraction of exact zeros among the blocks' matrices."""
    mats = list(block_matrices(model).values())
    return sum(int((p == 0).sum()) for p in mats) / max(sum(p.numel() for p in mats), 1)


def prune_model(model: Transformer, settings: Any) -> tuple[Transformer, dict[str, Tensor]]:
    """(pruned model, keep-masks of magnitude pruning, else empty)."""
    if settings.kind == "magnitude":
        return model, magnitude_prune(model, settings.sparsity, settings.scope)
    if settings.kind == "neurons":
        return prune_neurons(model, settings.sparsity), {}
    return prune_heads(model, settings.sparsity), {}


def shard_loaders(tokens: Path, model_dir: Path, tc: Any, loss_fn: Any) -> tuple[Any, Any]:
    """(train loader, eval_fn) over token shards made with model_dir's tokenizer."""
    from lmforge.train.loader import TokenWindows, open_tokens
    from lmforge.train.pretrain import read_token_meta

    meta = read_token_meta(tokens, model_dir)
    loader = TokenWindows(open_tokens(tokens / "train.bin", meta["dtype"]), tc.seq_len,
                          tc.micro_batch_size, seed=tc.seed)  # fmt: skip
    val = TokenWindows(open_tokens(tokens / "val.bin", meta["dtype"]), tc.seq_len,
                       tc.micro_batch_size, shuffle=False)  # fmt: skip

    def evaluate(m: nn.Module) -> dict[str, float]:
        device = next(m.parameters()).device
        losses = [loss_fn(m, {k: v.to(device) for k, v in val.batch(i).items()})[0]
                  for i in range(tc.eval_steps)]  # fmt: skip
        return {"val_loss": torch.stack(losses).float().mean().item()}

    return loader, evaluate


def keep_zeros(model: Transformer, masks: dict[str, Tensor]) -> None:
    """Hooks that zero the gradients of magnitude-pruned weights, so training keeps them zero."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].register_hook(lambda g, m=mask: g * m.to(g.dtype))


def recover(
    model: Transformer, masks: dict[str, Tensor], tokens: Path, model_dir: Path, cfg: Any, ctx: Any
) -> dict[str, float]:
    """Short fine-tune on token shards through the one loop; pruned weights stay zero."""
    from lmforge.train.loop import train
    from lmforge.train.pretrain import lm_loss

    loader, evaluate = shard_loaders(tokens, model_dir, cfg.train, lm_loss)
    keep_zeros(model, masks)
    result = train(model.train(), lm_loss, loader, cfg.train, ctx, eval_fn=evaluate, resume=False)
    model.eval()
    return {"steps": result.step, "train_loss": result.train_loss, "val_loss": result.val_loss}


def prune_method(
    cfg: Any, ctx: Any, src: Path, original: Any, texts: list[str] | None
) -> dict[str, Any]:
    """final/ (the pruned, optionally recovered model) measured, with what was pruned."""
    from lmforge.compress.files import write_final
    from lmforge.compress.measure import model_report, quality
    from lmforge.evals.lm import EvalModel
    from lmforge.model.convert import load_pretrained

    settings = cfg.prune
    model = load_pretrained(src, quantized="dequantize")
    n_before = model.num_params()
    pruned, masks = prune_model(model, settings)
    report: dict[str, Any] = {"pruning": {
        "kind": settings.kind, "target": settings.sparsity, "scope": settings.scope,
        "params_before": n_before, "params_after": pruned.num_params(),
    }}  # fmt: skip
    head, extra = None, {}  # a classifier's recovery trains its head: final/ holds that one
    if (cfg.tokens is not None or cfg.examples is not None) and texts:
        unrecovered = EvalModel("pruned", src, pruned, original.files)
        report["before_recovery"] = quality(unrecovered, texts)
    if cfg.tokens is not None:
        report["recovery"] = recover(pruned, masks, Path(cfg.tokens), src, cfg, ctx)
    elif cfg.examples is not None:
        from lmforge.compress.prune_classifier import recover_classifier

        head, recovered, extra = recover_classifier(pruned, masks, src, original, cfg, ctx)
        report.update(recovered)
    report["pruning"]["block_sparsity"] = sparsity_of(pruned)
    final = write_final(pruned, src, ctx, head=head, extra=extra)
    report["after"] = model_report(EvalModel.load(final), final, texts, cfg.speed)
    return report
