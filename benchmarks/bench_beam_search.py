"""Beam search against greedy decoding, and against Hugging Face's beam search, same weights.

What does `--num-beams 4` cost per generated token? Three contenders decode the same prompts
(`--prompts` of `--min-len`..`--max-len` tokens, length-sorted, left-padded, `--batch-size` at a
time) in one process, round-robin, so load on a shared machine falls on each alike:

- **greedy**: lmforge's `generate_batched(greedy=True)`;
- **beams**: lmforge's `beam_generate_batched` with `--num-beams` (model.beam_search);
- **HF beams**: transformers' `generate(num_beams=..., do_sample=False)` on the export of the same
  weights, over the same batches.

The model (`--preset`, random weights) has no stop token, so every row decodes exactly
`--new-tokens` tokens and the rates count the same tokens; the script also reports how many of
lmforge's beam answers equal HF's token for token.

Run: `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_beam_search.py`
"""

from __future__ import annotations

import argparse

import torch
from _rates import print_rates, time_round_robin
from bench_generate import hf_batched, lmforge_batched, make_prompts, model_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="lmforge model preset (llama style)")
    ap.add_argument("--prompts", type=int, default=16, help="number of prompts")
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.model.beam_search import BeamSettings, beam_generate_batched

    model, hf = model_pair(args.preset)
    prompts = make_prompts(args.prompts, model.config.vocab_size, args.min_len, args.max_len, 0)
    new, batch, nb = args.new_tokens, args.batch_size, args.num_beams
    print(f"model {args.preset} ({model.num_params() / 1e6:.2f}M params), {args.prompts} prompts "
          f"of {args.min_len}-{args.max_len} tokens, {new} new tokens each, batch {batch}, "
          f"{nb} beams, {torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    beams = BeamSettings(num_beams=nb)
    contenders = {
        "greedy": lambda: lmforge_batched(model, prompts, new, batch),
        "beams": lambda: beam_generate_batched(model, prompts, new, beams, batch_size=batch),
        "HF beams": lambda: hf_batched(hf, prompts, new, batch, num_beams=nb),
    }
    times, outputs = time_round_robin(contenders, args.rounds)
    print_rates(times, args.prompts * new, [("beams", "greedy"), ("beams", "HF beams")])
    agree = sum(a == b for a, b in zip(outputs["beams"], outputs["HF beams"], strict=True))
    print(f"beam answers equal to HF's token for token: {agree}/{args.prompts}")


if __name__ == "__main__":
    main()
