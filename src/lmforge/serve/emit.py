"""A step's logits become each row's next token and its TokenEvent.

One batched draw for the step's rows (serve/sampling.py), logprobs when asked, the row's text
piece (serve/detok.py) and its end: a stop token or string (neither before min_tokens, as in
vLLM), a structured answer complete (serve/guided_rows.py), or max_tokens. emit_tokens pushes
the events of the rows that continue (their asyncio readers woken once for the step, through the
caller's WakeBatch) and returns the final events, which the engine sends under its lock once the
finished rows have left the batch. Failures stay local: a failed draw fails this call's rows, a
row's own failure (its detokenization, say) ends only that row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.serve.guided_rows import advance_guide, guided_logits
from lmforge.serve.handle import TokenEvent, WakeBatch
from lmforge.serve.request_book import Row, error_event
from lmforge.serve.row_batch import RowBatch
from lmforge.serve.sampling import sample_rows, top_logprobs
from lmforge.tokenizer.files import TokenizerFiles

log = logging.getLogger(__name__)


@dataclass
class Emitted:
    """What a step's sampling left for the engine to apply."""

    keep: list[int]  # indices of the rows that continue (their events already pushed)
    finals: list[tuple[Row, TokenEvent]]  # the others' final events, not yet sent
    sampled: int  # tokens drawn, counted as generated


def emit_tokens(
    rows: list[Row], logits: Tensor, files: TokenizerFiles, wakes: WakeBatch
) -> Emitted:
    """Samples each row's next token from logits (B, V) and makes its event; see the module."""
    params = [r.params for r in rows]
    k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
    keep: list[int] = []
    finals: list[tuple[Row, TokenEvent]] = []
    try:
        batch = RowBatch.of(rows, logits.device)
        ruled = guided_logits(rows, history_rules(rows, logits, batch), logits)
        chosen = sample_rows(ruled, params, [r.generator for r in rows], batch.bias).tolist()
        batch.append(chosen)
        if k is not None:
            ids = torch.tensor(chosen, dtype=torch.long, device=logits.device)
            lps, top_values, top_ids = top_logprobs(logits, ids, k)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
    except Exception as exc:  # fail these rows, keep serving
        log.exception("sampling failed for %d requests", len(rows))
        chosen, finals = [], [(row, error_event(exc)) for row in rows]
    for i, (row, token) in enumerate(zip(rows, chosen, strict=False)):
        try:
            event = next_event(row, token)
            if row.params.logprobs is not None:
                n = row.params.logprobs
                event.logprob = lps[i]
                event.top_logprobs = alternatives(files, top_ids[i][:n], top_values[i][:n])
        except Exception as exc:  # a row's own failure ends only that row
            log.exception("request %s failed", row.request_id)
            finals.append((row, error_event(exc)))
            continue
        if event.finish_reason is None:
            row.pending = token
            keep.append(i)
            row.handle.push(event, wakes)
        else:
            finals.append((row, event))
    return Emitted(keep, finals, len(chosen))


def history_rules(rows: list[Row], logits: Tensor, batch: RowBatch) -> Tensor:
    """logits (B, V) with each row's logits rules and repetition penalty applied over its
    history (kept in `batch`, the rows' RowBatch), in generate()'s order; rows that ask for
    neither are left as they are (and when none asks, logits itself comes back). The chosen
    token's logprobs stay the raw model's."""
    if not batch.ruled and batch.seen is None:
        return logits
    out = logits.float().clone()
    for i, j in batch.ruled.items():
        row = rows[i]
        p = row.params
        out[i] = p.rules.apply(
            out[i : i + 1], batch.history.row(j), None, row.generated, p.max_tokens, row.stop_list
        )[0]
    if batch.seen is not None:  # after the rules, as generate() applies them
        batch.seen.apply(out)
    return out


def next_event(row: Row, token: int) -> TokenEvent:
    """The row's event for its sampled `token`: the text it adds, and its end if it ends."""
    assert row.stream is not None
    row.generated += 1
    if row.history is not None:
        row.history.append(token)
    if token in row.stops:
        return TokenEvent(token, row.stream.flush(), finish_reason="stop")
    complete = advance_guide(row, token)
    text, stopped = row.stream.push(token, row.generated >= row.params.rules.min_new_tokens)
    if stopped:
        return TokenEvent(token, text, finish_reason="stop")
    if complete:
        return TokenEvent(token, text + row.stream.flush(), finish_reason="stop")
    if row.generated >= row.params.max_tokens:
        return TokenEvent(token, text + row.stream.flush(), finish_reason="length")
    return TokenEvent(token, text)


def alternatives(files: TokenizerFiles, ids: list[int], values: list[float]) -> dict[str, float]:
    """Top-k alternatives as {decoded token: logprob}; the likelier wins a string collision."""
    out: dict[str, float] = {}
    for token_id, value in zip(ids, values, strict=True):
        out.setdefault(files.decode([token_id], skip_special_tokens=False), value)
    return out
