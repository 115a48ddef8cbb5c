"""ModelConfig: every architecture knob of the Transformer, plus named presets.

Llama-style and GPT-2-style models are two settings of the same fields (norm, pos, mlp, bias), not
two classes. The config is a plain dataclass so it round-trips through JSON (checkpoints, the
"lmforge" key of an exported config.json) with to_dict()/from_dict().
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmforge.errors import ConfigError
from lmforge.model.rope import check_rope_scaling

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "gelu", "gelu_exact")


@dataclass
class ModelConfig:
    """Shape and flavour of a Transformer (paper names: n_layer, n_head, n_embd).

    A decoder by default; causal=False with the encoder switches below makes BERT or RoBERTa.
    """

    vocab_size: int  # number of token ids (embedding rows / logits)
    n_layer: int  # number of Transformer blocks
    n_head: int  # number of query heads
    n_kv_head: int  # number of key/value heads (== n_head: MHA, 1: MQA, else GQA)
    n_embd: int  # residual stream width C
    intermediate_size: int  # MLP hidden size
    block_size: int  # max sequence length (positions / rope cache)
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    pos: str = "rope"  # "rope" (rotary) | "learned" (absolute position embeddings)
    mlp: str = (
        "swiglu"  # "swiglu" (silu(gate) * up) | "gelu" (tanh approx., GPT-2) | "gelu_exact" (erf)
    )
    bias: bool = False  # biases on all linears and layernorms (GPT-2)
    attn_bias: bool = False  # biases on q/k/v only (Qwen2)
    tie_embeddings: bool = False  # lm_head shares the token embedding matrix
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # epsilon inside the norms
    dropout: float = 0.0  # dropout on embeddings, attention probabilities and residual branches
    init_std: float = 0.02  # std of the normal init (residual projections get /sqrt(2*n_layer))
    head_dim: int | None = None  # per-head width; None means n_embd // n_head
    sliding_window: int | None = None  # attend to at most this many past tokens (Mistral)
    qk_norm: bool = False  # RMSNorm over hd on each head's queries and keys, before rotary (Qwen3)
    rope_scaling: dict[str, Any] | None = field(default=None)  # {"rope_type": ...}: model/rope.py
    # Encoder (BERT/RoBERTa) switches; the defaults are the decoder's, so decoders never change.
    causal: bool = True  # False: bidirectional encoder; pad masks then only hide padding keys
    post_norm: bool = False  # norm after each residual add (BERT), and no final norm
    emb_norm: bool = False  # a norm on the summed embeddings (BERT's embedding LayerNorm)
    type_vocab_size: int = 0  # token-type (segment) embeddings; every token gets type 0
    pos_offset: int = 0  # first position id (RoBERTa: pad id + 1 = 2); table = block_size + it
    mlm_head: bool = False  # dense + GELU + norm before the tied output layer, which has a bias
    # Encoder-decoder (model.seq2seq.Seq2SeqLM): n_layer encoder blocks (the encoder switches
    # above) and this many causal decoder blocks with cross-attention; 0 = not a seq2seq model.
    n_dec_layer: int = 0
    # Mixture of experts (model.moe.MoE replaces every block's MLP); 0 experts = dense MLPs.
    num_experts: int = 0  # SwiGLU experts per layer, each intermediate_size wide (0 = dense)
    num_experts_per_tok: int = 2  # top-k: experts each token is routed to
    norm_topk_prob: bool = True  # renormalise the top-k softmax weights to sum 1 (Mixtral)
    # Router loss weights in training. 0.01 is Switch Transformer's alpha (ST-MoE's too); an
    # imported Mixtral keeps its config.json's value (transformers' MixtralConfig default: 0.001).
    router_aux_loss_coef: float = 0.01  # Switch/Mixtral load-balancing loss weight
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (mean squared logsumexp)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_encoder_decoder(self) -> bool:
        """Builds a seq2seq model (model.seq2seq.Seq2SeqLM: encode / cross_kv / decode)."""
        return self.n_dec_layer > 0

    @property
    def hd(self) -> int:
        """Per-head width actually used (head_dim, or n_embd // n_head)."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot build a model."""
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.intermediate_size < 1:
            raise ConfigError(f"model.intermediate_size must be >= 1, got {self.intermediate_size}")
        choices = {"norm": NORMS, "pos": POSITIONS, "mlp": MLPS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(
                    f"model.{name}={getattr(self, name)!r} is not one of {', '.join(valid)}"
                )
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "change one of them or set model.head_dim"
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.n_head={self.n_head} is not a multiple of model.n_kv_head={self.n_kv_head}"
            )
        if self.pos == "rope" and self.hd % 2:
            raise ConfigError(f"rotary embeddings need an even head_dim, got {self.hd}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be >= 1, got {self.sliding_window}")
        self._validate_encoder()
        self._validate_experts()
        if self.n_dec_layer < 0:
            raise ConfigError(f"model.n_dec_layer must be >= 0, got {self.n_dec_layer}")
        seq2seq_ok = (
            not self.causal and self.pos == "learned" and self.tie_embeddings
            and not self.type_vocab_size and not self.mlm_head
            and not self.qk_norm  # cross-attention's q/k would go unnormalised
        )  # fmt: skip
        if self.n_dec_layer and not seq2seq_ok:
            raise ConfigError(
                "model.n_dec_layer > 0 (encoder-decoder) needs causal=false, pos='learned', "
                "tie_embeddings=true, type_vocab_size=0, mlm_head=false and qk_norm=false (see "
                "the bart-* presets)"
            )
        check_rope_scaling(self.rope_scaling)

    def _validate_encoder(self) -> None:
        if self.type_vocab_size < 0 or self.pos_offset < 0:
            raise ConfigError("model.type_vocab_size and model.pos_offset must be >= 0")
        if self.pos_offset and self.pos != "learned":
            raise ConfigError("model.pos_offset needs learned positions (model.pos='learned')")
        if not self.causal and self.sliding_window is not None:
            raise ConfigError("model.sliding_window applies to causal models only; unset it")
        if self.mlm_head and self.mlp == "swiglu":
            raise ConfigError("model.mlm_head uses the MLP's GELU; set model.mlp to gelu_exact")

    def _validate_experts(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if not self.num_experts:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"model.num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"model.num_experts={self.num_experts}"
            )
        if self.mlp != "swiglu" or self.bias:
            raise ConfigError(
                "model.num_experts > 0 builds bias-free SwiGLU experts; set model.mlp='swiglu' "
                "and model.bias=false, or model.num_experts=0 for a dense MLP"
            )
        if self.n_dec_layer:
            raise ConfigError("model.num_experts > 0 is for decoder-only models; set n_dec_layer=0")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict; an unknown key is a ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**d)


