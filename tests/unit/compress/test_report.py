"""The run report's compress section: the trade-off sentence, table and plot."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.compress.stage import CompressConfig, compress
from lmforge.evals.report import write_report
from lmforge.evals.report_sections.common import fmt_num


def test_report_shows_the_tradeoff_of_a_quantize_stage(
    trained_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    cfg = CompressConfig(method="quantize", model=trained_dir, data=data_dir, out=tmp_path / "q8")
    out = compress(cfg)
    report = json.loads((out / "compression.json").read_text())
    page = write_report(tmp_path).read_text()
    ratio = report["after"]["weights_bytes"] / report["before"]["weights_bytes"]
    assert f"int8 weight-only {ratio:.2f}x the size" in page
    assert f"perplexity {report['perplexity_delta_pct']:+.2f}%" in page
    assert "<td>dynamic int8 (in memory)</td>" in page and "<td>original (fp32)</td>" in page
    assert (tmp_path / "report_files" / "q8_tradeoff.png").stat().st_size > 5000


def test_report_shows_an_encoders_pseudo_perplexity(data_dir: Path, tmp_path: Path) -> None:
    from unit.finetune.encoder_tokenizers import bert_tokenizer_dir
    from unit.finetune.helpers import make_model_dir

    model = make_model_dir(tmp_path / "bert", bert_tokenizer_dir(tmp_path / "tok"), "bert-micro")
    out = compress(
        CompressConfig(method="quantize", model=model, data=data_dir, out=tmp_path / "q")
    )
    report = json.loads((out / "compression.json").read_text())
    before, after = report["before"]["pseudo_perplexity"], report["after"]["pseudo_perplexity"]
    assert "perplexity" not in report["before"]  # an encoder has no next-token perplexity
    page = write_report(tmp_path).read_text()
    assert f"pseudo-perplexity {100 * (after / before - 1):+.2f}%" in page
    assert "<th>pseudo-perplexity</th>" in page
    assert f"<td>{fmt_num(before)}</td>" in page and f"<td>{fmt_num(after)}</td>" in page
