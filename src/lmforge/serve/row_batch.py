"""The tensors a decoding step needs that change only when rows join or leave the batch, or grow
by one token a row per step: kept across steps instead of rebuilt from Python lists each step.

A RowBatch holds, for the rows of one step in order: the scatter index of their logit_bias, the
history of the rows whose logits rules need it (a (R, capacity) token table, a view per row),
and the distinct tokens each repetition-penalized row has seen (padded with its own first token,
so the penalty is one gather and one scatter over those columns, not a (B, V) mask). Every Row
points to the RowBatch it was last emitted in; RowBatch.of reuses it while a step's rows are the
same Row objects in the same order (the engine's running batch between joins and leaves). When
rows left or joined (a newcomer from its prefill's own RowBatch), the new one gathers the rows'
kept tensors from the batches they were in (regroup); a batch with a row never emitted before
is built from the rows' history lists (build). After each draw, append() adds the step's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from lmforge.serve.request_book import Row
from lmforge.serve.sampling import LogitBias, logit_bias_of

MIN_COLUMNS = 64  # a token table's first capacity; it doubles when a row outgrows it


def long_tensor(ints: Iterable[int], count: int) -> Tensor:
    """count Python ints as a long tensor, through numpy: torch.tensor(list) costs ~5x more."""
    return torch.from_numpy(np.fromiter(ints, dtype=np.int64, count=count))


class TokenTable:
    """Each row's token list as row j of a (R, capacity) long tensor, grown by appending; the
    columns past a row's length hold `pads[j]` (a token the row already has, or 0)."""

    def __init__(self, ids: Tensor, lengths: list[int], pads: list[int]) -> None:
        self.ids, self.lengths, self.pads = ids, lengths, pads

    @classmethod
    def from_lists(
        cls, lists: list[list[int]], pads: list[int], device: torch.device
    ) -> TokenTable:
        if not lists:  # no row needs one: the common case, kept cheap
            return cls(torch.empty((0, MIN_COLUMNS), dtype=torch.long, device=device), [], [])
        lengths = [len(tokens) for tokens in lists]
        capacity = max([MIN_COLUMNS, *lengths])
        ids = torch.tensor(pads, dtype=torch.long)[:, None].repeat(1, capacity)
        # every row's tokens in one write: per row, or from a nested list, costs several times more
        counts = torch.tensor(lengths, dtype=torch.long)
        row_of = torch.repeat_interleave(torch.arange(len(lists)), counts)
        col = torch.arange(row_of.numel()) - (counts.cumsum(0) - counts)[row_of]
        ids[row_of, col] = long_tensor(chain.from_iterable(lists), row_of.numel())
        return cls(ids.to(device), lengths, list(pads))

    @classmethod
    def gather(cls, picks: list[tuple[TokenTable, int]], device: torch.device) -> TokenTable:
        """Row j of each (table, j) in picks, in order, as a new table. Its capacity follows
        the picked rows (at most twice the longest, at least MIN_COLUMNS): the columns a long
        row that left needed go with it, instead of every later step's table keeping them."""
        if not picks:
            return cls.from_lists([], [], device)
        tables = list({id(table): table for table, _ in picks}.values())
        lengths, pads = [t.lengths[j] for t, j in picks], [t.pads[j] for t, j in picks]
        capacity = min(
            max(table.ids.size(1) for table in tables), max(MIN_COLUMNS, 2 * max(lengths))
        )
        starts, n = {}, 0
        for table in tables:
            starts[id(table)], n = n, n + table.ids.size(0)
        whole = torch.cat([table.at_width(capacity) for table in tables])
        index = torch.tensor([starts[id(t)] + j for t, j in picks], device=whole.device)
        return cls(whole.index_select(0, index), lengths, pads)

    def append(self, items: list[tuple[int, int]]) -> None:
        """Appends token t to row j for each (j, t), in one write."""
        if not items:
            return
        if max(self.lengths[j] for j, _ in items) >= self.ids.size(1):
            self.ids = self.at_width(2 * self.ids.size(1))
        js = [j for j, _ in items]
        cols = [self.lengths[j] for j in js]
        dev = self.ids.device
        self.ids[torch.tensor(js, device=dev), torch.tensor(cols, device=dev)] = torch.tensor(
            [t for _, t in items], dtype=torch.long, device=dev
        )
        for j in js:
            self.lengths[j] += 1

    def refill(self, j: int, pad: int) -> None:
        """Row j's padding becomes `pad` (its first token, once an empty row has one)."""
        self.pads[j] = pad
        self.ids[j, self.lengths[j] :] = pad

    def row(self, j: int) -> Tensor:
        """Row j's tokens, (1, length): a view."""
        return self.ids[j : j + 1, : self.lengths[j]]

    def at_width(self, capacity: int) -> Tensor:
        """ids with each row's padding cut or extended to `capacity` columns (capacity must
        hold the longest row)."""
        extra = capacity - self.ids.size(1)
        if extra <= 0:
            return self.ids[:, :capacity]
        pads = torch.tensor(self.pads, dtype=torch.long, device=self.ids.device)
        return torch.cat([self.ids, pads[:, None].expand(-1, extra)], dim=1)


