"""ONNX export with KV-cache inputs and outputs, checked against PyTorch with onnxruntime.

The graph takes `input_ids` (B, T), `attention_mask` (B, P + T; 1 = token, 0 = left padding) and
`past_keys` / `past_values` (n_layer, B, n_kv_head, P, hd), and returns `logits` (B, T, V) and
`present_keys` / `present_values` (n_layer, B, n_kv_head, P + T, hd). P = 0 is the prefill; each
decode step feeds back the presents. B, T and P are dynamic. The attention mask is always passed
to the model, so one graph serves prefill and decode (the explicit-mask attention path).

A decoder sequence classifier (*ForSequenceClassification) exports its own graph instead:
`input_ids` and `attention_mask` (B, T; padding right or left) -> `logits` (B, n_labels), its
head read at each row's rightmost attended token that is not the pad id, where fine-tuning and
transformers pool. The mask says which tokens are padding, so a pad id that is also a real token
(GPT-2's eos) is still read inside the text, and left padding shifts no position.

An encoder (BERT/RoBERTa; no KV cache) exports as `input_ids`, `attention_mask` (+
`token_type_ids` for BERT's segments) -> `logits` (B, n_labels) of its classifier, pooled in the
graph (a mean-pooled head: the mean over the mask; a *ForSequenceClassification: the pooler on
the first token), or `last_hidden_state` (B, T, C) for an encoder without a sequence head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import StageError
from lmforge.finetune.heads import mean_pool
from lmforge.model.generate import pad_rows

OUTPUTS = ["logits", "present_keys", "present_values"]


class ConcatCache:
    """The KVCache interface (update) over past tensors, growing by concatenation (traceable)."""

    def __init__(self, past_keys: Tensor, past_values: Tensor) -> None:
        self.past_keys, self.past_values = past_keys, past_values
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.cat([self.past_keys[layer], k], dim=2)  # (B, n_kv_head, P + T, hd)
        v = torch.cat([self.past_values[layer], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return k, v


class CachedLM(nn.Module):
    """A Transformer as (ids, mask, past) -> (logits, presents): what the ONNX graph computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, past_keys: Tensor, past_values: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cache = ConcatCache(past_keys, past_values)
        logits = self.model(
            input_ids, kv_cache=cache, start_pos=past_keys.size(3), pad_mask=attention_mask
        )
        return logits, torch.stack(cache.keys), torch.stack(cache.values)


def empty_past(model: nn.Module, batch: int, length: int = 0) -> tuple[Tensor, Tensor]:
    """Zero past keys and values (n_layer, B, n_kv_head, length, hd) for model."""
    cfg = model.config
    shape = (cfg.n_layer, batch, cfg.n_kv_head, length, cfg.hd)
    return torch.zeros(shape), torch.zeros(shape)


def export_onnx(model: nn.Module, path: Path, opset: int = 18) -> None:
    """Write model (a Transformer, fp32, eval) to path as a KV-cache ONNX graph."""
    wrapper = CachedLM(model.float()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 3))
    past_k, past_v = empty_past(model, 2, 4)
    mask = torch.ones((2, 7), dtype=torch.long)
    dyn = torch.export.Dim.DYNAMIC
    dynamic = {
        "input_ids": {0: dyn, 1: dyn},
        "attention_mask": {0: dyn, 1: dyn},
        "past_keys": {1: dyn, 3: dyn},
        "past_values": {1: dyn, 3: dyn},
    }
    save_graph(wrapper, (ids, mask, past_k, past_v), OUTPUTS, dynamic, path, opset)


def save_graph(
    wrapper: nn.Module, args: tuple, outputs: list[str], dynamic: dict, path: Path, opset: int
) -> None:
    """Trace wrapper on example args (torch.onnx dynamo; inputs named as dynamic's keys, those
    axes dynamic) and write one self-contained .onnx file (no external data)."""
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=list(dynamic),
            output_names=outputs,
            dynamic_shapes=dynamic,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))