_GPT2_STYLE = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True)
# The fields every BERT/RoBERTa encoder has: post-norm LayerNorm blocks, learned positions, an
# embedding norm, biases, tied embeddings. hf_families builds imports from these and recognizes
# exports by them, so presets, import and export share one definition.
BERT_SHAPE: dict[str, Any] = dict(
    norm="layernorm", pos="learned", bias=True, tie_embeddings=True, causal=False, post_norm=True,
    emb_norm=True,
)  # fmt: skip
# BART: BERT's blocks without token types or MLM head, positions from 2, torch's LayerNorm eps.
BART_SHAPE: dict[str, Any] = dict(
    BERT_SHAPE, pos_offset=2, norm_eps=1e-5, type_vocab_size=0, mlm_head=False, attn_bias=False
)
# The presets add what a checkpoint sets: erf GELU, BERT's two token types, eps and MLM head.
_BERT_STYLE = dict(BERT_SHAPE, mlp="gelu_exact", type_vocab_size=2, mlm_head=True, norm_eps=1e-12)
_BART_STYLE = dict(BART_SHAPE, mlp="gelu_exact")

# unit tests: 2 layers, 64 wide, GQA, a few thousand params per layer
_MICRO: dict[str, Any] = dict(
    vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
    intermediate_size=128, block_size=128, tie_embeddings=True,
)  # fmt: skip

# Named starting points. vocab_size is usually overridden with the tokenizer's size.
PRESETS: dict[str, dict[str, Any]] = {
    "micro": _MICRO,
    # the same size in GPT-2 style, for tests of the other flavour
    "micro-gpt2": dict(
        vocab_size=256, n_layer=2, n_head=4, n_kv_head=4, n_embd=64,
        intermediate_size=256, block_size=128, **_GPT2_STYLE,
    ),
    # micro with 4 SwiGLU experts (top-2) in place of each MLP: the MoE test and CPU demo size
    "micro-moe": dict(_MICRO, num_experts=4, num_experts_per_tok=2),
    # the 2-core CPU quickstart: ~1.3M params with a 4096 vocab, trains in minutes
    "tiny": dict(
        vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=128,
        intermediate_size=352, block_size=256, tie_embeddings=True,
    ),
    # a small llama-style model for one GPU (~16M params with a 16k vocab)
    "small": dict(
        vocab_size=16384, n_layer=6, n_head=6, n_kv_head=2, n_embd=384,
        intermediate_size=1024, block_size=1024, tie_embeddings=True,
    ),
    # encoder (BERT-style) test size
    "bert-micro": dict(
        vocab_size=256, n_layer=2, n_head=4, n_kv_head=4, n_embd=64,
        intermediate_size=256, block_size=128, **_BERT_STYLE,
    ),
    # the 2-core CPU MLM quickstart, the shape of the decoder "tiny"
    "bert-tiny": dict(
        vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=128,
        intermediate_size=512, block_size=256, **_BERT_STYLE,
    ),
    # BERT-base (110M with its 30522 wordpiece vocab)
    "bert-base": dict(
        vocab_size=30522, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
        intermediate_size=3072, block_size=512, **_BERT_STYLE,
    ),
    # encoder-decoder (BART-style) test size
    "bart-micro": dict(
        vocab_size=256, n_layer=2, n_dec_layer=2, n_head=4, n_kv_head=4, n_embd=64,
        intermediate_size=256, block_size=128, **_BART_STYLE,
    ),
    # a 2-core CPU seq2seq, the width of the decoder "tiny"
    "bart-tiny": dict(
        vocab_size=4096, n_layer=3, n_dec_layer=3, n_head=4, n_kv_head=4, n_embd=128,
        intermediate_size=512, block_size=256, **_BART_STYLE,
    ),
    # GPT-2 small (124M) as in nanoGPT: vocab padded to 50304 for fast matmuls
    "gpt2-124m": dict(
        vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
        intermediate_size=3072, block_size=1024, **_GPT2_STYLE,
    ),
    # about 1B params, llama style (the Llama-3.2-1B body with a 32k vocab)
    "llama-1b": dict(
        vocab_size=32000, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
        intermediate_size=8192, block_size=2048, rope_theta=500000.0, tie_embeddings=True,
    ),
}  # fmt: skip


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig of a named preset, with keyword overrides (e.g. vocab_size=tokenizer size)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
