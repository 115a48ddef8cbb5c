"""How each model family answers the evals' questions: the scorer EvalModel delegates to.

Every task asks a model the same few things: log p(continuation | context) (classification by
likelihood, multiple choice), the perplexity of held-out text, a per-token score of a whole text
(counterfactual), the NLL of a reference given its prompt (generation tasks) and a generated
continuation. What those mean depends on the family, so each family has one scorer, chosen from
config.json (scorer_for), never from a model's name:

- CausalScorer: next-token log-probabilities; perplexity with sliding windows (evals.perplexity);
- EncoderScorer (evals.pll, causal=false): masked-LM pseudo-log-likelihood (Salazar et al. 2020),
  labelled "pseudo_log_likelihood" so it is never read as a causal perplexity; no generation;
- Seq2SeqScorer (config.json's is_encoder_decoder, or our ModelConfig's): log p(target | source)
  through the decoder, the target ending in eos as fine-tuning trained it; generation from the
  decoder start.
  Its perplexity task is refused: a decoder's perplexity needs a source, which held-out text has
  not; a generation task's reference perplexity (NLL of the reference given its prompt) is the
  number seq2seq users compare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from lmforge.errors import InputError

if TYPE_CHECKING:
    from lmforge.evals.lm import EvalModel, GenerationSettings
    from lmforge.evals.perplexity import PerplexityResult
    from lmforge.model.beam_search import BeamSettings

SCORE_BATCH = 16  # rows per forward pass when scoring
Scored = tuple[list[float], bool]  # log p of every target token, and whether all are the argmax


class Scorer(Protocol):
    """What tasks ask of a model family (see the module docstring)."""

    kind: str  # "causal" | "encoder" | "seq2seq": recorded beside every score
    scoring: str  # how log-likelihoods are computed: "causal" | "pseudo_log_likelihood" | ...

    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), all greedy) per continuation."""
        ...

    def perplexity(self, texts: list[str], max_length: int | None, stride: int | None,
                   on_doc: Any = None) -> PerplexityResult: ...  # fmt: skip

    def mean_logprobs(self, texts: list[str]) -> list[float]:
        """Mean log-probability per token of each text (its first window)."""
        ...

    def reference_scores(self, prompts: list[str], refs: list[str], chat: bool) -> list[Scored]:
        """Each reference's token log-probs given its prompt, as generation would read it."""
        ...

    def generate(self, prompts: list[str], settings: GenerationSettings, chat: bool,
                 batch_size: int) -> list[list[int]]: ...  # fmt: skip


def scorer_for(lm: EvalModel, hf: dict[str, Any]) -> Scorer:
    """The scorer config.json describes: encoder-decoder, bidirectional encoder, or causal LM."""
    if hf.get("is_encoder_decoder") or lm.model.config.is_encoder_decoder:
        return Seq2SeqScorer(lm)
    if not lm.model.config.causal:
        from lmforge.evals.pll import EncoderScorer

        return EncoderScorer(lm)
    return CausalScorer(lm)


