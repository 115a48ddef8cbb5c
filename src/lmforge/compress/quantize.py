"""`compress quantize`: int8 / int4 weight-only checkpoints, and dynamic int8 for CPU inference.

The checkpoint's matrices are rounded with lmforge.model.quant (the QLoRA base's quantizer: int8
with one scale per output row, int4 with one scale per group of input columns, two codes a byte)
and written under their own names in model.safetensors, with config.json's quantization_config
saying how; load_pretrained keeps them quantized (eval, generate, serve: int8/int4 memory, torch's
int8 and int4 matmuls on CPU) and dequantizes them for training, so the directory needs nothing
but itself.
quantize.method picks the rounding: rtn (to nearest), or gptq / awq calibrated on windows of the
stage's tokens or data (compress.calibration, compress.gptq, compress.awq; compress.calibrated
runs them over the blocks and maps the result onto the same codes and scales), so the format
is the same whatever the method.
dynamic_int8() is torch.ao's dynamic quantization (int8 weights, activations quantized per
batch, fbgemm int8 matmuls) of every nn.Linear, applied in memory after loading, since its
packed weights have no safetensors form; the stage measures both.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.artifacts import StageContext
from lmforge.common.io import atomic_path, atomic_write_json
from lmforge.common.progress import progress
from lmforge.compress.files import copy_mean_head, copy_side_files
from lmforge.errors import ConfigError
from lmforge.evals.lm import EvalModel
from lmforge.model.convert import hf_config_to_model_config, read_config, read_tensors
from lmforge.model.hf_families import FAMILIES
from lmforge.model.quant_checkpoint import quantization_plan, quantize_tensors

# tensors -> (tensors with every matrix rounded to nearest, quantization_config)
Rounder = Callable[[dict[str, Tensor]], tuple[dict[str, Tensor], dict[str, Any]]]
# (src, config.json, its float tensors, the RTN rounder, the quantization_config it writes)
# -> what the rounder returns
Calibrate = Callable[[Path, dict[str, Any], dict[str, Tensor], Rounder, dict[str, Any]],
                     tuple[dict[str, Tensor], dict[str, Any]]]  # fmt: skip


def require_float_source(src: Path, hf: dict[str, Any]) -> None:
    """Refuse to quantize src (config.json `hf`) when it is quantized already: rounding codes
    again only loses quality."""
    if hf.get("quantization_config"):
        raise ConfigError(
            f"{src} is already quantized ({hf['quantization_config'].get('quant_method')}): "
            "method=quantize needs float weights; quantize the float checkpoint it was made from "
            "(the 'source' in the compression.json of the compress run that wrote it)"
        )


def quantize_dir(
    src: Path, dst: Path, scheme: str, group_size: int, calibrate: Calibrate | None = None
) -> dict[str, Any]:
    """Write src's checkpoint to dst with every matrix quantized; returns quantization_config.
    Rounded to nearest, or by `calibrate` (calibrated_rounding: GPTQ, AWQ)."""
    hf = read_config(src)
    require_float_source(src, hf)
    tensors = table_layout(hf, read_tensors(src))
    flip = stored_transposed(hf, tensors)
    options = dict(kind=scheme, group_size=group_size, stored_transposed=flip,
                   keep_float=router_tensors(hf, tensors))  # fmt: skip
    rtn = partial(quantize_tensors, **options)
    if calibrate is None:
        rounded, quant = rtn(tensors)
    else:
        rounded, quant = calibrate(src, hf, tensors, rtn, quantization_plan(tensors, **options))
    dst.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in rounded.items()}, tmp, metadata={"format": "pt"})
    copy_side_files(src, dst)
    copy_mean_head(src, dst)  # float, beside the quantized encoder; config.json names it
    atomic_write_json(dst / "config.json", {**hf, "quantization_config": quant})
    return quant


def table_layout(hf: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """tensors under the names their family's table uses (model.hf_families' renames: experts
    stored fused, (experts, rows, cols), split into per-expert matrices), so every matrix is
    2-D: a fused expert tensor would stay float under RTN and have no grid under GPTQ/AWQ."""
    family = FAMILIES.get(hf.get("model_type", ""))
    return family.renames(tensors) if family is not None and family.renames else tensors


def stored_transposed(hf: dict[str, Any], names: Iterable[str]) -> set[str]:
    """The checkpoint's weights stored (in, out), its family's transposed rules (GPT-2's
    Conv1D): int4 groups them along their input too, as torch's int4 kernel needs."""
    family = FAMILIES.get(hf.get("model_type", ""))
    if family is None:
        return set()
    rules = family.rules(hf_config_to_model_config(hf))
    conv1d = {n for rule in rules if rule.transpose for n in rule.hf_names}
    return {n for n in names if n in conv1d or family.prefix + n in conv1d}


def router_tensors(hf: dict[str, Any], names: Iterable[str]) -> set[str]:
    """The checkpoint's MoE router weights (ours: blocks.N.mlp.router, model.moe), which stay
    float: rounding a router can switch a token's expert, a jump no tolerance bounds."""
    from lmforge.compress.calibrated import checkpoint_rules
    from lmforge.model.convert.hf_import import NATIVE

    names = set(names)
    if hf.get("model_type") != NATIVE and hf.get("model_type") not in FAMILIES:
        return set()
    rules = checkpoint_rules(hf, names).values()
    return {n for r in rules if r.ours.endswith(".mlp.router.weight") for n in r.hf_names} & names


