"""lm-evaluation-harness adapter: any harness task on an lmforge (or local HF) model directory.

Registers the model type "lmforge" with lm_eval, implementing the harness's three request types
on top of EvalModel, so scores mean exactly what they mean for the harness's own models:

- loglikelihood(context, continuation) -> (log p, is greedy);
- loglikelihood_rolling(text) -> log p of the whole text (disjoint max-length windows, as the
  harness does; every token scored once);
- generate_until(context, {until, max_gen_toks, temperature, do_sample}) -> text; requests with
  the same settings run as left-padded batches of --batch_size prompts.

The stock `lm_eval` command only knows the models it ships (lm_eval 0.4 has no plugin entry
point), so run the harness through this module, which registers "lmforge" first and then hands
over to lm_eval's own command line:

    python -m lmforge.evals.harness --model lmforge --model_args pretrained=DIR --tasks TASKS \
        --batch_size 16

From Python: `import lmforge.evals.harness` and then `lm_eval.simple_evaluate(model="lmforge",
model_args="pretrained=DIR", tasks=[...])`. Needs `pip install 'lmforge[eval]'`.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import InputError
from lmforge.evals.lm import GENERATE_BATCH, EvalModel, GenerationSettings
from lmforge.evals.perplexity import score_document

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-evaluation-harness adapter needs lm_eval: pip install 'lmforge[eval]'"
    ) from exc


@register_model("lmforge")
class LmforgeLM(LM):
    """lm_eval's LM interface over an lmforge model directory (model_args: pretrained=DIR)."""

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        max_gen_toks: int = 256,
        batch_size: int | str = GENERATE_BATCH,  # prompts per generation batch ("auto": default)
        **_: Any,
    ) -> None:
        super().__init__()
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval passes cuda by default; fall back like its HF model does
        self.lm = EvalModel.load(pretrained, device=device)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else GENERATE_BATCH

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        # requests sharing a context (the choices of one question) are scored in one batch
        by_context: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_context.setdefault(req.args[0], []).append(i)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for context, indices in by_context.items():
            scores = self.lm.loglikelihoods(context, [requests[i].args[1] for i in indices])
            for i, score in zip(indices, scores, strict=True):
                out[i] = score
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        if self.lm.scorer.scoring != "causal":  # a harness perplexity must be a causal one
            raise InputError(
                f"{self.lm.path}: rolling log-likelihood (the harness's perplexity tasks) is a "
                f"causal LM's; this model scores by {self.lm.scorer.scoring}, use lmforge eval"
            )
        n = self.lm.block_size
        return [-score_document(self.lm, req.args[0], n, n).nll for req in requests]

    def generate_until(self, requests: list[Any]) -> list[str]:
        # requests with the same settings run as batches; stop strings still cut each output
        groups: dict[str, tuple[GenerationSettings, list[int]]] = {}
        for i, req in enumerate(requests):
            settings = self._settings(req.args[1])
            groups.setdefault(settings.model_dump_json(), (settings, []))[1].append(i)
        outputs = [""] * len(requests)
        for settings, indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            texts = self.lm.generate_batch(contexts, settings, batch_size=self.batch_size)
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = text
        return outputs

    def _settings(self, kwargs: dict[str, Any]) -> GenerationSettings:
        until = kwargs.get("until") or []
        return GenerationSettings(
            max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
            stop=[until] if isinstance(until, str) else list(until),
        )


def main() -> None:
    """lm_eval's command line, with the "lmforge" model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
