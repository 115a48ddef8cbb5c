"""ServeState, what one server process shares between its routes, and its start-up and shutdown:
the stores the settings ask for, and the engines (all started, or none left running).

Per model directory (serve/model_dir.model_tasks): a decoder gets a generation Engine and an
Embedder sharing its module; an encoder an Embedder only (an embedding model); an
encoder-decoder a Seq2SeqEngine only."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, InputError
from lmforge.serve.cache import ResponseCache, model_identity
from lmforge.serve.embeddings import Embedder, embedder_settings
from lmforge.serve.engine import Engine
from lmforge.serve.feedback import FeedbackStore
from lmforge.serve.lora_adapters import AdapterUpdate, adapter_base, read_adapter
from lmforge.serve.lora_engine import AdapterEngine
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.model_dir import load_served_model, model_tasks
from lmforge.serve.retrieval import KnowledgeBase
from lmforge.serve.safety import SafetyPolicy
from lmforge.serve.seq2seq_engine import engine_class
from lmforge.serve.settings import LoraSpec, ServeSettings

log = logging.getLogger(__name__)


@dataclass
class ServeState:
    """What the routes share: the engines and embedders by model name, the optional stores."""

    settings: ServeSettings
    metrics: ServerMetrics
    engines: dict[str, Any] = field(default_factory=dict)  # generation, by model name
    adapters: dict[str, AdapterEngine] = field(default_factory=dict)  # LoRA adapters, by name
    embedders: dict[str, Embedder] = field(default_factory=dict)  # /v1/embeddings, by name
    model_ids: dict[str, str] = field(default_factory=dict)  # name -> name@content hash
    created: dict[str, int] = field(default_factory=dict)
    cache: Any = None
    safety: Any = None
    kb: Any = None
    feedback: Any = None
    ready: bool = False
    lora_change: threading.Lock = field(default_factory=threading.Lock, repr=False)  # runtime

    def max_context(self) -> dict[str, int]:
        """Every served model's context length, by name (generation or embeddings), in the
        order the settings list them (/v1/models' order: the chat page's and serve bench's
        default is the first that generates)."""
        adapters = dict(self.adapters)  # one snapshot: a runtime load may add one meanwhile
        served = {**self.embedders, **self.engines, **adapters}
        names = [spec.name for spec in [*self.settings.models, *self.settings.loras]
                 if spec.name in served]  # fmt: skip
        names += [name for name in adapters if name not in names]  # loaded at runtime
        return {name: served[name].max_context for name in names}

    def tasks(self, name: str) -> list[str]:
        """What model `name` serves, as vLLM names its tasks: "generate" (completions and chat),
        "embed" (/v1/embeddings). /v1/models lists it (a field OpenAI clients ignore) so the
        chat page offers only the models that generate."""
        if name in self.adapters:
            return ["generate"]
        return [task for task, served in (("generate", self.engines), ("embed", self.embedders))
                if name in served]  # fmt: skip

    def lineage(self, name: str) -> dict[str, str | None]:
        """/v1/models' `root` (the directory served) and `parent` (an adapter's base), as vLLM
        lists LoRA adapters."""
        adapter = self.adapters.get(name)
        if adapter is not None:
            return {"root": str(adapter.path), "parent": adapter.base.name}
        paths = {spec.name: str(spec.path) for spec in self.settings.models}
        return {"root": paths.get(name), "parent": None}


def open_stores(state: ServeState) -> None:
    """The response cache, safety policy, knowledge base and feedback store the settings ask for."""
    s = state.settings
    if s.cache_entries:
        state.cache = ResponseCache(max_entries=s.cache_entries)
    if s.safety is not None:
        state.safety = SafetyPolicy.from_file(s.safety)
    if s.kb is not None and state.kb is None:  # not passed in by serve(): build it, or with
        # several workers open the index serve() built before starting them
        state.kb = KnowledgeBase.open(s.kb_path()) if s.workers > 1 else open_knowledge_base(s)
    state.feedback = FeedbackStore(s.feedback_path())


def open_knowledge_base(settings: ServeSettings) -> Any:
    """Builds (incrementally: unchanged files are skipped) or opens the --kb index."""
    return KnowledgeBase.build(settings.kb, settings.kb_path())


def start_engines(state: ServeState) -> None:
    """Loads and starts an engine per served model. If one fails to load or start, the engines
    already started are stopped (their requests aborted) before the error goes on: a server
    that fails at start-up leaves no decoding threads behind."""
    try:
        plan = adapter_plan(state.settings)
        for spec in state.settings.models:
            _start_engine(state, spec, plan.get(spec.name, []))
    except BaseException:
        if state.engines or state.embedders:
            log.info("stopping the %d engine(s) and %d embedder(s) already started",
                     len(state.engines), len(state.embedders))  # fmt: skip
        for engine in (*state.engines.values(), *state.embedders.values()):
            engine.shutdown(drain=False)
        state.engines.clear()
        state.adapters.clear()
        state.embedders.clear()
        state.model_ids.clear()
        state.created.clear()
        raise


def adapter_plan(settings: ServeSettings) -> dict[str, list[LoraSpec]]:
    """The LoRA adapters to attach, by the name of the base they attach to (lora_adapters)."""
    if not settings.loras:
        return {}
    bases = {m.name: m.path for m in settings.models if model_tasks(m.path).generate}
    plan: dict[str, list[LoraSpec]] = {}
    for lora in settings.loras:
        base = adapter_base(lora.name, lora.path, lora.base_model_name, bases)
        plan.setdefault(base, []).append(lora)
    return plan


def _start_engine(state: ServeState, spec: Any, loras: list[LoraSpec]) -> None:
    s = state.settings
    tasks = model_tasks(spec.path)
    state.model_ids[spec.name] = model_identity(spec.name, spec.path)
    if tasks.generate:
        engine = engine_class(spec.path).from_dir(
            spec.path, name=spec.name, device=s.device,
            max_batch_size=s.max_batch_size, max_queue=s.max_queue, threads=s.torch_threads(),
            compile="off" if (loras or s.runtime_lora_updating) and s.compile == "auto"
            else s.compile,  # adapters run outside the compiled step
            checkpoint_defaults=s.generation_config == "auto", prefix_cache_mb=s.prefix_cache_mb,
        )  # fmt: skip
        state.engines[spec.name] = engine  # stopped with the others if its adapters fail
        if loras:
            _attach_loras(state, engine, loras)
        engine.start()
        model, files = engine.model, engine.files  # an embedder shares them
    else:
        served = load_served_model(spec.path, name=spec.name, device=s.device,
                                   request_defaults=False)  # fmt: skip
        model, files = served.model, served.files
    if tasks.embed:
        embedder = Embedder(model, files, name=spec.name, **embedder_settings(s, spec.path))
        embedder.start()
        state.embedders[spec.name] = embedder
    state.created[spec.name] = int(time.time())
    what = " + ".join(k for k, on in (("generation", tasks.generate), ("embeddings", tasks.embed))
                      if on)  # fmt: skip
    log.info("serving %s from %s (%s, context %d)", spec.name, spec.path, what,
             state.max_context()[spec.name])  # fmt: skip


def _attach_loras(state: ServeState, engine: Any, loras: list[LoraSpec]) -> None:
    """Reads the adapters against the engine's model and serves each under its name."""
    if type(engine) is not Engine:
        raise ConfigError(f"LoRA adapter {loras[0].name!r}: its base {engine.name!r} is an "
                          "encoder-decoder; adapters are served on decoder-only bases")  # fmt: skip
    updates = [read_adapter(engine.model, lora.name, lora.path) for lora in loras]
    engine.attach_adapters(updates)
    for update in updates:
        _serve_adapter(state, engine, update)


