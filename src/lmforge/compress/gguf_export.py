"""GGUF export for llama.cpp users (the `gguf` package), checked by reading the file back.

Llama-style models map onto llama.cpp's "llama" architecture (RMSNorm, rotary positions, SwiGLU,
no biases), the same with model.qk_norm onto "qwen3", GPT-2-style ones onto "gpt2" (LayerNorm,
learned positions, tanh GELU, biases). Tensors get llama.cpp's names (token_embd, blk.N.attn_q,
..., output_norm; no output.weight when the embeddings are tied). For llama and qwen3 the fused
q/k/v and gate/up matrices are split; for llama q/k rows are reordered from the Hugging Face
rotary layout (rotate halves) to GGML's (rotate adjacent pairs), while qwen3 rotates halves
(llama.cpp's NEOX rotary) and keeps them, adding attn_q_norm/attn_k_norm, as llama.cpp's
convert_hf_to_gguf.py does; gpt2 keeps the fused attn_qkv. Matrices are
stored as f32, f16 or q8_0 (norms and biases stay f32, as llama.cpp wants them).

The tokenizer goes in as tokenizer.ggml.* (model "gpt2" = byte-level BPE): tokens (padded to the
model's vocabulary with unused [PAD<i>] entries), token types, merges, special ids, the chat
template, add_bos (lmforge starts a raw text with BOS, else EOS), and the pre-tokenizer
name whose regexes llama.cpp runs: read from tokenizer.json, so llama.cpp cuts text exactly
where `tokenizers` does (benchmarks/check_gguf_llamacpp.py checks it in llama.cpp itself).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from lmforge.errors import ConfigError, StageError
from lmforge.model.convert import model_display_name
from lmforge.model.quant import quantized_numel
from lmforge.model.rope import YARN_BETA_FAST, YARN_BETA_SLOW, rope_attention_factor, yarn_mscale
from lmforge.tokenizer.generation import eos_ids, load_generation_config

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp token types
# config.json's special ids -> their GGUF keys (gguf.Keys.Tokenizer.BOS_ID, EOS_ID, PAD_ID)
GGUF_SPECIAL_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}
# tokenizer.json's byte-level pre-tokenizer -> the tokenizer.ggml.pre name whose regexes llama.cpp
# runs (src/llama-vocab.cpp), keyed by "numbers split into single digits first": "smollm" is
# \p{N} then GPT-2's regex, "trillion" GPT-2's regex alone; both keep spaces before punctuation
# when detokenizing (clean_spaces off), as lmforge's decode does. "default" would run other
# regexes (punctuation runs, digits in threes) and cut text differently.
LLAMA_CPP_PRE = {True: "smollm", False: "trillion"}
# how matrices are stored -> (GGML tensor type, GGUF general.file_type); vectors stay f32
FILE_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0")}  # fmt: skip
Q8_BLOCK = 32  # values sharing one q8_0 scale: a row's length must be a multiple


# what each llama.cpp architecture needs of a ModelConfig, beyond COMMON_NEEDS
ARCH_NEEDS = {
    "llama": (("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "swiglu"), ("bias", False),
              ("attn_bias", False), ("sliding_window", None), ("qk_norm", False)),
    "qwen3": (("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "swiglu"), ("bias", False),
              ("attn_bias", False), ("sliding_window", None), ("qk_norm", True)),
    "gpt2": (("norm", "layernorm"), ("pos", "learned"), ("mlp", "gelu"), ("bias", True),
             ("head_dim", None), ("sliding_window", None), ("qk_norm", False)),
}  # fmt: skip
COMMON_NEEDS = (("causal", True), ("post_norm", False), ("emb_norm", False),
                ("type_vocab_size", 0), ("pos_offset", 0), ("mlm_head", False),
                ("n_dec_layer", 0), ("num_experts", 0))  # fmt: skip
# lmforge's GPT-2 block modules -> llama.cpp's gpt2 tensor names (each has a weight and a bias)
GPT2_NAMES = {"attn_norm": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output",
              "mlp_norm": "ffn_norm", "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}  # fmt: skip


def gguf_arch(cfg: Any) -> str:
    """The llama.cpp architecture cfg maps onto exactly (llama, qwen3, gpt2); else ConfigError."""
    problems = []
    for arch, needs in ARCH_NEEDS.items():
        wrong = [
            f"{name}={getattr(cfg, name)!r} (needs {want!r})"
            for name, want in (*COMMON_NEEDS, *needs)
            if getattr(cfg, name) != want
        ]
        if not wrong:
            llama_cpp_rope_scaling(cfg, arch)  # refuses what llama.cpp's rotary cannot do
            return arch
        problems.append(f"as {arch}: {', '.join(wrong)}")
    raise ConfigError(
        "GGUF export writes llama-style (qwen3 with qk_norm) or GPT-2-style decoders only; this "
        f"model does not fit ({'; '.join(problems)}); use --set export.formats=[onnx]"
    )


def llama_cpp_rope_scaling(cfg: Any, arch: str) -> dict[str, str | int | float]:
    """The {arch}.rope.scaling.* keys that make llama.cpp rotate as cfg.rope_scaling does; a
    ConfigError for a scaling llama.cpp cannot reproduce exactly.

    linear is a frequency scale; YaRN is llama.cpp's own (ramp ends rounded outward, cos/sin times
    0.1 ln(factor) + 1), so another attention factor (attention_factor, or mscale and
    mscale_all_dim giving another) or truncate=false is refused, and so are other betas than 32
    and 1: llama.cpp takes those from its run settings, not the file
    (llama-cpp-python 0.3.36 ignored the file's yarn_beta_* keys; logits then differed).
    """
    scaling = dict(cfg.rope_scaling or {}) if cfg.pos == "rope" else {}
    rope_type = scaling.pop("rope_type", "default")
    if rope_type == "default":
        return {}
    key, factor = f"{arch}.rope.scaling.", float(scaling.get("factor", 0.0))
    if rope_type == "linear":
        return {key + "type": "linear", key + "factor": factor}
    unexpressed = []
    if rope_type == "yarn" and not math.isclose(rope_attention_factor(cfg), yarn_mscale(factor)):
        attention_keys = ("attention_factor", "mscale", "mscale_all_dim")
        unexpressed = [k for k in attention_keys if scaling.get(k) is not None]
    betas = {"beta_fast": YARN_BETA_FAST, "beta_slow": YARN_BETA_SLOW}
    unexpressed += [k for k, default in betas.items() if (scaling.get(k) or default) != default]
    if rope_type == "yarn" and not unexpressed and scaling.get("truncate", True) and factor >= 1:
        return {
            key + "type": "yarn", key + "factor": factor,
            key + "original_context_length": scaling["original_max_position_embeddings"],
        }  # fmt: skip
    yarn_gap = (
        f"does not take {', '.join(unexpressed)} from a GGUF file"
        if unexpressed
        else "always rounds the ramp's ends outward (truncate) and needs factor >= 1"
    )
    why = {
        "yarn": f"llama.cpp's YaRN {yarn_gap}",
        "llama3": "llama.cpp reads it from a rope_freqs tensor, which this export does not write",
    }.get(rope_type, f"llama.cpp has no {rope_type} scaling")
    raise ConfigError(
        f"GGUF export cannot express model.rope_scaling rope_type {rope_type!r}: {why}; "
        "use --set export.formats=[onnx]"
    )


def rope_permute(w: Tensor, n_head: int) -> Tensor:
    """Rows of a q/k projection from the rotate-halves layout to GGML's adjacent pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def llama_block(state: dict[str, Tensor], i: int, cfg: Any) -> dict[str, Tensor]:
    """Block i under llama.cpp's llama names: q/k/v and gate/up split, q/k rows permuted; with
    qk_norm (qwen3) q/k rows stay in rotate-halves order and their norms come along."""
    nh, nkv, hd, p = cfg.n_head, cfg.n_kv_head, cfg.hd, f"blocks.{i}."
    q, k, v = state[p + "attn.qkv.weight"].split([nh * hd, nkv * hd, nkv * hd])
    gate, up = state[p + "mlp.fc.weight"].chunk(2)
    norms = ["q", "k"] if cfg.qk_norm else []  # (q_norm, k_norm: qwen3)
    return {
        f"blk.{i}.attn_norm.weight": state[p + "attn_norm.weight"],
        f"blk.{i}.attn_q.weight": q if cfg.qk_norm else rope_permute(q, nh),
        f"blk.{i}.attn_k.weight": k if cfg.qk_norm else rope_permute(k, nkv),
        **{f"blk.{i}.attn_{x}_norm.weight": state[f"{p}attn.{x}_norm.weight"] for x in norms},
        f"blk.{i}.attn_v.weight": v,
        f"blk.{i}.attn_output.weight": state[p + "attn.proj.weight"],
        f"blk.{i}.ffn_norm.weight": state[p + "mlp_norm.weight"],
        f"blk.{i}.ffn_gate.weight": gate,
        f"blk.{i}.ffn_up.weight": up,
        f"blk.{i}.ffn_down.weight": state[p + "mlp.proj.weight"],
    }


def gpt2_block(state: dict[str, Tensor], i: int, cfg: Any) -> dict[str, Tensor]:
    """Block i under llama.cpp's gpt2 names: the fused qkv stays fused, every bias kept."""
    return {
        f"blk.{i}.{theirs}.{kind}": state[f"blocks.{i}.{ours}.{kind}"]
        for ours, theirs in GPT2_NAMES.items()
        for kind in ("weight", "bias")
    }


def gguf_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names for its architecture, as float32 arrays."""
    cfg = model.config
    arch = gguf_arch(cfg)
    if quantized_numel(model):
        raise ConfigError(
            "GGUF export takes float weights and this model keeps int8/int4 codes; load it with "
            "load_pretrained(..., quantized='dequantize') as `lmforge compress export` does"
        )
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": state["tok_emb.weight"],
        "output_norm.weight": state["norm_f.weight"],
    }
    if arch == "gpt2":
        out["position_embd.weight"] = state["pos_emb.weight"]
        out["output_norm.bias"] = state["norm_f.bias"]
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    block = gpt2_block if arch == "gpt2" else llama_block
    for i in range(cfg.n_layer):
        out.update(block(state, i, cfg))
    return {name: t.contiguous().numpy() for name, t in out.items()}


def encode_tensor(name: str, array: np.ndarray, file_type: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of one tensor stored as file_type; vectors (norms) stay float32."""
    import gguf

    if file_type not in FILE_TYPES:
        raise ConfigError(f"GGUF file type {file_type!r}; valid: {', '.join(FILE_TYPES)}")
    qtype = gguf.GGMLQuantizationType[FILE_TYPES[file_type][0]]
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return array, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    if array.shape[-1] % Q8_BLOCK:
        raise ConfigError(
            f"GGUF q8_0: {name} has rows of {array.shape[-1]} values, not a multiple of "
            f"{Q8_BLOCK}; export f16 or f32 instead"
        )
    return gguf.quants.quantize(array, qtype), qtype


def llama_cpp_pre(tok: dict[str, Any], model_dir: Path) -> str:
    """tokenizer.ggml.pre for tokenizer.json: llama.cpp must cut text where `tokenizers` does."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = [(s.get("type"), s.get("individual_digits", s.get("use_regex"))) for s in steps]
    byte_level = steps[-1:] and steps[-1].get("add_prefix_space") is False
    if tok.get("normalizer") is None and byte_level and not tok["model"].get("ignore_merges"):
        if shape == [("ByteLevel", True)]:
            return LLAMA_CPP_PRE[False]
        if shape == [("Digits", True), ("ByteLevel", True)]:
            return LLAMA_CPP_PRE[True]
    raise ConfigError(
        f"{model_dir}/tokenizer.json: normalizer {tok.get('normalizer')} and pre-tokenizer "
        f"{shape} have no llama.cpp equivalent, so llama.cpp would tokenize differently; GGUF "
        "export takes lmforge's byte-level BPE (lmforge tokenizer train --kind bpe "
        "--set pre_tokenizer=gpt2, no normalization)"
    )


def tokenizer_metadata(model_dir: Path, special: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* values from tokenizer.json: byte-level BPE tokens (padded to vocab_size
    with unused entries, as convert_hf_to_gguf.py does), types, merges, pre-tokenizer, ids."""
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok["model"]["type"] != "BPE":
        raise ConfigError(
            f"{model_dir}/tokenizer.json is {tok['model']['type']}; GGUF export writes byte-level "
            "BPE tokenizers only (lmforge tokenizer train --kind bpe)"
        )
    added = {a["id"]: a for a in tok["added_tokens"]}
    vocab = {**tok["model"]["vocab"], **{a["content"]: i for i, a in added.items()}}
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(
            f"{model_dir}/tokenizer.json has id {max(vocab.values())}, beyond the model's "
            f"vocab_size {vocab_size}: the tokenizer is not this model's"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL if i not in added else CONTROL if added[i]["special"] else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    eos = special.get("eos_token_id")
    turn_ends = [i for i in eos_ids(load_generation_config(model_dir)) if i != eos]
    # lmforge starts a raw text as a document (evals.lm.EvalModel.start): BOS first, else EOS as
    # GPT-2 does; llama.cpp adds its bos to every prompt when add_bos is set
    start = special.get("bos_token_id", eos)
    return {
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "pre": llama_cpp_pre(tok, model_dir),
        **special,
        **({"bos_token_id": start} if start is not None else {}),
        "add_bos": start is not None,
        **({"eot_token_id": turn_ends[0]} if turn_ends else {}),
    }


def add_hyperparameters(writer: Any, cfg: Any, arch: str) -> None:
    """The {arch}.* keys llama.cpp reads for arch."""
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_key_length(cfg.hd)
    writer.add_value_length(cfg.hd)
    writer.add_rope_dimension_count(cfg.hd)
    writer.add_rope_freq_base(cfg.rope_theta)
    add = {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32}
    for key, value in llama_cpp_rope_scaling(cfg, arch).items():
        add[type(value)](key, value)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def written_hyperparameters(cfg: Any, arch: str) -> dict[str, Any]:
    """The shape and rotary keys add_hyperparameters writes, as GGUFReader reads them back
    (floats stored as float32); llama.cpp sizes and rotates attention by these."""
    shape = {
        f"{arch}.context_length": cfg.block_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.vocab_size": cfg.vocab_size,
    }
    if arch == "gpt2":
        return {**shape, "gpt2.attention.layer_norm_epsilon": float(np.float32(cfg.norm_eps))}
    return {
        **shape,
        f"{arch}.attention.key_length": cfg.hd,
        f"{arch}.attention.value_length": cfg.hd,
        f"{arch}.rope.dimension_count": cfg.hd,
        f"{arch}.rope.freq_base": float(np.float32(cfg.rope_theta)),
        f"{arch}.attention.layer_norm_rms_epsilon": float(np.float32(cfg.norm_eps)),
    }


def export_gguf(
    model: nn.Module, model_dir: Path, path: Path, special: dict[str, int], file_type: str = "f32"
) -> None:
    """Write model (llama-, qwen3- or GPT-2-style) with its tokenizer metadata to path, matrices as
    file_type (f32 | f16 | q8_0)."""
    import gguf

    cfg = model.config
    arch = gguf_arch(cfg)
    meta = tokenizer_metadata(model_dir, special, cfg.vocab_size)
    tensors = {name: encode_tensor(name, a, file_type) for name, a in gguf_tensors(model).items()}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(model_display_name(model_dir))
    add_hyperparameters(writer, cfg, arch)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[file_type][1]])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id),
                     ("eot_token_id", writer.add_eot_token_id)):  # fmt: skip
        if key in meta:
            add(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(False)
    if (model_dir / "chat_template.jinja").is_file():
        writer.add_chat_template((model_dir / "chat_template.jinja").read_text(encoding="utf-8"))
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
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


def check_gguf(
    path: Path, model: nn.Module, model_dir: Path, special: dict[str, int], file_type: str = "f32"
) -> dict:
    """Read path back with gguf's GGUFReader: every tensor (name, type, shape, stored values),
    the hyperparameters (shapes, head width, rotary base, norm eps) and the tokenizer metadata
    must be what was written; raises StageError."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    want = {name: encode_tensor(name, a, file_type) for name, a in gguf_tensors(model).items()}
    got = {t.name: (np.asarray(t.data), t.tensor_type) for t in reader.tensors}
    if set(got) != set(want):
        raise StageError(f"GGUF read-back: tensors {sorted(set(want) ^ set(got))} differ")
    for name, (array, qtype) in want.items():
        data, stored = got[name]
        if stored != qtype or data.shape != array.shape or not np.array_equal(data, array):
            raise StageError(
                f"GGUF read-back: tensor {name} differs ({stored.name} {data.shape}, "
                f"written {qtype.name} {array.shape})"
            )
    cfg = model.config
    arch = gguf_arch(cfg)
    meta = tokenizer_metadata(model_dir, special, cfg.vocab_size)
    expected = {
        "general.architecture": arch,
        f"{arch}.block_count": cfg.n_layer, f"{arch}.embedding_length": cfg.n_embd,
        f"{arch}.attention.head_count": cfg.n_head,
        f"{arch}.attention.head_count_kv": cfg.n_kv_head,
        **written_hyperparameters(cfg, arch),
        "general.file_type": gguf.LlamaFileType[FILE_TYPES[file_type][1]],
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": meta["pre"],
        "tokenizer.ggml.tokens": meta["tokens"], "tokenizer.ggml.token_type": meta["token_types"],
        "tokenizer.ggml.merges": meta["merges"],
        "tokenizer.ggml.add_bos_token": meta["add_bos"], "tokenizer.ggml.add_eos_token": False,
        **{key: meta[k] for k, key in GGUF_SPECIAL_KEYS.items() if k in meta},
        **({"tokenizer.ggml.eot_token_id": meta["eot_token_id"]} if "eot_token_id" in meta
           else {}),
        **{key: float(np.float32(v)) if isinstance(v, float) else v
           for key, v in llama_cpp_rope_scaling(cfg, arch).items()},
    }  # fmt: skip
    for key, value in expected.items():
        stored = _field(reader, key)
        if stored != value:
            shown = "" if isinstance(value, list) else f" ({stored!r}, expected {value!r})"
            raise StageError(f"GGUF read-back: {path}: {key} is not what was written{shown}")
    return {"tensors": len(got), "tokens": len(meta["tokens"]), "merges": len(meta["merges"]),
            "pre_tokenizer": meta["pre"]}  # fmt: skip