def picked_logprobs(logits: torch.Tensor, targets: list[list[int]]) -> list[Scored]:
    """Split (sum(len(t)), V) logits of the flattened targets into per-row (log-probs, greedy)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    y = torch.tensor([tok for t in targets for tok in t], dtype=torch.long, device=logp.device)
    picked = logp.gather(1, y[:, None])[:, 0].double().tolist()
    greedy = (logp.argmax(dim=-1) == y).tolist()
    out, pos = [], 0
    for t in targets:
        out.append((picked[pos : pos + len(t)], all(greedy[pos : pos + len(t)])))
        pos += len(t)
    return out


def summed(scored: list[Scored]) -> list[tuple[float, bool]]:
    return [(float(sum(lps)), greedy) for lps, greedy in scored]


class CausalScorer:
    """A decoder-only LM: next-token log-probabilities of right-padded rows."""

    kind, scoring = "causal", "causal"

    def __init__(self, lm: EvalModel) -> None:
        self.lm = lm

    @torch.no_grad()
    def score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """For each (context, targets): log p of every target token, and whether all are greedy.

        One forward pass per batch of rows, right-padded (causal attention: padding after a row's
        tokens cannot change them); only the target positions go through lm_head, so memory
        is (targets x vocab), not (tokens x vocab). Each row needs a non-empty context and
        len(context) + len(targets) - 1 <= block_size (callers window longer inputs).
        """
        model, results = self.lm.model, []
        for lo in range(0, len(rows), SCORE_BATCH):
            chunk = rows[lo : lo + SCORE_BATCH]
            inputs = [(ctx + tgt)[:-1] for ctx, tgt in chunk]
            if any(not ctx for ctx, _ in chunk) or max(map(len, inputs)) > self.lm.block_size:
                raise ValueError("each row needs context and at most block_size input tokens")
            x = torch.zeros((len(chunk), max(map(len, inputs))), dtype=torch.long)
            for i, ids in enumerate(inputs):
                x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            h = model.hidden_states(x.to(self.lm.device))  # (B, T, C)
            rows_idx = [i for i, (_, t) in enumerate(chunk) for _ in t]
            cols_idx = [len(inp) - len(t) + j for inp, (_, t) in zip(inputs, chunk, strict=True)
                        for j in range(len(t))]  # fmt: skip
            targets = [t for _, t in chunk]
            results += picked_logprobs(model.lm_head(h[rows_idx, cols_idx]), targets)
        return results

    def _window(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """The row that fits the window: context dropped from the left (lm-evaluation-harness)."""
        cont = cont[-self.lm.block_size :]
        return ctx[-(self.lm.block_size + 1 - len(cont)) :], cont

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """score_batch over the (context, continuation) pairs, windowed, SCORE_BATCH rows a
        pass; an empty continuation scores ([], True)."""
        scored = iter(self.score_batch([self._window(ctx, c) for ctx, c in pairs if c]))
        return [next(scored) if c else ([], True) for _, c in pairs]

    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """The context as a document start (EvalModel.start), each continuation after it."""
        ctx = self.lm.start(context)
        if not ctx:
            raise InputError("empty context and the tokenizer has no BOS/EOS token to start from")
        return summed(self._score_pairs([(ctx, self.lm.encode(c)) for c in continuations]))

    def perplexity(self, texts: list[str], max_length: int | None, stride: int | None,
                   on_doc: Any = None) -> PerplexityResult:  # fmt: skip
        from lmforge.evals.perplexity import causal_perplexity

        return causal_perplexity(self.lm, texts, max_length, stride, on_doc)

    def mean_logprobs(self, texts: list[str]) -> list[float]:
        rows = []
        for text in texts:
            ids = self.lm.start(text)[: self.lm.block_size + 1]
            if len(ids) < 2:
                raise InputError(f"example {text[:60]!r} is too short to score (< 2 tokens)")
            rows.append((ids[:1], ids[1:]))
        return [sum(lps) / len(lps) for lps, _ in self.score_batch(rows)]

    def reference_scores(self, prompts: list[str], refs: list[str], chat: bool) -> list[Scored]:
        """The reference's tokens after the prompt as generate() renders it, batched."""
        lm = self.lm
        return self._score_pairs([
            (lm.encode(lm.render_chat(p)) if chat else lm.start(p), lm.encode(r))
            for p, r in zip(prompts, refs, strict=True)
        ])  # fmt: skip

    def generate(self, prompts: list[str], settings: GenerationSettings, chat: bool,
                 batch_size: int) -> list[list[int]]:  # fmt: skip
        from lmforge.model.generate import generate_batched

        lm = self.lm
        budget, rows, limit = self.prompt_rows(prompts, settings, chat)
        common = dict(batch_size=batch_size, stop_tokens=lm.stop_ids(), max_length=limit)
        if settings.num_beams > 1:
            from lmforge.model.beam_search import beam_generate_batched

            return beam_generate_batched(lm.model, rows, budget, beam_settings(settings), **common)
        return generate_batched(
            lm.model, rows, budget, greedy=settings.temperature == 0, compile=settings.compile,
            constraint=lm.row_constraint(settings), **common, **sampling_kwargs(settings),
        )  # fmt: skip

    def prompt_rows(
        self, prompts: list[str], settings: GenerationSettings, chat: bool
    ) -> tuple[int, list[list[int]], int | None]:
        """(new-token budget, each prompt's ids, max_length or None) as generate() feeds them:
        chat-rendered or a document start, cut from the left so that prompt + budget fit the
        model's block_size. Under a max_length (settings.length_limit, at most block_size) a
        prompt's budget is max_length - its length (model.generate.batch_budget), and a prompt
        that leaves no room is an InputError, as transformers' ValueError."""
        lm = self.lm
        asked = settings.length_limit()
        limit = None if asked is None else min(asked, lm.block_size)
        budget = min(settings.max_new_tokens, max(lm.block_size - 1, 1))
        keep = lm.block_size - budget  # the most prompt tokens kept
        if limit is not None:  # a one-token prompt's budget; longer ones get less
            budget, keep = limit - 1, limit - 1
        rows = []
        for i, prompt in enumerate(prompts):
            ids = lm.encode(lm.render_chat(prompt)) if chat else lm.start(prompt)
            if not ids:
                raise InputError(
                    "empty prompt and the tokenizer has no BOS/EOS token to start from"
                )
            if asked is not None and len(ids) >= asked:
                raise InputError(
                    f"prompt {i} has {len(ids)} tokens, at least max_length {asked} (the "
                    "checkpoint's generation_config.json or the settings), which counts the "
                    "prompt; set max_new_tokens (--max-new-tokens) instead"
                )
            rows.append(ids[-keep:])
        return budget, rows, limit


