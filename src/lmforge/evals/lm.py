"""A model directory as something evaluations can ask questions of.

Every evaluation (perplexity, generation, classification, multiple choice, the lm-evaluation-harness
adapter) needs the same four operations on a model directory in Hugging Face layout: encode text,
score tokens given a context, generate a continuation, decode. `EvalModel` provides exactly those,
so task code never touches tensors or tokenizer internals. What scoring and generation mean is
the family's: EvalModel hands them to the scorer config.json selects (evals.scoring: causal LM,
masked-LM encoder, encoder-decoder), and trained heads to evals.heads. Special tokens come from
config.json (bos_token_id / eos_token_id) or, failing that, the tokenizer files
(lmforge.tokenizer.files); generation stops where transformers' would, at
generation_config.json's eos_token_id (lmforge.tokenizer.generation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, NonNegativeInt, model_validator

from lmforge.artifacts import require_artifact
from lmforge.config import HASHED_IF_SET, Section, validate
from lmforge.constrain import ConstraintError, compiler_for, spec_text
from lmforge.constrain.rows import GuidedRow
from lmforge.errors import ConfigError, InputError
from lmforge.evals.scoring import Scorer, scorer_for
from lmforge.model.compiled_decode import DecodeCompile, compile_field
from lmforge.model.generation_defaults import (
    checkpoint_generation_keys,
    eval_leaves_out,
    read_generation_defaults,
    unapplied_keys,
    warn_not_applied,
)
from lmforge.model.logits_rules import LogitsRules
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import eos_ids, load_generation_config

if TYPE_CHECKING:
    from lmforge.evals.heads import SequenceHead

log = logging.getLogger(__name__)

GENERATE_BATCH = 16  # prompts per batch when generating
# transformers sets min_length = min_new_tokens + the input length when min_new_tokens is set
MIN_LENGTH_KEYS = {"min_length", "min_new_tokens"}
# the settings that constrain answers (constrain.GRAMMARS kinds), with their generate flags
OUTPUT_CONSTRAINTS = {"json_schema": "--json-schema", "regex": "--regex", "choice": "--choice"}
MODEL_HINT = "lmforge pretrain --tokens DIR --tokenizer DIR --out DIR (then use OUT/final)"


class GenerationSettings(Section):
    """How continuations are produced; recorded next to every generation metric."""

    max_new_tokens: int = Field(64, ge=1, description="most tokens generated per prompt")
    max_length: int | None = Field(
        None, ge=2, description="most tokens in all, the prompt (an encoder-decoder: the decoder "
        "start) included, as transformers' max_length; applies only when max_new_tokens is not "
        "set (given or the checkpoint's)", json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the default), else sampling")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    repetition_penalty: float = Field(1.0, gt=0, description="1 = off")
    compile: DecodeCompile = compile_field()
    stop: list[str] = Field(
        default_factory=list, description="cut the output at the first of these strings"
    )
    seed: int = Field(0, description="sampling seed (ignored when greedy)")
    num_beams: int = Field(
        1, ge=1, description="beam search width (1 = greedy or sampling; beams need temperature 0)",
        json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    length_penalty: float = Field(
        1.0, description="beams: an answer scores sum(log p) / length ** this (> 0 favours long); "
        "refused without beams",
        json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    early_stopping: bool | Literal["never"] = Field(
        False, description="beams: false = until num_beams are finished and the best running "
        "beam, scored at its length so far, cannot beat them (HF's default; with length_penalty "
        "> 0 it still might later), true = at num_beams finished, never = exhaustive; refused "
        "without beams",
        json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip

    no_repeat_ngram_size: int = Field(
        0, ge=0, description="never repeat an n-gram of this size (0 = off)",
        json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    min_length: int = Field(
        0, ge=0, description="no stop token before the sequence (prompt or decoder start "
        "included) has this many tokens (0 = off)", json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    min_new_tokens: int = Field(
        0, ge=0, description="no stop token before this many new tokens (0 = off)",
        json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    forced_bos_token_id: int | None = Field(
        None, ge=0, description="the token after a one-token start (an encoder-decoder's "
        "decoder start) is always this id",
        json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    forced_eos_token_id: NonNegativeInt | list[NonNegativeInt] | None = Field(
        None, description="the last token a length limit allows is always this id (or one of "
        "these)", json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip

    json_schema: dict[str, Any] | None = Field(
        None, description="answers are JSON this schema validates (serve's JSON-schema subset; "
        "--json-schema); causal models, no beams", json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    regex: str | None = Field(
        None, description="answers fullmatch this regular expression (serve's regex subset; "
        "--regex)", json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    choice: list[str] | None = Field(
        None, min_length=1, description="each answer is exactly one of these strings (--choice)",
        json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_output_constraint(self) -> GenerationSettings:
        given = [k for k in OUTPUT_CONSTRAINTS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"{', '.join(given)}: only one output constraint at a time "
                f"({', '.join(OUTPUT_CONSTRAINTS.values())}); give one"
            )
        if given and self.num_beams > 1:
            raise ValueError(
                f"{given[0]} ({OUTPUT_CONSTRAINTS[given[0]]}) with num_beams={self.num_beams}: "
                "beam search does not follow output constraints; drop --num-beams"
            )
        return self

    def output_constraint(self) -> tuple[str, str] | None:
        """(kind, spec text) of the constraint on the answers (constrain.GuideCompiler), if any."""
        for key in OUTPUT_CONSTRAINTS:
            if (value := getattr(self, key)) is not None:
                return key, spec_text(key, value)
        return None

    @model_validator(mode="after")
    def _beams_do_not_sample(self) -> GenerationSettings:
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError(
                f"num_beams={self.num_beams} with temperature {self.temperature}: beam search "
                "does not sample; set temperature 0 for beams, or num_beams 1 to sample"
            )
        return self

    def length_limit(self) -> int | None:
        """max_length when it applies: a max_new_tokens set (given or the checkpoint's, as
        settings_for merges them) wins over it, as in transformers."""
        return None if "max_new_tokens" in self.model_fields_set else self.max_length

    def logits_rules(self) -> LogitsRules:
        """The n-gram, minimum-length and forced-token rules every decoding step applies."""
        return LogitsRules.from_keys(self.model_dump())


class EvalModel:
    """A loaded model and its tokenizer, with the scoring and generation evals need; scoring and
    generation are the family's (self.scorer, chosen from config.json by evals.scoring)."""

    def __init__(
        self,
        name: str,
        path: Path,
        model: torch.nn.Module,
        files: TokenizerFiles,
        *,
        checkpoint_max_length: bool = True,
    ) -> None:
        self.name = name
        self.path = Path(path)
        self.model = model.eval()
        self.files = files
        self.tokenizer = files.tokenizer
        from lmforge.model.convert import read_config

        hf = read_config(self.path)
        eos = hf.get("eos_token_id")
        eos = (eos[0] if eos else None) if isinstance(eos, list) else eos
        bos = hf.get("bos_token_id")
        self.bos_id: int | None = bos if bos is not None else files.bos_id
        self.eos_id: int | None = eos if eos is not None else files.eos_id
        pad = hf.get("pad_token_id")
        self.pad_id: int = pad if pad is not None else files.pad_id
        self.decoder_start_id: int | None = hf.get("decoder_start_token_id")  # encoder-decoders
        self.block_size: int = model.config.block_size
        self.device = next(model.parameters()).device
        self.chat_template = files.chat_template
        self.generation_config = load_generation_config(self.path, files)
        self._head: SequenceHead | bool | None = False  # False: not loaded
        self.scorer: Scorer = scorer_for(self, hf)
        # what transformers would decode with unasked: the checkpoint's generation_config
        self.generation_defaults = read_generation_defaults(
            self.path, self.scorer.kind == "seq2seq"
        )
        # the eval stage (checkpoint_max_length=False) leaves a decoder's max_length out
        self.left_out = {} if checkpoint_max_length else eval_leaves_out(self.generation_defaults)
        self.sets_max_new_tokens = "max_new_tokens" in checkpoint_generation_keys(self.path)
        warn_not_applied(self.path)

    @classmethod
    def load(
        cls,
        path: Path | str,
        name: str | None = None,
        device: str = "cpu",
        quantized: str = "keep",
        checkpoint_max_length: bool = True,
    ) -> EvalModel:
        """Loads model + tokenizer from a directory written by lmforge or save_pretrained
        (a quantized one kept quantized unless quantized="dequantize": load_pretrained);
        checkpoint_max_length=False: a decoder's max_length in its generation_config is not
        applied but recorded as ignored (the eval stage: generation_defaults.eval_leaves_out)."""
        from lmforge.model.convert import load_pretrained, model_display_name, resolve_model_dir

        model_dir = resolve_model_dir(Path(path))
        require_artifact(model_dir, ["config.json", "tokenizer.json"], hint=MODEL_HINT)
        tok = TokenizerFiles.load(model_dir)
        model = load_pretrained(model_dir, device=device, quantized=quantized)
        return cls(
            name or model_display_name(model_dir), model_dir, model, tok,
            checkpoint_max_length=checkpoint_max_length,
        )  # fmt: skip

    # -- text <-> ids --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens (callers add the ones they need)."""
        return self.files.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.files.decode(ids)

    @property
    def prefix_id(self) -> int | None:
        """The token that starts a document (BOS, else EOS as GPT-2 does), if the vocab has one."""
        return self.bos_id if self.bos_id is not None else self.eos_id

    def num_params(self) -> int:
        """Parameters, the weights a quantized model keeps as codes included."""
        from lmforge.model.quant import quantized_numel

        return sum(p.numel() for p in self.model.parameters()) + quantized_numel(self.model)

    def stop_ids(self) -> list[int]:
        """Tokens that end a generation: generation_config.json's eos_token_id (the document end
        and the chat template's end of turn), the list transformers' generate() stops at."""
        return eos_ids(self.generation_config)

    def render_chat(self, user_text: str) -> str:
        """user_text as one user turn plus the assistant prompt, with the model's chat template."""
        return self.files.render_chat(
            [{"role": "user", "content": user_text}], add_generation_prompt=True
        )

    # -- trained heads -------------------------------------------------------------------------

    @property
    def head(self) -> SequenceHead | None:
        """The directory's sequence-classification head, if any (evals.heads)."""
        if self._head is False:
            from lmforge.evals.heads import load_sequence_head

            self._head = load_sequence_head(self)
        return self._head

    def classify(self, text: str, pair: str | None = None) -> list[float]:
        """Log-probabilities of each head label for text (and its pair's second text), pooled
        as the head was trained."""
        if self.head is None:
            raise InputError(
                f"{self.path} has no classification head (no score.weight / classifier + "
                "id2label in config.json, no intent_head.safetensors); train one with "
                "`lmforge finetune --task classify`"
            )
        return self.head.log_probs(self, text, pair)

    # -- scoring (the family's scorer: evals.scoring) --------------------------------------------

    def start(self, text: str) -> list[int]:
        """Ids of text as the start of a document: the prefix token first when there is one."""
        ids = self.encode(text)
        return [self.prefix_id, *ids] if self.prefix_id is not None else ids

    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is it the greedy one) per continuation, batched.

        A causal LM reads the context as a document start and drops context tokens from the left
        when the two exceed the window (as lm-evaluation-harness); an encoder-decoder reads the
        context as its source and scores the continuation then eos; an encoder scores the
        continuation's tokens by pseudo-log-likelihood (scorer.scoring says which).
        """
        return self.scorer.loglikelihoods(context, continuations)

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """loglikelihoods() for one continuation."""
        return self.loglikelihoods(context, [continuation])[0]

    # -- generation ----------------------------------------------------------------------------

    def settings_for(self, settings: GenerationSettings) -> GenerationSettings:
        """settings with the checkpoint's generation defaults where settings leave a field unset
        (a value given explicitly wins, even when it equals the default). A checkpoint's
        num_beams is not used when the settings ask to sample (temperature > 0) or constrain the
        answers (json_schema, regex, choice). As in
        transformers, min_new_tokens replaces min_length: a checkpoint's min_new_tokens drops its
        min_length, a minimum the settings give (either key) drops both of the checkpoint's, and
        settings giving both keep min_new_tokens alone (transformers warns and does the same);
        max_new_tokens (given, else the checkpoint's) wins over max_length (given, else the
        checkpoint's; an encoder-decoder's becomes max_new_tokens when read). The result's
        fields_set holds what was given or taken from the checkpoint (length_limit reads it)."""
        defaults = dict(self.generation_defaults)
        if settings.temperature > 0 or settings.output_constraint() is not None:
            defaults.pop("num_beams", None)  # beams neither sample nor follow a constraint
        given = settings.model_dump(exclude_unset=True)
        if given.keys() & MIN_LENGTH_KEYS:
            defaults = {k: v for k, v in defaults.items() if k not in MIN_LENGTH_KEYS}
        elif "min_new_tokens" in defaults:
            defaults.pop("min_length", None)
        if "max_length" in given and not self.sets_max_new_tokens:
            defaults.pop("max_new_tokens", None)  # the checkpoint's max_length, given anew
        if "min_new_tokens" in given and given.get("min_length"):
            log.warning(
                "min_new_tokens (%d) and min_length (%d) are both set: min_new_tokens applies "
                "alone, as in transformers", given["min_new_tokens"], given["min_length"],
            )  # fmt: skip
            given["min_length"] = 0
        if defaults.keys() - given.keys() or given.get("min_length", 0) != settings.min_length:
            where = f"{self.path}'s generation defaults"
            settings = validate(GenerationSettings, {**defaults, **given}, where)
        refuse_beam_options_without_beams(settings, given, self.generation_defaults)
        return settings

    def checkpoint_record(
        self,
        settings: GenerationSettings,
        resolved: GenerationSettings,
        *,
        sampling_applied: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """What decoding with settings takes from the checkpoint: "used", the fields settings_for
        filled from it in resolved (the caller's settings_for(settings): resolving again would
        repeat its warnings), and "ignored", its keys left out (generation_defaults.
        unapplied_keys: its do_sample and sampling keys too unless sampling_applied, as `lmforge
        generate` does; and the eval stage's self.left_out). Recorded beside generation metrics
        and printed by `lmforge generate`."""
        taken = resolved.model_fields_set - settings.model_fields_set
        ignored = unapplied_keys(self.path, sampling_applied=sampling_applied) | self.left_out
        return {"used": {k: getattr(resolved, k) for k in sorted(taken)}, "ignored": ignored}

    def generate(self, prompt: str, settings: GenerationSettings, chat: bool = False) -> str:
        """The model's continuation of prompt: generate_batch() for one prompt."""
        return self.generate_batch([prompt], settings, chat=chat)[0]

    def generate_batch(
        self,
        prompts: list[str],
        settings: GenerationSettings,
        chat: bool = False,
        batch_size: int = GENERATE_BATCH,
    ) -> list[str]:
        """Each prompt's continuation (text only, cut at the first stop string), in order.

        chat=True renders each prompt as a user turn with the chat template (as fine-tuning did,
        so no prefix token is added) and stops at the end-of-turn token; an encoder-decoder reads
        the prompt as its source. Prompts run batch_size at a time: greedy outputs equal one
        prompt at a time; sampled prompt i draws from its own generator seeded by
        (settings.seed, i), so the batch size does not change what is sampled.
        """
        settings = self.settings_for(settings)
        if settings.output_constraint() is not None and self.scorer.kind != "causal":
            raise ConfigError(
                f"{self.path} is a {self.scorer.kind} model: output constraints (json_schema, "
                "regex, choice) guide causal models' generation only; drop them"
            )
        new = self.scorer.generate(prompts, settings, chat, batch_size)
        return [cut_at_stop(self.decode(ids), settings.stop) for ids in new]

    def row_constraint(self, settings: GenerationSettings) -> Callable[[], GuidedRow] | None:
        """What builds each answer's guide under settings' output constraint (None: none),
        compiled over this tokenizer once; a constraint that does not compile is an InputError
        naming its setting."""
        asked = settings.output_constraint()
        if asked is None:
            return None
        kind, spec = asked
        try:
            guide = compiler_for(self.files).compile(kind, spec)
        except ConstraintError as err:
            raise InputError(f"{kind} ({OUTPUT_CONSTRAINTS[kind]}): {err}") from err
        stops = self.stop_ids()
        return lambda: GuidedRow(guide, stops)


# options only beam search reads, with the value that changes nothing
BEAM_ONLY = {"length_penalty": 1.0, "early_stopping": False}


def refuse_beam_options_without_beams(
    settings: GenerationSettings, given: dict[str, Any], checkpoint: dict[str, Any]
) -> None:
    """A ConfigError when the user gave a beam-only option (BEAM_ONLY) that the resolved decoding
    (num_beams 1) would silently ignore. transformers' generate() only warns, but its
    GenerationConfig refuses to be saved with one (validate(strict=True)); lmforge's settings are
    recorded beside every output, so they are refused here. A checkpoint's own length_penalty
    under num_beams 1 given by the user is left alone (transformers does not warn either), so
    is the same value given again (settings settings_for already resolved)."""
    if settings.num_beams > 1:
        return
    for key, inert in BEAM_ONLY.items():
        if key in given and given[key] not in (inert, checkpoint.get(key, inert)):
            raise ConfigError(
                f"{key}={given[key]} applies to beam search only, and this decoding has "
                "num_beams 1, so it would be ignored; ask for beams (num_beams > 1, "
                f"--num-beams on the command line) or leave {key} unset"
            )


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to (not including) the earliest stop string."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def nll_to_ppl(total_nll: float, n_tokens: int) -> float:
    """exp(mean NLL), guarded against overflow for untrained models."""
    return math.exp(min(total_nll / max(n_tokens, 1), 700.0))
