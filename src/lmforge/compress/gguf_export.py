"""GGUF export for llama.cpp users (the `gguf` package), checked by reading the file back.

Llama-style models only (RMSNorm, rotary positions, SwiGLU, no biases): they map onto llama.cpp's
"llama" architecture. Tensors get llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm;
no output.weight when the embeddings are tied); the fused q/k/v and gate/up matrices are split,
and q/k rows are reordered from the Hugging Face rotary layout (rotate halves) to GGML's
(rotate adjacent pairs), as llama.cpp's convert_hf_to_gguf.py does. The tokenizer goes in as
tokenizer.ggml.* (model "gpt2" = byte-level BPE: tokens, token types, merges, special ids) plus
the chat template. Weights stay float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from lmforge.errors import ConfigError, StageError
from lmforge.model.convert import model_display_name

ARCH = "llama"
NORMAL, CONTROL = 1, 3  # llama.cpp token types
# config.json's special ids -> their GGUF keys (gguf.Keys.Tokenizer.BOS_ID, EOS_ID, PAD_ID)
GGUF_SPECIAL_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


def check_llama_style(cfg: Any) -> None:
    """ConfigError unless cfg maps onto llama.cpp's llama architecture exactly."""
    problems = [
        f"{name}={getattr(cfg, name)!r} (needs {want!r})"
        for name, want in (("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "swiglu"),
                           ("bias", False), ("attn_bias", False), ("sliding_window", None),
                           ("rope_scaling", None))
        if getattr(cfg, name) != want
    ]  # fmt: skip
    if problems:
        raise ConfigError(
            f"GGUF export supports llama-style models only; this one has {', '.join(problems)}; "
            "use --set export.formats=[onnx]"
        )


def rope_permute(w: Tensor, n_head: int) -> Tensor:
    """Rows of a q/k projection from the rotate-halves layout to GGML's adjacent pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, as float32 arrays."""
    cfg = model.config
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.hd
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": state["tok_emb.weight"],
        "output_norm.weight": state["norm_f.weight"],
    }
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        q, k, v = state[p + "attn.qkv.weight"].split([nh * hd, nkv * hd, nkv * hd])
        gate, up = state[p + "mlp.fc.weight"].chunk(2)
        out.update({
            f"blk.{i}.attn_norm.weight": state[p + "attn_norm.weight"],
            f"blk.{i}.attn_q.weight": rope_permute(q, nh),
            f"blk.{i}.attn_k.weight": rope_permute(k, nkv),
            f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": state[p + "attn.proj.weight"],
            f"blk.{i}.ffn_norm.weight": state[p + "mlp_norm.weight"],
            f"blk.{i}.ffn_gate.weight": gate,
            f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": state[p + "mlp.proj.weight"],
        })  # fmt: skip
    return {name: t.contiguous().numpy() for name, t in out.items()}


def tokenizer_metadata(model_dir: Path, special: dict[str, int]) -> dict[str, Any]:
    """tokenizer.ggml.* values from tokenizer.json: byte-level BPE tokens, types, merges, ids."""
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok["model"]["type"] != "BPE":
        raise ConfigError(
            f"{model_dir}/tokenizer.json is {tok['model']['type']}; GGUF export writes byte-level "
            "BPE tokenizers only (lmforge tokenizer train --kind bpe)"
        )
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    control = {a["id"] for a in tok["added_tokens"] if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return {
        "tokens": tokens,
        "token_types": [CONTROL if i in control else NORMAL for i in range(len(tokens))],
        "merges": merges,
        **special,
    }


def export_gguf(model: nn.Module, model_dir: Path, path: Path, special: dict[str, int]) -> None:
    """Write model (llama-style) with its tokenizer metadata to path."""
    import gguf

    cfg = model.config
    check_llama_style(cfg)
    meta = tokenizer_metadata(model_dir, special)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(model_display_name(model_dir))
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_key_length(cfg.hd)
    writer.add_value_length(cfg.hd)
    writer.add_rope_dimension_count(cfg.hd)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):  # fmt: skip
        if key in special:
            add(special[key])
    if (model_dir / "chat_template.jinja").is_file():
        writer.add_chat_template((model_dir / "chat_template.jinja").read_text(encoding="utf-8"))
    for name, array in gguf_tensors(model).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _field(reader: Any, key: str) -> Any:
    """A metadata value of a GGUFReader: a str, a number, or a list of either."""
    field = reader.fields.get(key)
    if field is None:
        raise StageError(f"GGUF read-back: key {key} is missing")
    return field.contents()


def check_gguf(path: Path, model: nn.Module, model_dir: Path, special: dict[str, int]) -> dict:
    """Read path back with gguf's GGUFReader: every tensor (name, shape, values), the llama
    hyperparameters and the tokenizer metadata must be what was written; raises StageError."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    want = gguf_tensors(model)
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    if set(got) != set(want):
        raise StageError(f"GGUF read-back: tensors {sorted(set(want) ^ set(got))} differ")
    for name, array in want.items():
        if got[name].shape != array.shape or not np.array_equal(got[name], array):
            raise StageError(f"GGUF read-back: tensor {name} differs (shape {got[name].shape})")
    cfg = model.config
    meta = tokenizer_metadata(model_dir, special)
    expected = {
        f"{ARCH}.block_count": cfg.n_layer, f"{ARCH}.embedding_length": cfg.n_embd,
        f"{ARCH}.attention.head_count": cfg.n_head,
        f"{ARCH}.attention.head_count_kv": cfg.n_kv_head,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": meta["tokens"],
        "tokenizer.ggml.token_type": meta["token_types"],
        "tokenizer.ggml.merges": meta["merges"],
        **{GGUF_SPECIAL_KEYS[k]: v for k, v in special.items()},
    }  # fmt: skip
    for key, value in expected.items():
        if _field(reader, key) != value:
            raise StageError(f"GGUF read-back: {key} is not what was written")
    return {"tensors": len(got), "tokens": len(meta["tokens"]), "merges": len(meta["merges"])}
