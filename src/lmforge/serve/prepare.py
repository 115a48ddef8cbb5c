"""A validated OpenAI request -> Prepared: engine jobs and what the response needs, nothing run.

One job per prompt and choice (`n > 1` is n submissions with seeds seed+i). The safety policy
screens the prompt (redacted, or the request refused), the knowledge base augments chat messages
(and the text prompts of a seq2seq model trained with passages, which carry `sources`),
max_tokens is checked against the model's context (a 400 naming the field), logit_bias against
its vocabulary and min_tokens against max_tokens (min_tokens overrides the checkpoint's
min_new_tokens for this request), and a deterministic request gets its response-cache key.
completions.py runs what this module prepares.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from lmforge.errors import InputError
from lmforge.model.logits_rules import LogitsRules
from lmforge.serve.api_error import model_not_found
from lmforge.serve.cache import cache_key
from lmforge.serve.protocol import APIError, ChatRequest, CompletionRequest, LogprobsBuilder, new_id
from lmforge.serve.retrieval import Passage, augment_messages
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.seq2seq_engine import user_turn
from lmforge.serve.tools import ToolPlan, ToolStream

KB_PASSAGES = 3  # passages a chat gets, unless its model was trained with another number


@dataclass
class Job:
    """One choice: a prompt and its params, submitted to the engine as request_id."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    params: Any  # engine.SamplingParams
    request_id: str = ""
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: LogprobsBuilder | None = None
    redactor: Any = None  # safety.StreamRedactor for this choice's output
    tool_stream: ToolStream | None = None  # a streamed chat answer that may call tools


@dataclass
class Prepared:
    """A request ready to run: its jobs and everything the response needs."""

    kind: str  # "completion" | "chat"
    response_id: str
    model: str
    engine: Any
    jobs: list[Job]
    prompt_tokens: int
    messages: list[dict[str, str]] | None = None
    sources: list[dict[str, Any]] | None = None
    refused: bool = False  # the prompt was refused: answer with the policy's refusal text
    cache_key: str | None = None
    stream: bool = False
    include_usage: bool = False
    tools: ToolPlan | None = None  # chat with tools: how its answer becomes tool calls


@dataclass(frozen=True)
class _Alike:
    """A request's sampling parts that are the same for each of its prompts: the checkpoint's
    defaults, the logit bias (checked against the vocabulary) and the structured-output guide."""

    defaults: Any  # the engine's request_defaults
    bias: tuple[tuple[int, float], ...]
    guide: Any  # constrain's Guide, or None


