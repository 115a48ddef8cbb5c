"""Rotary position embeddings: each rope_scaling type's frequencies and attention factor.

One place owns what a `rope_scaling` dict may say (the keys each type needs or allows, checked
with errors naming the key), how it is read from a Hugging Face config.json, and the cos/sin
tables it gives. The types are transformers' (modeling_rope_utils), written from their formulas:

- default: theta^(-2i/hd).
- linear (position interpolation): positions divided by `factor`, i.e. frequencies divided by it.
- llama3: low frequencies divided by `factor`, high ones kept, a smooth blend between them.
- yarn (arXiv 2309.00071, "NTK-by-parts"): dimensions that turn fewer than `beta_slow` times
  in `original_max_position_embeddings` positions are interpolated (divided by `factor`), those
  turning more than `beta_fast` times are kept, a linear ramp between; cos and sin are scaled by
  the attention factor (0.1 ln(factor) + 1 unless given, or the mscale/mscale_all_dim ratio).
- dynamic (NTK): transformers grows the base only once a sequence is longer than
  max_position_embeddings, which is model.block_size on import and export; lmforge never runs
  a sequence past block_size, so every length it runs gets the default frequencies, exactly as
  transformers computes them for that length. (Past that length transformers rotates the keys
  already in its cache with older frequencies than the new ones, which one position-indexed
  table could not reproduce; that is why block_size is the limit and not an approximation.)

longrope is refused: transformers picks short_factor or long_factor for a whole forward pass by
the sequence's length, so a prompt's cached keys keep the short frequencies while decoded tokens
past original_max_position_embeddings get the long ones; one table per position cannot be both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmforge.errors import ConfigError, InputError

if TYPE_CHECKING:
    from lmforge.model.config import ModelConfig

ORIGINAL = "original_max_position_embeddings"
# rope_type -> (keys it needs, keys it may have); "rope_type" itself is always there
ROPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", ORIGINAL), ()),
    "yarn": (
        ("factor", ORIGINAL),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}
ROPE_TYPES = tuple(ROPE_KEYS)
REFUSED = {
    "longrope": (
        "transformers switches every position between short_factor and long_factor when a "
        f"sequence crosses {ORIGINAL} while keys already cached keep the short ones, which "
        "lmforge's one rotary table per position cannot reproduce exactly"
    ),
}
POSITIVE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                 "attention_factor")  # fmt: skip
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # the paper's defaults (rotations in the old context)


def _check_positive(scaling: dict[str, Any], key: str, where: str) -> None:
    value = scaling[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}.{key} must be a number > 0, got {value!r}")


def check_rope_scaling(scaling: dict[str, Any] | None, where: str = "model.rope_scaling") -> None:
    """ConfigError naming the key of `where` (a rope_scaling dict) that cannot build the tables."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where} must be a mapping with a rope_type, got {scaling!r}")
    rope_type = scaling.get("rope_type", "default")
    if rope_type in REFUSED:
        raise ConfigError(f"{where}.rope_type {rope_type!r} is not supported: {REFUSED[rope_type]}")
    if rope_type not in ROPE_KEYS:
        raise ConfigError(f"{where}.rope_type {rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
    needs, allows = ROPE_KEYS[rope_type]
    missing = [k for k in needs if k not in scaling]
    if missing:
        raise ConfigError(f"{where} needs {', '.join(missing)} for rope_type {rope_type!r}")
    unknown = sorted(set(scaling) - {"rope_type", *needs, *allows})
    if unknown:
        raise ConfigError(
            f"{where} has {', '.join(unknown)}, which rope_type {rope_type!r} does not take; "
            f"it takes {', '.join((*needs, *allows)) or 'nothing else'}"
        )
    for key in POSITIVE_KEYS:
        if key in needs or scaling.get(key) is not None:  # a key it needs cannot be null
            _check_positive(scaling, key, where)
    for key in ("mscale", "mscale_all_dim"):  # 0 is allowed: transformers then ignores both
        if scaling.get(key) is not None and not isinstance(scaling[key], (int, float)):
            raise ConfigError(f"{where}.{key} must be a number, got {scaling[key]!r}")
    if ORIGINAL in scaling and (
        isinstance(scaling[ORIGINAL], bool) or not isinstance(scaling[ORIGINAL], int)
        or scaling[ORIGINAL] < 1
    ):  # fmt: skip
        raise ConfigError(f"{where}.{ORIGINAL} must be an integer >= 1, got {scaling[ORIGINAL]!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"{where}.high_freq_factor must be greater than low_freq_factor")
    if not isinstance(scaling.get("truncate", True), bool):
        raise ConfigError(f"{where}.truncate must be true or false, got {scaling['truncate']!r}")


def hf_rope_dict(hf: dict[str, Any]) -> dict[str, Any]:
    """A copy of config.json's rope dict as transformers 5 picks it: rope_scaling (v4) over
    rope_parameters (v5) when a file has both, {} when it has neither."""
    return dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})


