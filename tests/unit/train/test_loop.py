"""The one training loop: learning, accumulation, NaN handling, eval, early stop, resume."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import StageError
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loader import TokenWindows
from lmforge.train.loop import train
from lmforge.train.pace import projected_left_s

from .helpers import KilledAt, TinyLM, bigram_tokens, lm_loss, make_ctx

TOKENS = bigram_tokens()


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=30, lr=3e-2, micro_batch_size=8, seq_len=16, warmup_steps=3, eval_every=10,
                eval_steps=2, ckpt_every=0, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _eval_fn(cfg):
    val = TokenWindows(TOKENS[-4000:], cfg.seq_len, cfg.micro_batch_size, shuffle=False)

    def evaluate(model):
        losses = [lm_loss(model, val.batch(i))[0].item() for i in range(cfg.eval_steps)]
        return {"val_loss": sum(losses) / len(losses)}

    return evaluate


def _run(tmp_path, cfg, model=None, loss_fn=lm_loss, wrap=lambda loader: loader, **kw):
    torch.manual_seed(cfg.seed)
    model = model or TinyLM()
    loader = wrap(TokenWindows(TOKENS[:-4000], cfg.seq_len, cfg.micro_batch_size, seed=cfg.seed))
    ctx = make_ctx(tmp_path)
    try:
        result = train(model, loss_fn, loader, cfg, ctx, eval_fn=_eval_fn(cfg), **kw)
    finally:
        ctx.metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def test_loss_falls_and_metrics_are_logged(tmp_path):
    result, rows = _run(tmp_path, _cfg())
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert {"step", "loss", "lr", "tokens_seen", "tokens_per_s", "grad_norm"} <= set(train_rows[0])
    assert train_rows[-1]["tokens_seen"] == 30 * 8 * 16 == result.tokens_seen
    assert [r["step"] for r in val_rows] == [10, 20, 30]
    assert val_rows[-1]["val_ppl"] == pytest.approx(2.718281828 ** val_rows[-1]["val_loss"])
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert result.val_loss == val_rows[-1]["val_loss"] < val_rows[0]["val_loss"]
    assert train_rows[1]["lr"] == pytest.approx(3e-2 * 2 / 3)  # warmup


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    # one batch of 8 rows vs the same rows as two accumulated micro-batches of 4
    torch.manual_seed(0)
    model_a, model_b = TinyLM(), TinyLM()
    model_b.load_state_dict(model_a.state_dict())
    before = model_a.blocks[0][0].weight.detach().clone()
    batch = TokenWindows(TOKENS, 16, 8, seed=0).batch(0)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    cfg1 = _cfg(max_steps=1, micro_batch_size=8, warmup_steps=0, eval_every=0)
    cfg2 = _cfg(max_steps=1, micro_batch_size=4, grad_accum_steps=2, warmup_steps=0, eval_every=0)
    train(model_a, lm_loss, iter([batch]), cfg1, make_ctx(tmp_path / "b"))
    train(model_b, lm_loss, iter(halves), cfg2, make_ctx(tmp_path / "c"))
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(model_a.blocks[0][0].weight, before, atol=1e-4)  # it did train


def test_tokens_per_step_sets_accumulation():
    cfg = _cfg(micro_batch_size=4, seq_len=16, tokens_per_step=200)
    assert cfg.accum_steps(world_size=1) == 4  # ceil(200 / 64)
    assert cfg.accum_steps(world_size=2) == 2


def test_nan_loss_is_skipped_and_counted(tmp_path):
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        loss, m = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] in (3, 4) else loss), m

    model = TinyLM()
    result, _ = _run(tmp_path, _cfg(max_steps=8, max_bad_steps=3), model=model, loss_fn=flaky)
    assert result.skipped_steps == 2 and result.step == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_losses_in_a_row_abort_with_a_clear_message(tmp_path):
    def broken(model, batch):
        loss, m = lm_loss(model, batch)
        return loss * float("inf"), m

    with pytest.raises(StageError, match=r"NaN/inf for 3 steps in a row.*train.lr"):
        _run(tmp_path, _cfg(max_steps=10, max_bad_steps=3), loss_fn=broken)


def test_early_stopping_when_val_stops_improving(tmp_path):
    # lr 0 after warmup 0: the model never changes, so val never improves after the first eval
    cfg = _cfg(max_steps=50, eval_every=5, early_stop_patience=2, schedule="constant", warmup_steps=0,
               lr=1e-12)  # fmt: skip
    result, _ = _run(tmp_path, cfg)
    assert result.stopped_early and result.step == 15


def test_resume_is_bitwise_identical(tmp_path):
    cfg = _cfg(max_steps=12, ckpt_every=4, eval_every=4, keep_last=1)
    full, full_rows = _run(tmp_path / "full", cfg)

    with pytest.raises(KeyboardInterrupt):  # dies during step 7: checkpoint 4, metrics up to 6
        _run(tmp_path / "resumed", cfg, wrap=lambda loader: KilledAt(loader, 6))
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_4"
    torch.manual_seed(1234)  # a different init: resume must overwrite it all
    resumed, rows = _run(tmp_path / "resumed", cfg, model=TinyLM())
    assert resumed.resumed_from == 4
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in full_rows if "loss" in r]
    for a, b in zip(
        full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_retention_on_disk_after_training(tmp_path):
    _run(tmp_path, _cfg(max_steps=20, ckpt_every=5, eval_every=5, keep_last=2))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step_20" in names and "step_15" in names and len(names) <= 3


def test_rerun_after_the_last_checkpoint_reports_the_same_result(tmp_path):
    cfg = _cfg(max_steps=6, ckpt_every=3, eval_every=3)
    first, _ = _run(tmp_path, cfg)
    again, rows = _run(tmp_path, cfg)
    assert again.resumed_from == 6 and again.step == 6
    assert (again.train_loss, again.val_loss) == (first.train_loss, first.val_loss) != (None, None)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))  # nothing duplicated


def test_mfu_peak_is_the_longest_matching_gpu_name():
    from lmforge.train.pace import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Tesla T4") is None


def test_time_estimate_is_announced_once_early(tmp_path, monkeypatch):
    """After ETA_AFTER_S of training the loop tells the context how long the stage has left."""
    import lmforge.train.loop as loop

    monkeypatch.setattr(loop, "ETA_AFTER_S", 0.0)
    monkeypatch.setattr(loop, "ETA_MIN_LEFT_S", 0.0)
    calls = []
    monkeypatch.setattr(
        "lmforge.artifacts.StageContext.announce_eta",
        lambda self, left, speed: calls.append((left, speed)),
    )
    _run(tmp_path, _cfg(max_steps=12, eval_every=0))
    assert len(calls) == 1
    left, speed = calls[0]
    assert left > 0 and speed.endswith(f"tokens/s on {torch.get_num_threads()} CPU threads")


def test_projected_time_left_counts_the_evaluations_still_to_come():
    """The quickstart's pretraining (300 steps, eval every 100 of 10 batches) measured at 0.5 s a
    step after 21 steps: 279 steps and 3 evaluations of 10 forward passes (1/3 of a step each)."""
    cfg = _cfg(max_steps=300, eval_every=100, eval_steps=10)
    assert projected_left_s(0.5, 21, cfg, 1, evaluates=False) == pytest.approx(139.5)
    assert projected_left_s(0.5, 21, cfg, 1, evaluates=True) == pytest.approx(139.5 + 3 * 10 / 6)
    assert projected_left_s(0.5, 100, cfg, 1, True) == pytest.approx(100 + 3 * 10 / 6)  # its own
    assert projected_left_s(0.5, 101, cfg, 1, True) == pytest.approx(99.5 + 2 * 10 / 6)
    assert projected_left_s(0.5, 21, cfg, 4, True) == pytest.approx(139.5 + 3 * 10 / 24)  # accum
    ragged = _cfg(max_steps=250, eval_every=100, eval_steps=6)  # at 100, 200 and the last step
    assert projected_left_s(1.0, 5, ragged, 1, True) == pytest.approx(245 + 3 * 2)
    only_end = _cfg(max_steps=40, eval_every=0, eval_steps=3)
    assert projected_left_s(1.0, 10, only_end, 1, True) == pytest.approx(30 + 1)


def test_time_estimate_leaves_out_the_evaluations_already_run(tmp_path, monkeypatch):
    """An evaluation inside the first seconds is not training pace: counted in the measured pace
    and again as an evaluation to come, it made the estimate 0.5 s x 11 evaluations too long."""
    import time

    import lmforge.train.loop as loop

    monkeypatch.setattr(loop, "ETA_AFTER_S", 0.25)  # after step 1's evaluation, at step 2
    monkeypatch.setattr(loop, "ETA_MIN_LEFT_S", 0.0)
    calls = []
    monkeypatch.setattr(
        "lmforge.artifacts.StageContext.announce_eta",
        lambda self, left, speed: calls.append(left),
    )

    def slow_eval(model):
        time.sleep(0.5)
        return {"val_loss": 1.0}

    cfg = _cfg(max_steps=12, eval_every=1, eval_steps=1)
    loader = TokenWindows(TOKENS[:-4000], cfg.seq_len, cfg.micro_batch_size, seed=cfg.seed)
    ctx = make_ctx(tmp_path)
    try:
        train(TinyLM(), lm_loss, loader, cfg, ctx, eval_fn=slow_eval)
    finally:
        ctx.metrics.close()
    # 10 steps and 11 one-batch evaluations at a tiny model's pace (ms); 2.7 s or more before
    assert len(calls) == 1 and 0 < calls[0] < 1.5


def test_the_runs_tokens_per_s_leaves_out_gathering_the_weights(tmp_path, monkeypatch):
    """TrainResult.tokens_per_s is the training's: gathering the full state dict after the loop
    (a collective under FSDP) is not in it. The pace's clock here: 100 s a step, 1000 s to
    gather."""
    import time
    from types import SimpleNamespace

    import lmforge.train.loop as loop
    import lmforge.train.pace as pace

    clock = [time.perf_counter()]  # where the pace's run starts, read from the real clock
    monkeypatch.setattr(pace, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    gather = loop.full_model_state

    def slow_gather(model):
        clock[0] += 1000.0
        return gather(model)

    def slow_loss(model, batch):
        clock[0] += 100.0
        return lm_loss(model, batch)

    monkeypatch.setattr(loop, "full_model_state", slow_gather)
    result, _ = _run(tmp_path, _cfg(max_steps=4, eval_every=0), loss_fn=slow_loss)
    # 4 steps of 8 x 16 tokens in 400 s, less the real seconds of setup before the run's start
    assert result.tokens_per_s == pytest.approx(4 * 8 * 16 / 400.0, rel=0.05)  # not / 1400


def test_truncating_metrics_keeps_earlier_rows_and_the_writers_next_row(tmp_path):
    from lmforge.common.logging import MetricsWriter, read_metrics
    from lmforge.train.loop import _truncate_metrics

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        writer.log(step=step)  # the handle stays open, as in a run resumed in-process
    with open(writer.path, "a", encoding="utf-8") as fh:
        fh.write('{"step": 6, "lo')  # a torn last line from a killed process
    _truncate_metrics(writer, after_step=3)
    writer.log(step=4)
    assert [row["step"] for row in read_metrics(writer.path)] == [1, 2, 3, 4]