def dynamic_int8(model: nn.Module) -> nn.Module:
    """model with every nn.Linear replaced by torch.ao's dynamically quantized int8 Linear (CPU)."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def calibrated_rounding(ids: Tensor, settings: Any, log: logging.Logger) -> Calibrate:
    """quantize_dir's `calibrate` for settings.method (gptq | awq) on calibration windows ids
    (n, T): the blocks of the float model calibrated in order (compress.calibrated), on the
    grids RTN chose for their checkpoint tensors."""
    from lmforge.compress import calibrated
    from lmforge.model.convert import load_pretrained

    def calibrate(
        src: Path,
        hf: dict[str, Any],
        tensors: dict[str, Tensor],
        rtn: Rounder,
        quant: dict[str, Any],
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        model = load_pretrained(src)
        links = calibrated.checkpoint_rules(hf, set(tensors))
        grid = lambda name: calibrated.grid_for(name, links[name], quant)  # noqa: E731
        method = settings.method.upper()
        with progress(method, total=len(model.blocks), unit="block") as bar:
            if settings.method == "awq":
                alphas = calibrated.awq_blocks(model, ids, grid, settings.awq_grid, bar.advance)
                log.info("AWQ alphas per group: %s", alphas)
                return rtn(calibrated.scaled_tensors(model, tensors, links))
            weights = calibrated.gptq_blocks(
                model, ids, grid, settings.damp_percent, settings.desc_act, bar.advance
            )
        log.info("GPTQ rounded %d matrices on %d x %d tokens", len(weights), *ids.shape)
        rounded, _ = rtn(tensors)  # the matrices outside the blocks keep RTN
        return calibrated.write_rounded(rounded, quant, weights, links), quant

    return calibrate


def quantize_method(
    cfg: Any, ctx: StageContext, src: Path, original: EvalModel, texts: list[str] | None
) -> dict[str, Any]:
    """final/ (the quantized directory, reloaded and measured) and the dynamic int8 numbers."""
    from lmforge.compress.measure import model_report

    settings = cfg.quantize
    start = time.perf_counter()
    ids, source = calibration_windows(cfg, src, original)
    calibrate = None if ids is None else calibrated_rounding(ids, settings, ctx.log)
    with ctx.atomic_path(ctx.out / "final") as tmp:
        quant = quantize_dir(src, tmp, settings.scheme, settings.group_size, calibrate)
    seconds = time.perf_counter() - start
    final = ctx.out / "final"
    after = model_report(EvalModel.load(final), final, texts, cfg.speed)
    dyn = EvalModel("dynamic-int8", src, dynamic_int8(original.model), original.files)
    dynamic = model_report(dyn, src, texts, cfg.speed)
    dynamic.pop("weights_bytes")  # in memory only: nothing on disk to measure
    bits = list(quant["bits"].values())
    quantization = {
        "scheme": settings.scheme,
        "group_size": settings.group_size,
        "method": settings.method,
        "int8_tensors": bits.count(8),
        "int4_tensors": bits.count(4),
        "seconds": round(seconds, 2),
    }
    if ids is not None:
        quantization["calibration"] = {
            "source": source,
            "samples": ids.shape[0],
            "seq_len": ids.shape[1],
            "seed": settings.calibration_seed,
            **({"awq_grid": settings.awq_grid} if settings.method == "awq" else
               {"damp_percent": settings.damp_percent, "desc_act": settings.desc_act}),
        }  # fmt: skip
    return {"after": after, "quantization": quantization, "dynamic_int8": dynamic}


def require_calibration(cfg: Any) -> None:
    """ConfigError when a calibrated method has nothing to calibrate on (before any work)."""
    if cfg.quantize.method != "rtn" and cfg.tokens is None and cfg.data is None:
        raise ConfigError(
            f"quantize.method={cfg.quantize.method} calibrates on text: pass token shards made "
            "with the model's tokenizer (--tokens DIR, config key tokens: their train.bin) or "
            f"--data DIR (its '{cfg.quantize.calibration_split}' split, "
            "quantize.calibration_split), or use --method rtn"
        )


def calibration_windows(cfg: Any, src: Path, model: EvalModel) -> tuple[Tensor | None, str]:
    """The calibration windows (n, T) of a calibrated method and where they came from; (None,
    "") for rtn."""
    from lmforge.compress import calibration
    from lmforge.evals.perplexity import iter_texts

    s = cfg.quantize
    if s.method == "rtn":
        return None, ""
    require_calibration(cfg)
    seq_len = min(s.calibration_seq_len, model.block_size)
    n, seed = s.calibration_samples, s.calibration_seed
    if cfg.tokens is not None:
        where = f"{cfg.tokens}/train.bin"
        return calibration.shard_calibration(Path(cfg.tokens), src, n, seq_len, seed), where
    texts = iter_texts(cfg.data, s.calibration_split)  # streamed: calibration reads a few
    where = f"{cfg.data} split {s.calibration_split}"
    ids = calibration.text_calibration(
        texts, model.encode, model.prefix_id, n, seq_len, seed, where
    )
    return ids, where
