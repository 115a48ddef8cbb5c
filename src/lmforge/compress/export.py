"""`compress export`: onnx/ (model.onnx + tokenizer files) and model.gguf, each checked.

ONNX is compared with PyTorch's logits under onnxruntime (a left-padded prefill and one cached
decode step) and timed at greedy decoding; GGUF is read back with gguf's reader. A check that
fails is a StageError, and the stage then leaves no manifest.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from lmforge.artifacts import StageContext
from lmforge.compress.files import copy_side_files, special_ids
from lmforge.compress.gguf_export import check_gguf, export_gguf
from lmforge.compress.measure import weights_bytes
from lmforge.compress.onnx_export import (
    check_onnx,
    export_onnx,
    ort_decode_tokens_per_s,
    ort_session,
)
from lmforge.errors import ConfigError
from lmforge.evals.lm import EvalModel

EXTRAS = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "gguf": ("gguf",)}


def require_extra(fmt: str) -> None:
    """ConfigError naming the extra to install when a format's packages are missing."""
    missing = [m for m in EXTRAS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"export to {fmt} needs {', '.join(missing)}: pip install 'lmforge[{fmt}]'"
        )


def export_method(cfg: Any, ctx: StageContext, src: Path, original: EvalModel) -> dict[str, Any]:
    """Writes the requested formats; returns their checks and sizes ("after" is the ONNX model
    when exported, else the GGUF file)."""
    settings, model = cfg.export, original.model
    for fmt in settings.formats:
        require_extra(fmt)
    result: dict[str, Any] = {}
    if "onnx" in settings.formats:
        with ctx.atomic_path(ctx.out / "onnx") as tmp:
            tmp.mkdir(parents=True)
            export_onnx(model, tmp / "model.onnx", settings.opset)
            session = ort_session(tmp / "model.onnx")
            checks = check_onnx(model, session, settings.atol)
            copy_side_files(src, tmp)
            shutil.copy2(src / "config.json", tmp / "config.json")
        speed = cfg.speed
        tps = ort_decode_tokens_per_s(
            session, model, speed.prompt_tokens, speed.new_tokens, speed.repeats
        )
        result["onnx"] = {
            "weights_bytes": weights_bytes(ctx.out / "onnx" / "model.onnx"),
            "tokens_per_s": tps,
            **checks,
        }
    if "gguf" in settings.formats:
        special = special_ids(src)
        with ctx.atomic_path(ctx.out / "model.gguf") as tmp:
            export_gguf(model, src, tmp, special)
            checks = check_gguf(tmp, model, src, special)
        result["gguf"] = {"weights_bytes": weights_bytes(ctx.out / "model.gguf"), **checks}
    first = result.get("onnx") or result["gguf"]
    result["after"] = {k: first[k] for k in ("weights_bytes", "tokens_per_s") if k in first}
    return result