class RequestPreparer:
    """Turns completion and chat requests into Prepared against the app's engines and stores."""

    def __init__(self, state: Any) -> None:
        self.state = state  # server.ServeState: engines, cache, safety, kb, metrics, model_ids

    def engine_for(self, model: str) -> Any:
        engine = self.state.engines.get(model) or self.state.adapters.get(model)
        if engine is None and model in self.state.embedders:  # vLLM refuses them so too
            raise APIError(
                400, f"the model {model!r} is an embedding model: it serves /v1/embeddings, not "
                "completions or chat", param="model", code="embedding_model",
            )  # fmt: skip
        if engine is None:
            raise model_not_found(model, self.state.max_context())
        return engine

    async def prepare_completion(self, req: CompletionRequest) -> Prepared:
        if req.echo or req.suffix or (req.best_of or 1) > req.n:
            name = "echo" if req.echo else "suffix" if req.suffix else "best_of"
            raise APIError(400, f"{name} is not supported by this server", param=name)
        engine = self.engine_for(req.model)
        files = engine.files
        # A seq2seq model trained with passages reads a text prompt as chat's user turn: the same
        # source (its passages, score floor, layout) and `sources`, or the engine's warning
        # without a knowledge base. Other prompts (and token prompts, finished sources) go as sent.
        spec, use_kb = getattr(engine, "retrieval", None), self._use_kb(req.kb)
        if req.kb and spec is None:
            raise APIError(400, f"{req.model} was not trained with knowledge-base passages: its "
                           "completion prompts are sent as written (chat adds passages)", param="kb")  # fmt: skip
        refused, jobs, prompt_tokens = False, [], 0
        sources: list[dict[str, Any]] | None = [] if spec is not None and use_kb else None
        alike = self._alike(req, engine)
        for i, prompt in enumerate(req.prompts()):
            ids = None if isinstance(prompt, str) else [int(t) for t in prompt]
            if ids is not None and any(t < 0 or t >= files.vocab_size for t in ids):
                raise APIError(400, "prompt has token ids outside the vocabulary", param="prompt")
            original = prompt if ids is None else files.decode(ids, skip_special_tokens=False)
            text = self._screen_prompt(original)
            if text is None:
                refused, text = True, original
            if ids is None and spec is not None:  # a refusal is not generated: no passages
                try:
                    user_turn(text, f"prompt {i} is blank")  # as chat refuses a blank question
                except InputError as exc:
                    raise APIError(400, str(exc), param="prompt") from None
                if refused or not use_kb:
                    passages = [] if refused else None  # None: the engine warns
                else:
                    passages = await self._passages(engine, text)
                text = engine.source(text, passages)
                if sources is not None:
                    sources += [{**p.to_dict(), "prompt_index": i} for p in passages or []]
            if ids is None or text != original:  # token prompts stay as sent unless redacted
                ids = files.encode(text)
            # OpenAI's 16, unless the model's
            default = self._checkpoint_max_tokens(engine, len(ids), req.max_tokens) or 16
            max_tokens = self._token_limit(engine, len(ids), req.max_tokens, default, "prompt")
            prompt_tokens += len(ids)
            jobs += self._jobs(req, alike, len(jobs), ids, text, max_tokens, req.logprobs)
        prep = Prepared(
            "completion", new_id("cmpl"), req.model, engine, jobs, prompt_tokens, sources=sources,
            refused=refused, stream=req.stream, include_usage=req.include_usage,
        )  # fmt: skip
        self._set_cache_key(prep, req)
        return prep

    async def prepare_chat(self, req: ChatRequest) -> Prepared:
        engine = self.engine_for(req.model)
        plan = req.tool_plan()
        tools = list(plan.tools) if plan is not None else None
        if plan is not None and hasattr(engine, "render_chat"):
            raise APIError(400, f"{req.model} is a seq2seq model: it answers the last user turn "
                           "and takes no tools", param="tools")  # fmt: skip
        messages = req.plain_messages()
        refused = False
        for m in messages:
            if m["role"] != "assistant":  # the model's own turns are not the user's prompt
                screened = self._screen_prompt(m["content"])
                refused |= screened is None
                m["content"] = m["content"] if screened is None else screened
        sources = None
        passages = [] if refused else None  # None: no knowledge base (a refusal is not generated)
        if self._use_kb(req.kb) and not refused:
            query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            passages = await self._passages(engine, query) if query else []
            sources = [p.to_dict() for p in passages]
            messages = augment_messages(messages, passages)
        try:
            if hasattr(engine, "render_chat"):  # seq2seq: the user turn (+ its passages)
                text = engine.render_chat(messages, passages=passages)
            else:
                text = engine.files.render_chat(messages, add_generation_prompt=True, tools=tools)
        except InputError as exc:  # a tool call's arguments that are not JSON
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # a template may refuse a conversation (e.g. role order)
            raise APIError(
                400, f"the chat template rejected the messages: {exc}", param="messages"
            ) from None
        ids = engine.files.encode(text)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        default = self._checkpoint_max_tokens(engine, len(ids), req.token_limit)  # None: the room
        max_tokens = self._token_limit(engine, len(ids), req.token_limit, default, "messages")
        kept = plan.kept_special if plan is not None else ()  # auto: the tool-call tags
        prep = Prepared(
            "chat", new_id("chatcmpl"), req.model, engine,
            self._jobs(req, self._alike(req, engine), 0, ids, text, max_tokens, logprobs, kept),
            len(ids),
            messages=messages, sources=sources, refused=refused, stream=req.stream,
            include_usage=req.include_usage, tools=plan,
        )  # fmt: skip
        self._set_cache_key(prep, req)
        return prep

    def _use_kb(self, asked: bool | None) -> bool:
        """Whether a request gets knowledge-base passages: when the server has a knowledge base,
        unless the request's `kb` is false; `kb: true` without one is a 400."""
        if asked and self.state.kb is None:
            raise APIError(
                400, "this server has no knowledge base (start it with --kb)", param="kb"
            )
        return self.state.kb is not None and asked is not False

    async def _passages(self, engine: Any, query: str) -> list[Passage]:
        """The knowledge base's passages for a user turn: as the model's RetrievalSpec finds them
        (its k and score floor) when it was trained with passages, else the top KB_PASSAGES."""
        spec = getattr(engine, "retrieval", None)  # a seq2seq model trained with passages
        if spec is not None:
            return await asyncio.to_thread(spec.search, self.state.kb, query)
        return await asyncio.to_thread(self.state.kb.search, query, KB_PASSAGES)

    def _screen_prompt(self, text: str) -> str | None:
        """The prompt after the safety policy: redacted text, or None when refused."""
        policy = self.state.safety
        if policy is None:
            return text
        verdict = policy.check_prompt(text)
        self.state.metrics.safety.labels("prompt", verdict.action).inc()
        return None if verdict.action == "refuse" else verdict.text

    @staticmethod
    def _token_limit(
        engine: Any, prompt_len: int, asked: int | None, default: int | None, prompt_param: str
    ) -> int:
        """max_tokens, checked against the room the engine leaves after the prompt (the default
        fills it), so a request the engine would refuse is a 400 naming the field."""
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        room = engine.token_room(prompt_len)
        if room < 1:
            raise APIError(
                400,
                f"the {prompt_len}-token prompt leaves no room for an answer in the model's "
                f"context window of {engine.max_context} tokens; shorten it",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if asked is None:
            return min(default or room, room)
        if asked > room:
            raise APIError(
                400,
                f"max_tokens={asked} does not fit: the model's context window of "
                f"{engine.max_context} tokens leaves {room} for an answer to this "
                f"{prompt_len}-token prompt; ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    @staticmethod
    def _checkpoint_max_tokens(engine: Any, prompt_len: int, asked: int | None) -> int | None:
        """The checkpoint's max_tokens (RequestDefaults.max_tokens_for) when the request sets none
        (asked None), a 400 naming max_tokens when its max_length leaves the prompt no room."""
        if asked is not None:
            return None
        try:
            return engine.request_defaults.max_tokens_for(prompt_len)
        except InputError as exc:
            raise APIError(400, str(exc), param="max_tokens") from None

    def _alike(self, req: Any, engine: Any) -> _Alike:
        """What every prompt of the request samples with alike, built once per request."""
        return _Alike(
            engine.request_defaults,
            self._logit_bias(req, engine.files.vocab_size),
            req.guide(engine.files),  # structured output (a 400 when it cannot compile)
        )

    def _jobs(
        self,
        req: Any,
        alike: _Alike,
        start: int,
        ids: list[int],
        text: str,
        max_tokens: int,
        logprobs: int | None,
        keep_special: tuple[str, ...] = (),
    ) -> list[Job]:
        jobs, defaults, bias, guide = [], alike.defaults, alike.bias, alike.guide
        rules = self._min_tokens_rules(req, defaults.rules, max_tokens)
        for i in range(req.n):
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=defaults.pick("temperature", req.temperature, 1.0),
                top_p=defaults.pick("top_p", req.top_p, 1.0),
                top_k=defaults.pick("top_k", req.top_k, 0),
                repetition_penalty=defaults.pick("repetition_penalty", req.repetition_penalty, 1.0),
                rules=rules,
                logit_bias=bias,
                guide=guide,
                stop=tuple(req.stop_list),
                seed=None if req.seed is None else req.seed + i,
                logprobs=logprobs,
                ignore_eos=req.ignore_eos,
                keep_special=keep_special,
                cache_salt=req.cache_salt,
            )
            try:
                params.validate()
            except InputError as exc:
                raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None
            job = Job(start + i, ids, text, params)
            if logprobs is not None:
                job.logprobs = LogprobsBuilder(chat=isinstance(req, ChatRequest))
            jobs.append(job)
        return jobs

    @staticmethod
    def _logit_bias(req: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """The request's logit_bias as (token id, bias) pairs, every id inside the vocabulary."""
        pairs = req.bias_pairs
        if pairs and (big := max(t for t, _ in pairs)) >= vocab_size:
            raise APIError(
                400,
                f"logit_bias names token id {big}, outside the model's vocabulary of "
                f"{vocab_size} ids (0 .. {vocab_size - 1})",
                param="logit_bias",
            )
        return pairs

    @staticmethod
    def _min_tokens_rules(req: Any, rules: LogitsRules, max_tokens: int) -> LogitsRules:
        """The checkpoint's rules with the request's min_tokens as min_new_tokens, when it sets
        one (at most max_tokens, as vLLM checks)."""
        if req.min_tokens is None:
            return rules
        if req.min_tokens > max_tokens:
            raise APIError(
                400,
                f"min_tokens={req.min_tokens} is more than max_tokens={max_tokens}",
                param="min_tokens",
            )
        return replace(rules, min_new_tokens=req.min_tokens)

    def _set_cache_key(self, prep: Prepared, req: Any) -> None:
        if self.state.cache is None or prep.refused or prep.stream:
            return
        model = self.state.model_ids[prep.model]  # name@content hash: new weights, new keys
        key = cache_key(model, prep.jobs[0].prompt_ids, prep.jobs[0].params)
        if key is not None:  # n, several prompts and the kind are part of what is asked too
            plan = prep.tools  # "none" and "auto" share prompt and params, not the answer
            shape = None if plan is None else [plan.mode, plan.name, plan.parallel]
            extra = json.dumps([prep.kind, [j.prompt_ids for j in prep.jobs], prep.sources, shape])
            prep.cache_key = f"{key}:{hashlib.sha256(extra.encode()).hexdigest()[:16]}"
