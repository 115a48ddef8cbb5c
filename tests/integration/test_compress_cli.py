"""`lmforge compress`: the CLI runs a method end to end, and bad input is one line (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from unit.evals.helpers import CORPUS, trained_model_dir, write_split


def lmforge(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_quantize_int4_then_the_result_generates(tmp_path: Path) -> None:
    model = trained_model_dir(tmp_path / "model")
    write_split(tmp_path / "data", "val", CORPUS)
    out = tmp_path / "int4"
    proc = lmforge("compress", "quantize", "--model", str(model), "--data", str(tmp_path / "data"),
                   "--out", str(out), "--scheme", "int4", "--set", "speed.new_tokens=4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "compression.json").read_text())
    assert report["quantization"]["scheme"] == "int4" and report["size_ratio"] < 0.5
    gen = lmforge("generate", "--model", str(out), "-p", "def", "--max-new-tokens", "4")
    assert gen.returncode == 0, gen.stderr


def test_cli_missing_model_and_unknown_format_are_one_line(tmp_path: Path) -> None:
    proc = lmforge("compress", "quantize", "--model", str(tmp_path / "nope"), "--out",
                   str(tmp_path / "q"))  # fmt: skip
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "lmforge pretrain" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = lmforge("compress", "export", "--model", str(tmp_path), "--out", str(tmp_path / "x"),
                   "--formats", "tflite")  # fmt: skip
    assert proc.returncode == 2 and "tflite" in proc.stderr and "Traceback" not in proc.stderr
    proc = lmforge("compress", "export", "--model", str(tmp_path), "--out", str(tmp_path / "x"),
                   "--set", "export.gguf_type=q4_k")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "export.gguf_type" in proc.stderr and "'q4_k'" in proc.stderr


def test_recipe_chains_quantize_into_export_and_caches(tmp_path: Path) -> None:
    from lmforge.runner import run_recipe

    model = trained_model_dir(tmp_path / "model")
    recipe = tmp_path / "compress.yaml"
    recipe.write_text(
        "name: compress\n"
        "stages:\n"
        f"  int8: {{stage: compress, method: quantize, model: {model}}}\n"
        "  export: {stage: compress, method: export, model: '@int8', export: {formats: [onnx]}}\n"
    )
    results = dict(run_recipe(recipe, out=tmp_path / "run"))
    report = json.loads((results["export"].out / "compression.json").read_text())
    assert report["source"].endswith("int8/final")  # the quantized model, dequantized on load
    assert report["onnx"]["decode_max_abs_diff"] < 1e-3
    again = dict(run_recipe(recipe, out=tmp_path / "run"))
    assert all(r.cached for r in again.values())


def test_each_method_puts_only_the_flags_given_into_its_section(monkeypatch) -> None:
    """Flags left out stay out (the config's defaults apply); --tokens goes to the stage."""
    from typer.testing import CliRunner

    from lmforge.cli import app

    seen = []
    monkeypatch.setattr("lmforge.cli.compress.run_stage_command",
                        lambda kind, values, *rest: seen.append((kind, values)))  # fmt: skip
    base = {"model": Path("m"), "out": Path("o"), "data": None}
    calls = [
        (["prune", "--kind", "neurons", "--tokens", "t"],
         {"method": "prune", **base, "prune": {"kind": "neurons"}, "tokens": Path("t")}),
        (["prune", "--sparsity", "0.25"], {"method": "prune", **base, "prune": {"sparsity": 0.25}}),
        (["distill", "--student", "micro", "--tokens", "t"],
         {"method": "distill", **base, "distill": {"student": "micro"}, "tokens": Path("t")}),
        (["distill"], {"method": "distill", **base}),
        (["quantize", "--scheme", "int4"], {"method": "quantize", **base, "quantize": {"scheme": "int4"}}),
        (["quantize", "--method", "gptq", "--tokens", "t"],
         {"method": "quantize", **base, "quantize": {"method": "gptq"}, "tokens": Path("t")}),
        (["export", "--formats", "onnx, gguf"],
         {"method": "export", **base, "export": {"formats": ["onnx", "gguf"]}}),
    ]  # fmt: skip
    for args, expected in calls:
        result = CliRunner().invoke(app, ["compress", *args, "--model", "m", "--out", "o"])
        assert result.exit_code == 0, result.output
        assert seen.pop() == ("compress", expected), args
