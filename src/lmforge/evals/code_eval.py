"""The `code` task type: functional correctness, pass@k over sampled programs run against tests.

n samples per problem are drawn through the eval generation path (evals.sample), each (a chat
answer: its first fenced code block) cut at the problem's stop strings, turned into a program
(common.code_problems: HumanEval or MBPP records) and run with its tests in the sandbox
(common.code_exec), several at a time. pass@k is the unbiased estimator of Chen et al. 2021
over the passing counts; a k above n is skipped with a note. Refused unless the task sets code.allow_code_execution.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.common.code_exec import STATUSES, SandboxLimits, require_opt_in, run_jobs
from lmforge.common.code_problems import code_problem, extract_code
from lmforge.config import validate
from lmforge.errors import ConfigError
from lmforge.evals.code_options import CodeTaskOptions
from lmforge.evals.lm import EvalModel, GenerationSettings, cut_at_stop
from lmforge.evals.sample import sample
from lmforge.evals.task_format import TaskResult, TaskSpec, load_examples, task_prompt

OWN_KEYS = ("temperature", "stop", "max_new_tokens")  # set in code:, not in generation:


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), computed as a
    product so large n does not overflow (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def code_sampling(spec: TaskSpec, settings: GenerationSettings) -> GenerationSettings:
    """What a code task samples with, before the checkpoint's defaults (EvalModel.settings_for)
    fill what it leaves unset: the task's (else the stage's) generation settings, with the code
    section's temperature and max_new_tokens; its stop strings cut samples afterwards."""
    opts = spec.code or CodeTaskOptions()
    given = spec.generation or settings
    clash = [k for k in OWN_KEYS if spec.generation and k in spec.generation.model_fields_set]
    if clash:
        raise ConfigError(
            f"task '{spec.name}': set {', '.join(f'code.{k}' for k in clash)} instead of "
            f"generation.{clash[0]} (a code task samples by its code: section)"
        )
    return validate(GenerationSettings, {
        **given.model_dump(exclude_unset=True, exclude={"stop"}),
        "temperature": opts.sampling_temperature(), "max_new_tokens": opts.max_new_tokens,
    }, where=f"task '{spec.name}' generation")  # fmt: skip


def pass_metrics(passed: list[int], n: int, ks: list[int]) -> dict[str, Any]:
    """pass@k averaged over problems for each k <= n, and a note for each k skipped."""
    out: dict[str, Any] = {}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in passed]))
    skipped = [k for k in ks if k > n]
    if skipped:
        out["skipped"] = (f"pass@{', pass@'.join(map(str, skipped))} not computed: needs at "
                          f"least k samples per problem (code.n={n})")  # fmt: skip
    return out


def answer_code(completion: str, stops: Sequence[str], chat: bool) -> str:
    """A sample's program text: a chat answer's first fenced block (else the whole answer), then
    cut at the stop strings (a fence's "```python" line would otherwise be the program)."""
    return cut_at_stop(extract_code(completion) if chat else completion, list(stops))


def require_code_opt_in(spec: TaskSpec) -> None:
    """A ConfigError naming code.allow_code_execution unless the task sets it; a task without a
    code: section (a bare JSONL file) is told how to give one."""
    allowed = spec.code is not None and spec.code.allow_code_execution
    what = f"task '{spec.name}'"
    if spec.code is None:
        what += (
            f" (no code: section; give it as a task YAML {{type: code, data: {spec.data or '...'}, "
            "code: {allow_code_execution: true}})"
        )
    require_opt_in(allowed, what, "code.allow_code_execution")


def run_code(model: EvalModel, spec: TaskSpec, settings: GenerationSettings) -> TaskResult:
    require_code_opt_in(spec)
    opts = spec.code or CodeTaskOptions()
    rows = load_examples(spec)
    problems = [code_problem(r, f"task '{spec.name}' example {i + 1}") for i, r in enumerate(rows)]
    prompts = [
        task_prompt(spec, r) if spec.prompt_template else p.default_prompt()
        for r, p in zip(rows, problems, strict=True)
    ]
    asked_settings = code_sampling(spec, settings)
    gen = model.settings_for(asked_settings)  # recorded as sampled
    checkpoint = model.checkpoint_record(asked_settings, gen)
    chat = bool(spec.chat)
    samples = sample(model, prompts, gen, chat=chat, num_samples=opts.n)
    asked = [p for p in problems for _ in range(opts.n)]  # in the order sample() returns
    completions = [
        answer_code(s["completion"], opts.stop if opts.stop is not None else p.default_stops, chat)
        for s, p in zip(samples, asked, strict=True)
    ]
    jobs = [p.job(c) for p, c in zip(asked, completions, strict=True)]
    results = run_jobs(jobs, SandboxLimits(opts.timeout_s, opts.memory_mb))
    records = [
        {"index": i // opts.n, "sample": s["sample"], "prompt": s["prompt"], "completion": c,
         "status": r.status, "detail": r.reason, "tests_passed": r.tests_passed,
         "tests_total": r.tests_total, "seconds": round(r.seconds, 3)}
        for i, (s, c, r) in enumerate(zip(samples, completions, results, strict=True))
    ]  # fmt: skip
    tallies = [Counter() for _ in problems]  # one pass over the records, not one a problem
    for r in records:
        tallies[r["index"]][r["status"]] += 1
    per_problem = [{"index": i, "passed": counts["passed"], "statuses": dict(counts)}
                   for i, counts in enumerate(tallies)]  # fmt: skip
    statuses = Counter(r["status"] for r in records)
    stop_record = opts.stop if opts.stop is not None else "per record (HumanEval / MBPP stops)"
    metrics: dict[str, Any] = pass_metrics([p["passed"] for p in per_problem], opts.n, opts.ks())
    metrics.update({
        "n": len(problems), "samples_per_problem": opts.n,
        "status_counts": {s: statuses[s] for s in STATUSES}, "per_problem": per_problem,
        "sandbox": {"timeout_s": opts.timeout_s, "memory_mb": opts.memory_mb},
        "generation": {**gen.model_dump(), "chat": chat, "stop": stop_record,
                       "checkpoint": checkpoint},
    })  # fmt: skip
    return TaskResult(metrics, records)