class SeenTokens:
    """The distinct tokens of each repetition-penalized row, and the penalty over them."""

    def __init__(
        self, at: list[int], sets: list[set[int]], penalties: list[float], table: TokenTable
    ) -> None:
        self.at = at  # batch positions of the penalized rows
        self.position = {i: j for j, i in enumerate(at)}  # batch position -> row of the table
        self.sets, self.penalties, self.table = sets, penalties, table
        device = table.ids.device
        self.index = torch.tensor(at, dtype=torch.long, device=device)
        # 1 (exactly a no-op) for a row that has seen nothing yet: its padding is not a token
        self.penalty = torch.tensor(
            [[p if seen else 1.0] for p, seen in zip(penalties, sets, strict=True)], device=device
        )

    @classmethod
    def from_rows(cls, rows: list[Row], at: list[int], device: torch.device) -> SeenTokens:
        lists = [list(dict.fromkeys(rows[i].history or ())) for i in at]  # distinct, in order
        pads = [seen[0] if seen else 0 for seen in lists]
        penalties = [rows[i].params.repetition_penalty for i in at]
        return cls(
            at, [set(seen) for seen in lists], penalties, TokenTable.from_lists(lists, pads, device)
        )

    @classmethod
    def gather(
        cls, picks: list[tuple[SeenTokens, int]], at: list[int], device: torch.device
    ) -> SeenTokens:
        """Row j of each (seen, j) in picks, now at batch positions `at`."""
        table = TokenTable.gather([(seen.table, j) for seen, j in picks], device)
        sets = [seen.sets[j] for seen, j in picks]
        return cls(at, sets, [seen.penalties[j] for seen, j in picks], table)

    def add(self, tokens: list[int]) -> None:
        """Marks each penalized row's token of this step (tokens: by batch position) seen."""
        new = []
        for j, i in enumerate(self.at):
            token = tokens[i]
            if token in self.sets[j]:
                continue
            if not self.sets[j]:  # the row's first token: now its padding, and penalized
                self.table.refill(j, token)
                self.penalty[j, 0] = self.penalties[j]
            self.sets[j].add(token)
            new.append((j, token))
        self.table.append(new)

    def apply(self, logits: Tensor) -> None:
        """Penalizes, in place in logits (B, V), each penalized row's seen tokens: positive
        logits divided by the penalty, negative ones multiplied (apply_repetition_penalty)."""
        rows = logits.index_select(0, self.index)
        seen = rows.gather(1, self.table.ids)  # padding repeats a seen token: the same value
        penalized = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        logits.index_copy_(0, self.index, rows.scatter_(1, self.table.ids, penalized))


class RowBatch:
    """The kept per-step tensors of one batch of rows; see the module."""

    def __init__(
        self, rows: list[Row], ruled: list[int], history: TokenTable, seen: SeenTokens | None
    ) -> None:
        self.rows = list(rows)
        self.bias: LogitBias | None = logit_bias_of([r.params for r in rows], history.ids.device)
        self.ruled = {i: j for j, i in enumerate(ruled)}  # batch position -> history row
        self.history, self.seen = history, seen
        for row in rows:
            row.batch = self

    @classmethod
    def of(cls, rows: list[Row], device: torch.device) -> RowBatch:
        """The rows' RowBatch: the one they were last emitted in if it has exactly these rows
        in this order, else one regrouped from the batches they were in, else a new one."""
        kept = rows[0].batch if rows else None
        if (
            kept is not None
            and len(kept.rows) == len(rows)
            and all(a is b and a.batch is kept for a, b in zip(kept.rows, rows, strict=True))
        ):
            return kept
        return cls.regroup(rows, device) or cls.build(rows, device)

    @classmethod
    def build(cls, rows: list[Row], device: torch.device) -> RowBatch:
        """A RowBatch from the rows' history lists."""
        ruled = [i for i, r in enumerate(rows) if r.history is not None and r.params.rules.active]
        history = TokenTable.from_lists([rows[i].history for i in ruled], [0] * len(ruled), device)
        penalized = [
            i
            for i, r in enumerate(rows)
            if r.history is not None and r.params.repetition_penalty != 1.0
        ]
        seen = SeenTokens.from_rows(rows, penalized, device) if penalized else None
        return cls(rows, ruled, history, seen)

    @classmethod
    def regroup(cls, rows: list[Row], device: torch.device) -> RowBatch | None:
        """A RowBatch of the rows' kept tensors in the batches they were last emitted in (some
        rows left, others joined from their own prefill's batch); None when a row has none."""
        positions: dict[int, dict[int, int]] = {}  # id(batch) -> {id(row): its position}
        for row in rows:
            if row.batch is None:
                return None
            if id(row.batch) not in positions:
                positions[id(row.batch)] = {id(r): p for p, r in enumerate(row.batch.rows)}
        sources = [(r.batch, positions[id(r.batch)][id(r)]) for r in rows]
        ruled = [i for i, (b, p) in enumerate(sources) if p in b.ruled]
        history = TokenTable.gather(
            [(b.history, b.ruled[p]) for b, p in (sources[i] for i in ruled)], device
        )
        penalized = [
            i for i, (b, p) in enumerate(sources) if b.seen is not None and p in b.seen.position
        ]
        seen_picks = [(b.seen, b.seen.position[p]) for b, p in (sources[i] for i in penalized)]
        seen = SeenTokens.gather(seen_picks, penalized, device) if penalized else None
        return cls(rows, ruled, history, seen)

    def append(self, tokens: list[int]) -> None:
        """This step's drawn tokens (by batch position) join the rows' histories."""
        self.history.append([(j, tokens[i]) for i, j in self.ruled.items()])
        if self.seen is not None:
            self.seen.add(tokens)
