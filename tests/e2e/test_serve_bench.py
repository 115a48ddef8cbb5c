"""`lmforge serve bench --start-model` against the real server it starts: every request decodes
exactly max_tokens (ignore_eos honoured), timings are measured, and the bench's answers stay out
of the model's run directory."""

from __future__ import annotations

from pathlib import Path

from lmforge.serve.bench import bench_command


def test_start_model_runs_the_real_server(serve_model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)  # the server's default store dir when the model has no run dir
    run_dir = serve_model.parents[2]  # serve_model is runs/q/sft/final: the server names it "sft"
    before = sorted(run_dir.rglob("*"))
    result = bench_command(
        url=None, start_model=str(serve_model), model=None, concurrency="1,3", requests=3,
        max_tokens=8, ignore_eos=True, out=str(tmp_path / "bench.json"),
    )  # fmt: skip
    assert result["model"] == "sft"
    for level in result["levels"]:
        assert level["errors"] == 0, level["error_samples"]
        assert level["output_tokens"] == 3 * 8
        assert level["ttft_ms"]["p50"] > 0 and level["itl_ms"]["p50"] is not None
    assert (tmp_path / "bench.json").is_file()
    assert sorted(run_dir.rglob("*")) == before  # no feedback.db beside the model
    assert not list(tmp_path.rglob("*.db"))  # nor in the working directory