def ort_session(path: Path) -> Any:
    """An onnxruntime CPU session using as many threads as torch does (a fair comparison)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_step(session: Any, ids: Tensor, mask: Tensor, past: tuple[Any, Any]) -> list[np.ndarray]:
    """One graph call: (logits, present_keys, present_values) as numpy arrays."""
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    feed.update(past_keys=np.asarray(past[0]), past_values=np.asarray(past[1]))
    return session.run(None, feed)


@torch.no_grad()
def check_onnx(model: nn.Module, session: Any, atol: float) -> dict[str, float]:
    """Max |logit difference| ONNX vs PyTorch on a left-padded prefill and one cached decode step.

    Two prompts (6 and 4 tokens, the second left-padded) are compared at their real positions;
    the decode step appends one token to each. Raises StageError beyond atol.
    """
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=gen)
    mask = torch.ones((2, 6), dtype=torch.long)
    mask[1, :2] = 0
    logits, keys, values = run_step(session, ids, mask, empty_past(model, 2))
    ref = model(ids, pad_mask=mask).float().numpy()
    real = mask.bool().numpy()
    prefill = float(np.abs(logits - ref)[real].max())
    nxt = torch.randint(0, model.config.vocab_size, (2, 1), generator=gen)
    mask2 = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
    step, _, _ = run_step(session, nxt, mask2, (keys, values))
    ref2 = model(torch.cat([ids, nxt], dim=1), pad_mask=mask2)[:, -1:].float().numpy()
    decode = float(np.abs(step - ref2).max())
    if max(prefill, decode) > atol:
        raise StageError(
            f"ONNX logits differ from PyTorch by {max(prefill, decode):.2e} (> atol {atol}); "
            "the export is wrong for this model, please report it"
        )
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode}


def ort_decode_tokens_per_s(
    session: Any, model: nn.Module, prompt_tokens: int, new_tokens: int, repeats: int = 1
) -> float:
    """Greedy decode speed of the ONNX graph under onnxruntime (prefill, then cached steps)."""
    from lmforge.compress.measure import prompt_ids, time_decode

    idx = prompt_ids(model.config.vocab_size, prompt_tokens)

    def step() -> int:
        ids, mask = idx, torch.ones_like(idx)
        past: tuple[Any, Any] = empty_past(model, 1)
        for _ in range(new_tokens):
            logits, keys, values = run_step(session, ids, mask, past)
            ids = torch.from_numpy(logits[:, -1].argmax(-1, keepdims=True))
            mask = torch.ones((1, mask.size(1) + 1), dtype=torch.long)
            past = (keys, values)
        return new_tokens

    return time_decode(step, repeats)


class LastTokenClassifier(nn.Module):
    """A decoder classifier as (input_ids, attention_mask) -> label logits: its ONNX graph."""

    def __init__(self, model: nn.Module, score: nn.Linear, pad_id: int) -> None:
        super().__init__()
        self.model, self.score, self.pad_id = model, score, pad_id

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # the mask hides padding keys and counts positions from each row's first token, so a
        # right- or left-padded row reads as the row alone (Transformer.hidden_states)
        h = self.model.hidden_states(input_ids, pad_mask=attention_mask)  # (B, T, C)
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        read = (attention_mask != 0) & (input_ids != self.pad_id)  # finetune.heads.pooled_index
        last = (read * pos).amax(1)  # (B,) rightmost such token, 0 if none
        return self.score(h[torch.arange(h.size(0), device=h.device), last])  # (B, n_labels)


def export_classifier_onnx(
    model: nn.Module, score: nn.Linear, pad_id: int, path: Path, opset: int = 18
) -> None:
    """Write a decoder classifier (model + its score Linear, fp32, eval) to path as an ONNX graph."""
    wrapper = LastTokenClassifier(model.float(), score.float(), pad_id).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    mask = torch.ones((2, 5), dtype=torch.long)
    dyn = torch.export.Dim.DYNAMIC
    dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}}
    save_graph(wrapper, (ids, mask), ["logits"], dynamic, path, opset)


@torch.no_grad()
def check_classifier_onnx(
    model: nn.Module, score: nn.Linear, pad_id: int, session: Any, atol: float
) -> dict[str, float]:
    """Max |logit difference| ONNX vs PyTorch on a right- and a left-padded batch (rows of 7, 4
    and 1 tokens, one of them holding the pad id inside as a real token): each row is compared
    with the model run on its tokens alone, read at the last one. Raises StageError beyond
    atol."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = [torch.randint(0, vocab, (n,), generator=gen) for n in (7, 4, 1)]
    for row in rows:
        row[row == pad_id] = (pad_id + 1) % vocab  # a trailing pad id is not read (pooled_index)
    rows[0][2] = pad_id  # ... but one inside the text is a token like any other
    want = torch.stack([score(model.hidden_states(r[None])[0, -1]) for r in rows]).float()
    diff = 0.0
    for left in (False, True):
        ids, mask = pad_rows(rows, pad_id, None, left=left)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        diff = max(diff, float(np.abs(got - want.numpy()).max()))
    if diff > atol:
        raise StageError(
            f"ONNX classifier logits differ from PyTorch by {diff:.2e} (> atol {atol}); "
            "the export is wrong for this model, please report it"
        )
    return {"max_abs_logit_diff": diff}


