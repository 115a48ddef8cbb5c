"""A model directory as something evaluations can ask questions of.

Every evaluation (perplexity, generation, classification, multiple choice, the lm-evaluation-harness
adapter) needs the same four operations on a model directory in Hugging Face layout: encode text,
score tokens given a context, generate a continuation, decode. `EvalModel` provides exactly those,
so task code never touches tensors or tokenizer internals. Special tokens come from config.json
(bos_token_id / eos_token_id) or, failing that, the tokenizer files (lmforge.tokenizer.files);
generation stops where transformers' would, at generation_config.json's eos_token_id
(lmforge.tokenizer.generation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import Field

from lmforge.artifacts import require_artifact
from lmforge.config import Section
from lmforge.errors import InputError
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import eos_ids, load_generation_config

SCORE_BATCH = 16  # rows per forward pass when scoring
GENERATE_BATCH = 16  # prompts per batch when generating
MODEL_HINT = "lmforge pretrain --tokens DIR --tokenizer DIR --out DIR (then use OUT/final)"


class GenerationSettings(Section):
    """How continuations are produced; recorded next to every generation metric."""

    max_new_tokens: int = Field(64, ge=1, description="most tokens generated per prompt")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the default), else sampling")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    repetition_penalty: float = Field(1.0, gt=0, description="1 = off")
    stop: list[str] = Field(
        default_factory=list, description="cut the output at the first of these strings"
    )
    seed: int = Field(0, description="sampling seed (ignored when greedy)")


class EvalModel:
    """A loaded causal LM and its tokenizer, with the scoring and generation evals need."""

    def __init__(
        self, name: str, path: Path, model: torch.nn.Module, files: TokenizerFiles
    ) -> None:
        self.name = name
        self.path = Path(path)
        self.model = model.eval()
        self.files = files
        self.tokenizer = files.tokenizer
        hf = json.loads((self.path / "config.json").read_text())
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
        self._head: tuple[torch.nn.Linear, list[str]] | bool | None = False  # False: not loaded

    @classmethod
    def load(cls, path: Path | str, name: str | None = None, device: str = "cpu") -> EvalModel:
        """Loads model + tokenizer from a directory written by lmforge or save_pretrained."""
        from lmforge.model.convert import load_pretrained, model_display_name, resolve_model_dir

        model_dir = resolve_model_dir(Path(path))
        require_artifact(model_dir, ["config.json", "tokenizer.json"], hint=MODEL_HINT)
        tok = TokenizerFiles.load(model_dir)
        model = load_pretrained(model_dir, device=device)
        if not model.config.causal and not hasattr(model, "cross_kv"):  # seq2seq generates
            raise InputError(
                f"{model_dir} is a bidirectional encoder (BERT-style): lmforge eval scores and "
                "generates with causal LMs; an MLM's held-out masked-token loss is in its "
                "pretrain manifest (val_loss, initial_val_loss)"
            )
        return cls(name or model_display_name(model_dir), model_dir, model, tok)

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
        return sum(p.numel() for p in self.model.parameters())

    def stop_ids(self) -> list[int]:
        """Tokens that end a generation: generation_config.json's eos_token_id (the document end
        and the chat template's end of turn), the list transformers' generate() stops at."""
        return eos_ids(self.generation_config)

    def render_chat(self, user_text: str) -> str:
        """user_text as one user turn plus the assistant prompt, with the model's chat template."""
        return self.files.render_chat(
            [{"role": "user", "content": user_text}], add_generation_prompt=True
        )

    # -- classification head (lmforge finetune --task classify) ---------------------------------

    @property
    def head(self) -> tuple[torch.nn.Linear, list[str]] | None:
        """(Linear head, labels) when the directory is a sequence classifier (see _load_head)."""
        if self._head is False:
            self._head = _load_head(self.path, self.device)
        return self._head or None

    @torch.no_grad()
    def classify(self, text: str) -> list[float]:
        """Log-probabilities of each head label for text.

        The head reads the hidden state where fine-tuning and transformers pool: the rightmost
        token that is not the pad token (finetune.heads.pooled_index).
        """
        from lmforge.finetune.heads import pooled_index

        if self.head is None:
            raise InputError(
                f"{self.path} has no classification head (no score.weight + id2label in "
                "config.json); train one with `lmforge finetune --task classify`"
            )
        linear, _ = self.head
        ids = self.encode(text)[: self.block_size] or [self.pad_id]
        h = self.model.hidden_states(torch.tensor([ids], dtype=torch.long, device=self.device))
        pooled = h[0, pooled_index(ids, self.pad_id)]  # (C,)
        logits = linear(pooled.to(linear.weight.dtype)).float()  # (n_classes,)
        return torch.log_softmax(logits, dim=-1).double().tolist()

    # -- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def score_batch(
        self, rows: list[tuple[list[int], list[int]]]
    ) -> list[tuple[list[float], bool]]:
        """For each (context, targets): log p of every target token, and whether all are greedy.

        One forward pass per batch of rows, right-padded (causal attention: padding after a row's
        tokens cannot change them); only the target positions go through lm_head, so memory
        is (targets x vocab), not (tokens x vocab). Each row needs a non-empty context and
        len(context) + len(targets) - 1 <= block_size (callers window longer inputs).
        """
        if hasattr(self.model, "cross_kv"):
            raise InputError(
                f"{self.path} is an encoder-decoder: scoring (perplexity, log-likelihood tasks) "
                "is built for causal LMs only; `lmforge generate` works, and finetune --task "
                "seq2seq reports ROUGE/BLEU/exact match"
            )
        results: list[tuple[list[float], bool]] = []
        for lo in range(0, len(rows), SCORE_BATCH):
            chunk = rows[lo : lo + SCORE_BATCH]
            inputs = [(ctx + tgt)[:-1] for ctx, tgt in chunk]
            if any(not ctx for ctx, _ in chunk) or max(map(len, inputs)) > self.block_size:
                raise ValueError("each row needs context and at most block_size input tokens")
            width = max(map(len, inputs))
            x = torch.zeros((len(chunk), width), dtype=torch.long, device=self.device)
            for i, ids in enumerate(inputs):
                x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            h = self.model.hidden_states(x)  # (B, T, C)
            rows_idx = [i for i, (_, t) in enumerate(chunk) for _ in t]
            cols_idx = [
                len(inp) - len(t) + j
                for inp, (_, t) in zip(inputs, chunk, strict=True)
                for j in range(len(t))
            ]
            logp = torch.log_softmax(self.model.lm_head(h[rows_idx, cols_idx]).float(), dim=-1)
            y = torch.tensor(
                [tok for _, t in chunk for tok in t], dtype=torch.long, device=self.device
            )
            picked = logp.gather(1, y[:, None])[:, 0].double().tolist()
            greedy = (logp.argmax(dim=-1) == y).tolist()
            pos = 0
            for _, t in chunk:
                results.append((picked[pos : pos + len(t)], all(greedy[pos : pos + len(t)])))
                pos += len(t)
        return results

    def token_nll(self, context: list[int], targets: list[int]) -> list[float]:
        """-log p(target_i | context, targets_<i) in nats (see score_batch)."""
        return [-lp for lp in self.score_batch([(context, targets)])[0][0]]

    def start(self, text: str) -> list[int]:
        """Ids of text as the start of a document: the prefix token first when there is one."""
        ids = self.encode(text)
        return [self.prefix_id, *ids] if self.prefix_id is not None else ids

    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is it the greedy one) per continuation, batched.

        The context is a document start (see start()); when context + continuation exceed the
        window, context tokens are dropped from the left, as lm-evaluation-harness does.
        """
        ctx = self.start(context)
        if not ctx:
            raise InputError("empty context and the tokenizer has no BOS/EOS token to start from")
        rows, empty = [], []
        for i, text in enumerate(continuations):
            cont = self.encode(text)[-self.block_size :]
            if not cont:
                empty.append(i)
                continue
            keep = self.block_size + 1 - len(cont)  # context tokens that still fit the window
            rows.append((ctx[-keep:], cont))
        scored = iter(self.score_batch(rows))
        out = []
        for i in range(len(continuations)):
            if i in empty:
                out.append((0.0, True))
            else:
                lps, greedy = next(scored)
                out.append((float(sum(lps)), greedy))
        return out

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """loglikelihoods() for one continuation."""
        return self.loglikelihoods(context, [continuation])[0]

    # -- generation ----------------------------------------------------------------------------

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
        so no prefix token is added) and stops at the end-of-turn token. Prompts run batch_size
        at a time, left-padded (model.generate.generate_batched): greedy outputs equal one prompt
        at a time; sampled prompt i draws from its own generator seeded by (settings.seed, i), so
        the batch size does not change what is sampled.
        """
        from lmforge.model.generate import generate_batched

        if hasattr(self.model, "cross_kv"):  # an encoder-decoder: the prompt is the source
            return self._generate_seq2seq(prompts, settings, batch_size)
        budget = min(settings.max_new_tokens, max(self.block_size - 1, 1))
        rows = []
        for prompt in prompts:
            ids = self.encode(self.render_chat(prompt)) if chat else self.start(prompt)
            if not ids:
                raise InputError(
                    "empty prompt and the tokenizer has no BOS/EOS token to start from"
                )
            rows.append(ids[-(self.block_size - budget) :])
        new = generate_batched(
            self.model,
            rows,
            budget,
            batch_size=batch_size,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            stop_tokens=self.stop_ids(),
            greedy=settings.temperature == 0,
            seed=settings.seed,
        )
        return [cut_at_stop(self.decode(ids), settings.stop) for ids in new]

    def _generate_seq2seq(
        self, prompts: list[str], settings: GenerationSettings, batch_size: int
    ) -> list[str]:
        """Each prompt encoded as a source (then eos), the target decoded from the directory's
        decoder_start_token_id (model.seq2seq_generate), stopping at its eos ids."""
        from lmforge.model.seq2seq_generate import generate_seq2seq_batched, source_row

        start = self.generation_config.get("decoder_start_token_id", self.decoder_start_id)
        stops = self.stop_ids()
        if start is None or not stops:
            raise InputError(
                f"{self.path} lacks decoder_start_token_id or eos_token_id in config.json / "
                "generation_config.json; an encoder-decoder needs both to generate"
            )
        sources = [source_row(self.encode(p), stops[0], self.block_size) for p in prompts]
        new = generate_seq2seq_batched(
            self.model, sources, min(settings.max_new_tokens, self.block_size - 1),
            decoder_start_id=start, pad_id=self.pad_id, stop_tokens=stops, batch_size=batch_size,
            temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty, greedy=settings.temperature == 0,
            seed=settings.seed,
        )  # fmt: skip
        return [cut_at_stop(self.decode(ids), settings.stop) for ids in new]