def beam_settings(settings: GenerationSettings) -> BeamSettings:
    """The beam search the settings ask for (num_beams > 1; temperature 0 is checked there)."""
    from lmforge.model.beam_search import BeamSettings

    return BeamSettings(
        settings.num_beams, settings.length_penalty, settings.early_stopping,
        settings.repetition_penalty, settings.logits_rules(),
    )  # fmt: skip


def sampling_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    return {"temperature": settings.temperature, "top_k": settings.top_k,
            "top_p": settings.top_p, "repetition_penalty": settings.repetition_penalty,
            "seed": settings.seed, "rules": settings.logits_rules()}  # fmt: skip


class Seq2SeqScorer:
    """An encoder-decoder: the context is the source, the continuation the target (then eos)."""

    kind, scoring = "seq2seq", "conditional"

    def __init__(self, lm: EvalModel) -> None:
        self.lm = lm
        stops = lm.stop_ids()
        self.start = lm.generation_config.get("decoder_start_token_id", lm.decoder_start_id)
        if self.start is None or not stops:
            raise InputError(
                f"{lm.path} lacks decoder_start_token_id or eos_token_id in config.json / "
                "generation_config.json; an encoder-decoder needs both to score and generate"
            )
        self.eos, self.stops = stops[0], stops

    def source(self, text: str) -> list[int]:
        """The encoder's input: the text's ids then eos, as fine-tuning built sources."""
        from lmforge.model.seq2seq_generate import source_row

        return source_row(self.lm.encode(text), self.eos, self.lm.block_size)

    @torch.no_grad()
    def target_scores(self, rows: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """log p of each target token and of the eos after it, given the source (teacher forced:
        decoder input = start + target, BART's shift-right), SCORE_BATCH rows a pass."""
        from lmforge.model.seq2seq_generate import right_pad

        model, dev, results = self.lm.model, self.lm.device, []
        for lo in range(0, len(rows), SCORE_BATCH):
            chunk = rows[lo : lo + SCORE_BATCH]
            tgts = [t[: self.lm.block_size - 1] for _, t in chunk]
            src, mask = right_pad([s for s, _ in chunk], self.lm.pad_id, dev)
            dec, _ = right_pad([[self.start, *t] for t in tgts], self.lm.pad_id, dev)
            h = model.decode(dec, model.cross_kv(model.encode(src, mask)), mask)  # (B, T, C)
            labels = [[*t, self.eos] for t in tgts]
            rows_idx = [i for i, t in enumerate(labels) for _ in t]
            cols_idx = [j for t in labels for j in range(len(t))]
            results += picked_logprobs(model.logits(h[rows_idx, cols_idx]), labels)
        return results

    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        src = self.source(context)
        return summed(self.target_scores([(src, self.lm.encode(c)) for c in continuations]))

    def perplexity(self, texts: list[str], max_length: int | None, stride: int | None,
                   on_doc: Any = None) -> PerplexityResult:  # fmt: skip
        raise InputError(
            f"{self.lm.path} is an encoder-decoder: a perplexity task on plain text has no source "
            "to condition on. Use a generation task ({prompt, reference} records): it reports "
            "reference_perplexity, the NLL of each reference given its prompt as the source"
        )

    def mean_logprobs(self, texts: list[str]) -> list[float]:
        """Each text as a target given an empty source (only eos): the decoder's language model."""
        empty = self.source("")
        scored = self.target_scores([(empty, self.lm.encode(t)) for t in texts])
        return [sum(lps) / len(lps) for lps, _ in scored]

    def reference_scores(self, prompts: list[str], refs: list[str], chat: bool) -> list[Scored]:
        rows = [(self.source(p), self.lm.encode(r)) for p, r in zip(prompts, refs, strict=True)]
        return self.target_scores(rows)

    def generate(self, prompts: list[str], settings: GenerationSettings, chat: bool,
                 batch_size: int) -> list[list[int]]:  # fmt: skip
        """Each prompt encoded as a source, the target decoded from decoder_start_token_id
        (model.seq2seq_generate), stopping at the directory's eos ids; chat is not used."""
        from lmforge.model.seq2seq_generate import generate_seq2seq_batched

        lm = self.lm
        sources = [self.source(p) for p in prompts]
        limit = settings.length_limit()  # the decoder start included
        budget = min(settings.max_new_tokens if limit is None else limit - 1, lm.block_size - 1)
        ids = dict(decoder_start_id=self.start, pad_id=lm.pad_id, stop_tokens=self.stops)
        if settings.num_beams > 1:
            from lmforge.model.beam_search import beam_generate_seq2seq_batched

            return beam_generate_seq2seq_batched(
                lm.model, sources, budget, beam_settings(settings), batch_size=batch_size, **ids
            )
        return generate_seq2seq_batched(
            lm.model, sources, budget, batch_size=batch_size, greedy=settings.temperature == 0,
            **ids, **sampling_kwargs(settings),
        )  # fmt: skip