def _serve_adapter(state: ServeState, engine: Engine, update: AdapterUpdate) -> None:
    """Routes requests for the adapter's name to it, on its base's engine."""
    # the response cache's key: the weights read (name@digest, not the directory hashed again,
    # which may have changed since) and the base's
    state.model_ids[update.name] = f"{update.key}+{state.model_ids[engine.name]}"
    state.created[update.name] = int(time.time())
    state.adapters[update.name] = AdapterEngine(engine, update)
    log.info("serving LoRA adapter %s from %s on %s", update.name, update.path, engine.name)


def load_adapter(state: ServeState, name: str, path: Path, base: str | None) -> None:
    """(runtime, --allow-runtime-lora-updating) Reads one more adapter and serves it. Loads and
    unloads run one at a time: two loads of one name on two bases would both pass the check."""
    with state.lora_change:
        if name in state.max_context():
            raise InputError(f"the name {name!r} is served already; unload it first or pick "
                             "another")  # fmt: skip
        bases = {spec.name: spec.path for spec in state.settings.models
                 if type(state.engines.get(spec.name)) is Engine}  # fmt: skip
        engine = state.engines[adapter_base(name, path, base, bases)]
        update = read_adapter(engine.model, name, path)
        engine.load_adapter(update)
        _serve_adapter(state, engine, update)


def unload_adapter(state: ServeState, name: str) -> None:
    """(runtime) Stops serving an adapter (refused while its requests wait or run). Its
    model_ids entry stays: a request that resolved the name just before may still read it (a
    later load of the name overwrites it)."""
    with state.lora_change:
        adapter = state.adapters.get(name)
        if adapter is None:
            raise KeyError(name)
        adapter.base.unload_adapter(name)
        del state.adapters[name]
        state.created.pop(name, None)
    log.info("unloaded LoRA adapter %s", name)


def stop_engines(state: ServeState) -> None:
    """Drain: finish what is running (up to the graceful timeout), then stop. Every engine and
    embedder drains at once, one thread each, so shutdown takes one timeout, not one per engine
    (a decoder's engine and its embedder drain side by side)."""
    timeout = state.settings.graceful_timeout_s
    engines = [*state.engines.values(), *state.embedders.values()]
    if not engines:
        return
    with ThreadPoolExecutor(len(engines), thread_name_prefix="drain") as pool:
        drains = [pool.submit(e.shutdown, drain=True, timeout=timeout) for e in engines]
    for drain in drains:  # all have drained (or failed): the first failure goes on
        drain.result()
