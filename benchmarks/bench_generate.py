"""Batched greedy generation: lmforge against Hugging Face `generate()` on the same weights.

Evaluation (ROUGE of SFT answers, generation tasks, the lm-eval adapter) and `lmforge generate`
decode many prompts of different lengths. This benchmark times that job three ways, in one
process, round-robin, on the same model and prompts:

- **lmforge one-by-one**: `generate()` on each prompt alone (what evaluation did before batching).
- **lmforge batched**: `generate_batched()`: prompts sorted by length, left-padded, batch_size at
  a time, with a preallocated KV cache.
- **HF generate**: the same weights exported with `save_pretrained` and loaded as
  `LlamaForCausalLM`, the same length-sorted left-padded batches with `attention_mask`,
  `do_sample=False`, its default dynamic KV cache.

The model has random weights and no stop token, so every row decodes exactly max_new_tokens and
all three do identical work; the script also reports how many rows of lmforge batched and HF
agree token for token (fp32 ties between near-equal logits can flip a greedy pick).

Run: `.venv/bin/python benchmarks/bench_generate.py --preset tiny --prompts 64 --new-tokens 48`
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _rates import print_rates, time_round_robin


def make_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def lmforge_one_by_one(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    from lmforge.model.generate import generate

    out = []
    for p in prompts:
        ids = generate(model, torch.tensor([p]), new, greedy=True)
        out.append(ids[0, len(p) :].tolist())
    return out


def lmforge_batched(model, prompts: list[list[int]], new: int, batch: int) -> list[list[int]]:
    from lmforge.model.generate import generate_batched

    return generate_batched(model, prompts, new, batch_size=batch, greedy=True)


def hf_batched(
    hf_model, prompts: list[list[int]], new: int, batch: int, **generate_kwargs
) -> list[list[int]]:
    """HF generate (and generate_kwargs, e.g. num_beams) over the same length-sorted,
    left-padded batches lmforge builds."""
    from lmforge.model.generate import left_pad, length_sorted_batches

    results: list[list[int]] = [[] for _ in prompts]
    for chunk in length_sorted_batches(prompts, batch):
        ids, mask = left_pad([prompts[i] for i in chunk])
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids,
                attention_mask=mask.long(),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
                **generate_kwargs,
            )
        for i, row in zip(chunk, out[:, ids.size(1) :].tolist(), strict=True):
            results[i] = row
    return results


def model_pair(preset: str, vocab_size: int = 4096):
    """Our `preset` body with random weights (seed 0), and transformers' load of its export."""
    from transformers import AutoModelForCausalLM

    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(preset_config(preset, vocab_size=vocab_size)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp))
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return model, hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="lmforge model preset (llama style)")
    ap.add_argument("--prompts", type=int, default=64, help="number of prompts")
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, hf = model_pair(args.preset)
    prompts = make_prompts(args.prompts, model.config.vocab_size, args.min_len, args.max_len, 0)
    n_new = args.prompts * args.new_tokens
    print(f"model {args.preset} ({model.num_params() / 1e6:.2f}M params), {args.prompts} prompts "
          f"of {args.min_len}-{args.max_len} tokens, {args.new_tokens} new tokens each, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip

    contenders = {
        "lmforge one-by-one": lambda: lmforge_one_by_one(model, prompts, args.new_tokens),
        "lmforge batched": lambda: lmforge_batched(
            model, prompts, args.new_tokens, args.batch_size
        ),
        "HF generate": lambda: hf_batched(hf, prompts, args.new_tokens, args.batch_size),
    }
    times, outputs = time_round_robin(contenders, args.rounds)

    ours, theirs = outputs["lmforge batched"], outputs["HF generate"]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True))
    same_alone = sum(a == b for a, b in zip(ours, outputs["lmforge one-by-one"], strict=True))
    ratios = [("lmforge batched", "HF generate"), ("lmforge batched", "lmforge one-by-one")]
    print_rates(times, n_new, ratios)
    print(f"rows equal to HF token for token: {agree}/{len(ours)}; "
          f"to lmforge one-by-one: {same_alone}/{len(ours)}")  # fmt: skip


if __name__ == "__main__":
    main()