def _load_head(model_dir: Path, device: torch.device) -> tuple[torch.nn.Linear, list[str]] | None:
    """The classification head of a model directory, if any.

    A sequence-classifier checkpoint (score.weight + id2label in config.json, as the finetune
    stage and transformers write it) or, from lmforge before that, head.safetensors (a Linear
    with bias) + labels.json beside the model.
    """
    from lmforge.model.convert import load_classifier

    head = load_classifier(model_dir)
    if head is not None:
        linear = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False)
        linear.load_state_dict({"weight": head.weight})
        return linear.to(device).eval(), head.labels
    if not ((model_dir / "head.safetensors").is_file() and (model_dir / "labels.json").is_file()):
        return None
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "head.safetensors"))
    labels = [str(x) for x in json.loads((model_dir / "labels.json").read_text(encoding="utf-8"))]
    n_classes, n_embd = state["weight"].shape
    if n_classes != len(labels):
        raise InputError(
            f"{model_dir}: head.safetensors has {n_classes} classes but labels.json {len(labels)}"
        )
    linear = torch.nn.Linear(n_embd, n_classes, bias="bias" in state)
    linear.load_state_dict(state)
    return linear.to(device).eval(), labels


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to (not including) the earliest stop string."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def nll_to_ppl(total_nll: float, n_tokens: int) -> float:
    """exp(mean NLL), guarded against overflow for untrained models."""
    return math.exp(min(total_nll / max(n_tokens, 1), 700.0))