def rope_scaling_from_hf(hf: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's rope_parameters (v5) or rope_scaling (v4) as our rope_scaling dict, or None
    for plain RoPE; InputError naming the key when transformers' model could not be matched.

    Keeps the keys the type takes (rope_theta is ModelConfig.rope_theta; keys transformers
    ignores are dropped) and fills original_max_position_embeddings as transformers does: a
    top-level value first, else the dict's, else max_position_embeddings.
    """
    params = hf_rope_dict(hf)
    nested = sorted(k for k, v in params.items() if isinstance(v, dict))
    if nested:  # transformers 5's per-layer-type dicts (Gemma 3 style), not one rotary
        raise InputError(
            f"config.json's rope dict has one per layer type ({', '.join(nested)}); lmforge "
            "rotates every layer alike, so it imports a single rope_parameters dict only"
        )
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise InputError(
            f"config.json partial_rotary_factor={partial!r} is not supported: lmforge rotates "
            "every dimension of a head"
        )
    if rope_type == "default":
        return None
    needs, allows = ROPE_KEYS.get(rope_type, ((), ()))
    if ORIGINAL in needs:
        params[ORIGINAL] = (
            hf.get(ORIGINAL) or params.get(ORIGINAL) or hf.get("max_position_embeddings", 2048)
        )
    # transformers reads an optional key set to null as unset, except truncate: null is falsy
    optional = {k: params[k] for k in allows if params.get(k) is not None}
    if "truncate" in params and params["truncate"] is None:
        optional["truncate"] = False
    scaling = {"rope_type": rope_type, **{k: params[k] for k in needs if k in params}, **optional}
    try:
        check_rope_scaling(scaling, "config.json rope_scaling")
    except ConfigError as err:
        raise InputError(str(err)) from None
    return scaling


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Rotary frequencies (hd/2,) in float32 for config's rope_scaling type."""
    hd, scaling = config.hd, config.rope_scaling or {}
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, scaling, config.rope_theta, hd)
    return inv_freq  # default, and dynamic within block_size (module docstring)


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3.1: wavelengths past old_len / low slow down by factor, below old_len / high stay,
    and the medium band blends the two by where old_len / wavelength falls between low and high."""
    factor, old_len = scaling["factor"], scaling[ORIGINAL]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: Tensor, scaling: dict[str, Any], theta: float, hd: int) -> Tensor:
    """YaRN's NTK-by-parts blend of the kept (extrapolated) and divided (interpolated) frequencies.

    Dimension pair i turns old_len * inv_freq[i] / 2pi times over the old context; solving that for
    i at beta_fast and beta_slow turns gives the ramp's ends (rounded outward when truncate)."""
    factor, old_len = scaling["factor"], scaling[ORIGINAL]
    beta_fast = scaling.get("beta_fast") or YARN_BETA_FAST
    beta_slow = scaling.get("beta_slow") or YARN_BETA_SLOW

    def dim_turning(turns: float) -> float:
        return hd * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    start, end = dim_turning(beta_fast), dim_turning(beta_slow)
    if scaling.get("truncate", True):
        start, end = math.floor(start), math.ceil(end)
    start, end = max(start, 0), min(end, hd - 1)
    width = (end - start) or 0.001  # a zero-width ramp is a step
    ramp = ((torch.arange(hd // 2, dtype=torch.float32) - start) / width).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)  # ramp 0: kept, 1: interpolated


def rope_attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: 1, or YaRN's attention factor (module docstring)."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:  # 0 or null: transformers then uses the default
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's attention factor for a context `factor` times longer: 0.1 m ln(factor) + 1, and 1
    when factor <= 1 (transformers' get_mscale; llama.cpp's with m = 1)."""
    return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_tables(config: ModelConfig, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """The float32 (cos, sin) tables, each (block_size, hd), for positions 0..block_size-1."""
    t = torch.arange(config.block_size, dtype=torch.float32, device=device)
    freqs = torch.outer(t, rope_inv_freq(config).to(device))  # (block_size, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, hd)
    scale = rope_attention_factor(config)
    return emb.cos() * scale, emb.sin() * scale
