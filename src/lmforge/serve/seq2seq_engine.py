"""Seq2SeqEngine: the Engine interface (submit/abort/stats/shutdown, same events) for an
encoder-decoder model directory (Seq2SeqLM, or the T5 adapter).

The base Engine's batch is one right-aligned KV cache of a causal Transformer. An encoder-decoder
row needs its encoder output (cross-attention keys/values, computed once when it joins) and a
decoder cache whose positions start at 0 for every row, and Seq2SeqLM.decode takes one start
position per call. So the running batch is a list of cohorts, each the requests that joined in
one step: a cohort holds its rows' cross keys/values, source mask and decoder KVCache, and every
engine step decodes each cohort once (one batched forward per cohort). Requests still join at
any step (as a new cohort) and leave at any step (their rows are dropped from their cohort's
tensors); sampling, detokenization, stop handling and failures are the base Engine's.

Sources end in the model's eos (model.seq2seq_generate.source_row), as fine-tuning builds them.
A chat request's source is its last user message (render_chat), as the model was trained on user
turns, and a text completion's is its prompt; a retrieval-augmented model (retrieval.json in its
directory: serve.retrieval_spec.RetrievalSpec) gets that turn + the knowledge-base passages the server
found for it (`source`), laid out by the same RetrievalSpec.source that built its training
sources, and warns when a request arrives without them.
engine_class(model_dir) picks this class when config.json describes an encoder-decoder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import InputError
from lmforge.model.convert import is_encoder_decoder
from lmforge.model.generate import KVCache
from lmforge.model.seq2seq_generate import right_pad, source_row
from lmforge.serve.engine import Engine
from lmforge.serve.retrieval import Passage
from lmforge.serve.retrieval_spec import RetrievalSpec
from lmforge.serve.sampling import SamplingParams
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import eos_ids

log = logging.getLogger(__name__)


def engine_class(model_dir: Path | str) -> type[Engine]:
    """The engine that serves model_dir: Seq2SeqEngine for encoder-decoders, else Engine."""
    return Seq2SeqEngine if is_encoder_decoder(model_dir) else Engine


class _Cohort:
    """Rows that joined in one step: their encoder keys/values, source mask, decoder cache."""

    def __init__(self, rows: list[Any], cross: list[tuple[Tensor, Tensor]], src_mask: Tensor,
                 cache: KVCache) -> None:  # fmt: skip
        self.rows, self.cross, self.src_mask, self.cache = rows, cross, src_mask, cache
        self.length = 0  # decoder positions cached

    def keep(self, keep: list[int]) -> None:
        """Only these rows (indices into self.rows) stay."""
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.src_mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.cross = [(k[idx], v[idx]) for k, v in self.cross]
        self.src_mask = self.src_mask[idx]
        self.cache.k, self.cache.v = self.cache.k[:, idx], self.cache.v[:, idx]


def user_turn(text: str, missing: str) -> str:
    """text as the user turn a seq2seq model answers (a chat's last user message, a text
    completion prompt to a model trained with passages); a blank one is refused, `missing`
    saying where, since there is nothing to answer or to find passages for."""
    if not text.strip():
        raise InputError(f"a seq2seq model answers a user message; {missing}")
    return text


class Seq2SeqEngine(Engine):
    """Continuous batching for an encoder-decoder: see the module docstring."""

    def __init__(self, model: nn.Module, files: TokenizerFiles, *,
                 retrieval: RetrievalSpec | None = None, **kw: Any) -> None:  # fmt: skip
        super().__init__(model, files, **kw)
        if self.compiled_decode:  # model/compiled_decode.py steps causal Transformers only
            log.warning("%s: compiled decoding is for causal models; it decodes eagerly", self.name)
            self.compiled_decode = False
        self.retrieval = retrieval  # the model's sources carry knowledge-base passages
        self._warned_no_kb = False
        gen = kw.get("generation_config") or {}
        start = gen.get("decoder_start_token_id", getattr(model.config, "decoder_start_id", None))
        if start is None:
            start = files.bos_id if files.bos_id is not None else files.pad_id
        self.decoder_start_id = int(start)
        stops = eos_ids(gen) if gen else []
        self.source_eos: int | None = stops[0] if stops else None  # sources end in eos (BART)
        # the longest source the encoder takes whole: source_row appends eos within max_context
        self.max_source = self.max_context - (self.source_eos is not None)
        self._cohorts: list[_Cohort] = []

    @classmethod
    def from_dir(cls, model_dir: Path | str, **kw: Any) -> Engine:
        """Engine.from_dir, plus the model's RetrievalSpec when it was trained with passages."""
        from lmforge.model.convert import resolve_model_dir

        spec = RetrievalSpec.load(resolve_model_dir(Path(model_dir)))
        return super().from_dir(model_dir, retrieval=spec, **kw)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        passages: list[Passage] | None = None,
    ) -> str:
        """The source text of a conversation: its last user message, with `passages` (the
        knowledge base's results for it; None when there is no knowledge base) when the model was
        trained with them."""
        users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        question = user_turn(str(users[-1]) if users else "", "the conversation has none")
        return self.source(question, passages)

    def source(self, question: str, passages: list[Passage] | None) -> str:
        """The source for a user turn (a chat's last user message, a completion's prompt): with
        its `passages` (None: the server has no knowledge base or the request turned it off)
        when the model was trained with them, as the dialogue stage built its sources."""
        if self.retrieval is None:
            return question
        if passages is None:
            if not self._warned_no_kb:
                log.warning(
                    "%s was trained on sources with %d knowledge-base passages (retrieval.json), "
                    "but this request has none (no knowledge base, or the request turned it off): "
                    "it answers from the question alone, worse than it was trained to; serve it "
                    "with --kb (the recipe's serve.yaml has it)",
                    self.name, self.retrieval.passages,
                )  # fmt: skip
                self._warned_no_kb = True
            return question
        return self.retrieval.source(question, passages, lambda text: len(self.files.encode(text)))

    def _history_start(self, row: Any) -> list[int]:
        """The rules count the decoder's tokens, from its start token (the source is apart)."""
        return [self.decoder_start_id]

    def token_room(self, prompt_len: int) -> int:
        """The most tokens an answer to a source of `prompt_len` tokens can have: the decoder's
        context after its start token, whatever the source's length (the encoder reads the
        source separately); negative when the source alone (+ its eos) does not fit.
        _check_prompt's rule."""
        if prompt_len > self.max_source:
            return self.max_source - prompt_len
        return self.max_context - 1

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        self._check_ids(prompt)
        if len(prompt) > self.max_source or params.max_tokens + 1 > self.max_context:
            raise InputError(
                f"the source ({len(prompt)} tokens) and max_tokens ({params.max_tokens}) must "
                f"each fit the model's {self.max_context} positions (source: at most "
                f"{self.max_source} tokens, before its eos; decoder: max_tokens + 1)"
            )

    def _cache_usage(self) -> tuple[int, int]:
        tokens = sum(len(c.rows) * c.length for c in self._cohorts)
        capacity = sum(len(c.rows) * c.cache.max_len for c in self._cohorts)
        return tokens, capacity

    def _sync_running(self) -> None:
        """(lock held) The running rows in cohort order, which _keep's indices refer to."""
        for cohort in self._cohorts:  # rows a failed step already finished leave here
            cohort.keep([i for i, r in enumerate(cohort.rows) if not r.handle.finished])
        self._cohorts = [c for c in self._cohorts if c.rows]
        self._running = [row for c in self._cohorts for row in c.rows]

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self._running):
            return
        wanted, offset = set(keep), 0
        for cohort in self._cohorts:
            n = len(cohort.rows)
            cohort.keep([i for i in range(n) if offset + i in wanted])
            offset += n
        self._sync_running()

    def _prefill(self, rows: list[Any]) -> None:
        """Encodes the newcomers in one pass and takes their first decoder step as a cohort
        (StepLoop._prefill_group: a failed pass retries them one by one, each its own cohort)."""
        joined = self._prefill_group(rows)
        with self._lock:
            self._cohorts += [cohort for _, cohort in joined]
            self._sync_running()

    def _prefill_forward(self, rows: list[Any]) -> tuple[_Cohort, Tensor]:
        """The newcomers' cohort and their first decoder step's logits (a _Cohort keeps rows as a
        BatchCache does, which is all StepLoop._prefill_group asks of it)."""
        model = self.model
        sources = [r.prompt if self.source_eos is None else
                   source_row(r.prompt, self.source_eos, self.max_context) for r in rows]  # fmt: skip
        src, mask = right_pad(sources, self.files.pad_id, self.device)
        cross = model.cross_kv(model.encode(src, mask))
        max_len = 1 + max(r.params.max_tokens for r in rows)
        cohort = _Cohort(list(rows), cross, mask, model.new_cache(len(rows), max_len))
        for row in rows:
            self._start(row)
        start = torch.full((len(rows), 1), self.decoder_start_id, device=self.device)
        return cohort, self._step(cohort, start)

    def _step(self, cohort: _Cohort, ids: Tensor) -> Tensor:
        """One decoder position for a cohort: next-token logits (B, V)."""
        h = self.model.decode(ids, cohort.cross, cohort.src_mask, kv_cache=cohort.cache,
                              start_pos=cohort.length)  # fmt: skip
        cohort.length += 1
        return self.model.logits(h[:, -1])

    def _decode(self) -> None:
        """One decoder step for every cohort; a cohort that fails fails only its rows."""
        for cohort in list(self._cohorts):
            try:
                ids = torch.tensor([[r.pending] for r in cohort.rows], device=self.device)
                logits = self._step(cohort, ids)
            except Exception as exc:
                log.exception("decoding step failed for %d requests", len(cohort.rows))
                self._fail(cohort.rows, exc)
                cohort.keep([])
                continue
            with self._lock:
                self._counts["steps"] += 1
            cohort.keep(self._emit(cohort.rows, logits))
        with self._lock:
            self._sync_running()