class EncoderGraph(nn.Module):
    """An encoder (BERT/RoBERTa) as (input_ids, attention_mask[, token_type_ids]) -> its head's
    label logits (B, n_labels), pooled in the graph as fine-tuning pooled: the mean of the
    attended tokens' states (pool None), or BERT's pooler (dense + tanh) on the first attended
    token; without a head, last_hidden_state (B, T, C). Padding may be right or left: the mask
    hides it from attention and the pooling, and positions count from each row's first token."""

    def __init__(self, model: nn.Module, head: nn.Linear | None, pool: nn.Linear | None) -> None:
        super().__init__()
        self.model, self.head, self.pool = model, head, pool

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        h = self.model.hidden_states(
            input_ids, pad_mask=attention_mask, token_type_ids=token_type_ids
        )  # (B, T, C)
        if self.head is None:
            return h
        if self.pool is None:  # finetune.heads.SequenceClassifier's pooling "mean"
            return self.head(mean_pool(h, attention_mask))
        first = attention_mask.ne(0).int().argmax(1)  # (B,) [CLS] of a left-padded row too
        return self.head(torch.tanh(self.pool(h[torch.arange(h.size(0), device=h.device), first])))


def has_token_types(model: nn.Module) -> bool:
    """Whether the encoder's graph takes token_type_ids (BERT's segments; RoBERTa has one)."""
    return model.config.type_vocab_size > 1


def export_encoder_onnx(graph: EncoderGraph, path: Path, opset: int = 18) -> None:
    """Write an encoder graph (fp32, eval) to path: inputs input_ids, attention_mask (and
    token_type_ids where the model has segments), output logits or last_hidden_state."""
    graph = graph.float().eval()
    ids = torch.randint(0, graph.model.config.vocab_size, (2, 5))
    args: tuple[Tensor, ...] = (ids, torch.ones_like(ids))
    names = ["input_ids", "attention_mask"]
    if has_token_types(graph.model):
        args, names = (*args, torch.zeros_like(ids)), [*names, "token_type_ids"]
    dyn = torch.export.Dim.DYNAMIC
    output = "logits" if graph.head is not None else "last_hidden_state"
    save_graph(graph, args, [output], {n: {0: dyn, 1: dyn} for n in names}, path, opset)


@torch.no_grad()
def check_encoder_onnx(graph: EncoderGraph, pad_id: int, session: Any, atol: float) -> dict:
    """Max |difference| ONNX vs PyTorch (label logits, or the hidden states of real tokens) on a
    right- and a left-padded batch of rows of 7, 4 and 1 tokens (the longest a pair: its second
    half token type 1 where the model has types), each compared with the graph run on its
    tokens alone. Raises StageError beyond atol."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, graph.model.config.vocab_size, (n,), generator=gen) for n in (7, 4, 1)]
    typed = has_token_types(graph.model)
    types = [torch.zeros_like(r) for r in rows]
    types[0][4:] = int(typed)

    def feed(ids: Tensor, mask: Tensor, segs: Tensor) -> dict[str, np.ndarray]:
        return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()} | (
            {"token_type_ids": segs.numpy()} if typed else {}
        )

    alone = [
        graph(r[None], torch.ones_like(r[None]), t[None])[0]
        for r, t in zip(rows, types, strict=True)
    ]
    diff = 0.0
    for left in (False, True):
        ids, mask = pad_rows(rows, pad_id, None, left=left)
        segs, _ = pad_rows(types, 0, None, left=left)
        (got,) = session.run(None, feed(ids, mask, segs))
        if graph.head is not None:
            want = torch.stack(alone).numpy()
        else:  # the real tokens' states, row after row
            got, want = got[mask.bool().numpy()], torch.cat(alone).numpy()
        diff = max(diff, float(np.abs(got - want).max()))
    if diff > atol:
        raise StageError(
            f"ONNX encoder outputs differ from PyTorch by {diff:.2e} (> atol {atol}); "
            "the export is wrong for this model, please report it"
        )
    return {"max_abs_diff": diff}
