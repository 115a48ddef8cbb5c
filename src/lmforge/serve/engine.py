"""The serving engine: continuous batching of generation requests on one Transformer.

Requests join and leave the running batch at every decoding step, in a background thread whose
loop, and the steps it orders under one lock, are serve/step_loop.py (StepLoop, Engine's base:
admission, prefill with the prefix cache and chunked prefill, decoding, emission, failures that
stay local). This module is what the server calls: start (the loop's thread, after compiling
the decoding step when asked), attach_adapters (LoRA adapters served on its model, before
start; load_adapter / unload_adapter while running), submit (the prompt checks, the queue's limit; a row's adapter), abort, stats,
shutdown (drain or abort, with a timeout), token_room, and from_dir; torch's thread count is
set once per process (serve/engine_threads.py). Throughput (16 concurrent requests 5.9x one at a
time through the engine, 5.1x generate() one at a time, one thread):
benchmarks/bench_serve_engine.py.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError, InputError
from lmforge.serve.causal_step import warm_up_compiled
from lmforge.serve.engine_threads import configure_threads as _configure_threads
from lmforge.serve.engine_types import EngineClosed, EngineStats, QueueFull
from lmforge.serve.handle import NO_TOKEN, Completion, RequestHandle, TokenEvent, collect
from lmforge.serve.lora_adapters import AdapterNotServed, AdapterUpdate
from lmforge.serve.model_dir import load_served_model
from lmforge.serve.multi_lora import stack_adapters
from lmforge.serve.request_book import Row
from lmforge.serve.request_defaults import NO_DEFAULTS, RequestDefaults
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.scheduler import prefill_groups
from lmforge.serve.step_loop import StepLoop
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import eos_ids, generation_config

# The engine contract in one import (the handle and sampling types live in their own modules).
__all__ = [
    "NO_TOKEN", "Completion", "Engine", "EngineClosed", "EngineStats", "QueueFull",
    "RequestHandle", "SamplingParams", "TokenEvent", "collect", "prefill_groups",
]  # fmt: skip


class Engine(StepLoop):
    """Continuous-batching generation on one model; submit() from any thread."""

    def __init__(
        self,
        model: nn.Module,
        files: TokenizerFiles,
        *,
        name: str,
        max_batch_size: int = 32,
        max_queue: int = 256,
        generation_config: dict[str, Any] | None = None,
        max_prefill_tokens: int = 2048,
        threads: int | None = None,
        compile: str = "off",
        request_defaults: RequestDefaults = NO_DEFAULTS,
        prefix_cache_mb: float = 0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise InputError(
                "max_batch_size and max_prefill_tokens must be >= 1 and max_queue >= 0, got "
                f"{max_batch_size}, {max_prefill_tokens}, {max_queue}"
            )
        _configure_threads(threads)
        super().__init__(
            model,
            files,
            max_batch_size=max_batch_size,
            max_prefill_tokens=max_prefill_tokens,
            compile=compile,
            prefix_cache_mb=prefix_cache_mb,
        )
        self.name = name
        self.max_queue = max_queue
        self.max_context: int = model.config.block_size
        self.vocab_size: int = model.config.vocab_size
        # the request fields a request leaves unset (serve/request_defaults.py; read by from_dir)
        self.request_defaults = request_defaults
        gen = generation_config if generation_config is not None else _default_gen(files)
        self.model_stops = frozenset(eos_ids(gen))
        self._closed = False
        self._thread: threading.Thread | None = None
        self._lora_change = threading.Lock()  # held by a runtime adapter load or unload
        self._lora_keys: dict[str, str] = {}  # adapter name -> name@digest (its cache blocks')
        self._unloading: set[str] = set()

    @classmethod
    def from_dir(
        cls,
        model_dir: Path | str,
        *,
        name: str | None = None,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        checkpoint_defaults: bool = True,
        **kw: Any,
    ) -> Engine:
        """An engine for a model directory (lmforge export or HF checkpoint), not yet started;
        device and dtype as serve/model_dir.py resolves them. checkpoint_defaults: the
        checkpoint's generation_config fills the fields a request leaves unset (vLLM's
        --generation-config auto); False keeps the server's own defaults (none)."""
        served = load_served_model(
            model_dir, name=name, device=device, dtype=dtype, request_defaults=checkpoint_defaults
        )
        return cls(
            served.model,
            served.files,
            name=served.name,
            generation_config=served.generation_config,
            request_defaults=served.request_defaults,
            **kw,
        )

    # -- the API the server calls -----------------------------------------------------------

    def start(self) -> None:
        """Starts the step loop in a background (daemon) thread. With compiled_decode the
        decoding step compiles first, outside the lock (tens of seconds): submit() queues,
        stats() and shutdown() answer meanwhile."""
        if not self._startable():
            return
        if self.compiled_decode:
            try:
                warm_up_compiled(self.model, self.device)
            except Exception as exc:
                raise ConfigError(
                    f"engine {self.name!r}: compiling the decoding step failed; serve with "
                    f"compile off (--compile off) or mend the cause: {exc}"
                ) from exc
        with self._lock:
            if not self._startable():  # shut down, or started elsewhere, while compiling
                return
            self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}")
            self._thread.daemon = True
            self._thread.start()

    def _startable(self) -> bool:
        """Whether start() has a loop to start: False once started; EngineClosed once shut."""
        with self._lock:
            if self._closed:
                raise EngineClosed(f"engine {self.name!r} is shut down; create a new one")
            return self._thread is None

    def attach_adapters(self, adapters: Sequence[AdapterUpdate]) -> None:
        """Serves these LoRA adapters on this engine's model (serve/multi_lora.py), before
        start(); a request picks one by name (submit's adapter)."""
        self._refuse_compiled_decode()
        if self._thread is not None:
            raise ConfigError(f"engine {self.name!r} is running: attach adapters before start()")
        self._lora_keys = {a.name: a.key for a in adapters}
        self._change_adapters({a.name: a.updates for a in adapters})

    def load_adapter(self, adapter: AdapterUpdate) -> None:
        """Serves one more LoRA adapter while running (vLLM's runtime loading): its stacks are
        built beside the model, then installed by the loop between two steps."""
        self._refuse_compiled_decode()
        with self._lora_change:  # one change at a time, each from the set the last one left
            with self._lock:
                if adapter.name in self._lora:
                    raise InputError(f"engine {self.name!r} already serves {adapter.name!r}")
            self._lora_keys[adapter.name] = adapter.key  # before its first request can come
            try:
                self._change_adapters({**self._lora, adapter.name: adapter.updates})
            except BaseException:
                self._lora_keys.pop(adapter.name, None)
                raise

    def unload_adapter(self, name: str) -> None:
        """Stops serving a LoRA adapter; refused while requests of it wait or run."""
        with self._lora_change:
            with self._lock:
                if name not in self._lora:
                    raise InputError(f"engine {self.name!r} serves no LoRA adapter {name!r}")
                busy = sum(r.adapter == name for r in (*self._book.waiting,
                                                       *self._book.active.values()))  # fmt: skip
                if busy:
                    raise InputError(f"LoRA adapter {name!r} has {busy} requests waiting or "
                                     "running; unload it once they finish")  # fmt: skip
                self._unloading.add(name)  # submit refuses it from now on
            try:
                self._change_adapters({k: v for k, v in self._lora.items() if k != name})
                self._lora_keys.pop(name, None)
            finally:
                with self._lock:
                    self._unloading.discard(name)

    def _refuse_compiled_decode(self) -> None:
        """ConfigError when this engine compiles its decoding step: adapters run outside it.
        Called first by attach_adapters and load_adapter, before either changes anything
        (_change_adapters, which both reach, comes after their own bookkeeping)."""
        if self.compiled_decode:
            raise ConfigError(
                f"engine {self.name!r}: LoRA adapters run outside the compiled decoding step; "
                "serve them with --compile off"
            )

    def _change_adapters(self, updates: dict) -> None:
        """Builds the stacks of exactly these adapters and waits until the loop installed them
        (installs them itself, at once, when no loop runs). What the engine keeps of them
        (_lora) is views into the stacks: no second copy."""
        slots, stacks, views = stack_adapters(self.model, updates)
        done = threading.Event()
        with self._lock:
            self._lora_pending = (views, slots, stacks, done)
            if self._thread is None:  # not started: nothing runs the model, install now
                self._install_adapters()
            self._lock.notify_all()
        while not done.wait(0.5):
            if self._thread is None or not self._thread.is_alive():
                with self._lock:
                    self._install_adapters()

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        adapter: str | None = None,
    ) -> RequestHandle:
        """Queues a request (with `adapter`: one of its attached LoRA adapters, by name); its
        events arrive on the returned handle."""
        params.validate()
        prompt = list(prompt_ids)
        self._check_prompt(prompt, params)
        stops = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.model_stops
        )
        handle = RequestHandle(request_id, len(prompt))
        with self._lock:
            if self._closed:
                raise EngineClosed(f"engine {self.name!r} is shutting down; no new requests")
            if adapter is not None and (adapter not in self._lora or adapter in self._unloading):
                raise AdapterNotServed(f"engine {self.name!r} serves no LoRA adapter {adapter!r}")
            if len(self._book.waiting) >= self.max_queue:
                raise QueueFull(
                    f"engine {self.name!r}: {len(self._book.waiting)} requests already waiting "
                    f"(max_queue {self.max_queue}); retry later"
                )
            self._book.queue(Row(handle, prompt, params, stops, adapter,
                                 self._lora_keys.get(adapter)))  # fmt: skip
            self._lock.notify_all()
        return handle

    def abort(self, request_id: str) -> None:
        """Ends a request (finish_reason "abort"): at once if waiting, else at the next step."""
        with self._lock:
            if self._book.abort(request_id):
                self._lock.notify_all()

    def stats(self) -> EngineStats:
        with self._lock:
            tokens, capacity = self._cache_usage()
            return EngineStats(
                queue_depth=len(self._book.waiting),
                running=len(self._running),
                max_batch_size=self.max_batch_size,
                cache_tokens=tokens,
                cache_capacity=capacity,
                prefix=self._prefix.stats(),
                **self._counts,
            )

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuses new requests; drain=True finishes the in-flight ones first, else aborts them.

        With a timeout, requests still unfinished when it expires are aborted.
        """
        with self._lock:
            self._closed = True
            self._stopping = True
            if not drain or self._thread is None:
                self._book.abort_all()
            self._lock.notify_all()
            thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._lock:
                self._book.abort_all()
                self._lock.notify_all()
            thread.join()

    # -- the prompt checks submit runs --------------------------------------------------------

    def _check_ids(self, prompt: list[int]) -> None:
        if not prompt:
            raise InputError("prompt is empty: give at least one token")
        if not all(type(t) is int and 0 <= t < self.vocab_size for t in prompt):
            raise InputError(f"prompt token ids must be ints in [0, {self.vocab_size})")

    def token_room(self, prompt_len: int) -> int:
        """The most tokens an answer to a prompt of `prompt_len` tokens can have: what the
        context leaves after the prompt (negative when the prompt alone does not fit). The one
        rule behind submit's check and the server's max_tokens default and 400."""
        return self.max_context - prompt_len

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        self._check_ids(prompt)
        if params.max_tokens > self.token_room(len(prompt)):
            raise InputError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens; shorten the prompt or lower "
                "max_tokens"
            )


def _default_gen(files: TokenizerFiles) -> dict[str, Any]:
    """The stop set lmforge writes for a model with this tokenizer (no generation_config given)."""
    return generation_config(files)
