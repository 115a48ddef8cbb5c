"""Serving throughput: `lmforge serve` with 16 concurrent requests against one at a time.

Issue #16's benchmark. One run, one model, one machine:

- builds a model directory (the `--preset` shape with random weights and the tests' tiny
  byte-level BPE tokenizer with a ChatML template), or takes `--model DIR`;
- starts the real server (`lmforge serve`, through serve/launch.py) on a free local port;
- runs `lmforge serve bench`'s client at concurrency 1 and 16: streamed /v1/completions,
  `--requests` requests per level, each decoding exactly `--max-tokens` tokens (`ignore_eos`),
  sampled at temperature 1 without a seed so the response cache can answer none of them;
- prints the table (req/s, output tokens/s, TTFT and ITL percentiles) and the tokens/s ratio of
  concurrency 16 to concurrency 1 (issue target: >= 4x on CPU).

With CUDA (or `--hf` on CPU) it also times Hugging Face transformers' batched `generate` on the
same exported model directory: the same prompts, left-padded batches of 16, sampling, exactly
`--max-tokens` new tokens, and prints the server's 16-client tokens/s against it. On a CPU-only
machine without `--hf` that part is skipped with the reason.

Run: `.venv/bin/python benchmarks/bench_serve.py --preset tiny --requests 64 --max-tokens 64`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.serve.bench import DEFAULT_PROMPTS, render_table, run_bench
from lmforge.serve.launch import ServerProcess

TESTS = Path(__file__).resolve().parents[1] / "tests"


def build_model_dir(out: Path, preset: str) -> Path:
    """A servable model dir: random `preset` weights + the tests' ChatML BPE tokenizer."""
    sys.path.insert(0, str(TESTS))
    from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

    return make_model_dir(out / "model", make_tokenizer_dir(out / "tokenizer"), preset=preset)


def hf_generate_rate(
    model_dir: Path, prompts: list[str], requests: int, max_tokens: int, batch: int, device: str
) -> float:
    """Output tokens/s of transformers' generate over `requests` prompts in batches of `batch`
    (median of 3 timed rounds after one warmup batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device).eval()
    texts = [prompts[i % len(prompts)] for i in range(requests)]

    def run(chunk: list[str]) -> None:
        enc = tok(chunk, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            model.generate(
                **enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=True,
                temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()

    run(texts[:batch])  # warmup
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            run(texts[i : i + batch])
        seconds.append(time.perf_counter() - t0)
    return requests * max_tokens / statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="model dir to serve (default: build --preset)")
    ap.add_argument("--preset", default="tiny", help="lmforge model preset when building")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16", help="levels; the ratio is last / first")
    ap.add_argument("--device", default="auto", help="the server's device: auto | cpu | cuda")
    ap.add_argument("--hf", action="store_true", help="time HF generate even without CUDA")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    cuda = torch.cuda.is_available() and args.device != "cpu"

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model_dir(Path(tmp), args.preset)
        serve_args = ["--feedback-db", f"{tmp}/feedback.db", "--device", args.device,
                      "--max-batch-size", str(max(levels))]  # fmt: skip
        with ServerProcess([model_dir], args=serve_args, ready_timeout=300) as server:
            run_bench(server.url, None, [1], 2, 4, ignore_eos=True)  # warm the server up
            result = run_bench(
                server.url, None, levels, args.requests, args.max_tokens, ignore_eos=True
            )
        from lmforge.common.logging import console

        print(f"model {model_dir} ({'built: ' + args.preset if not args.model else 'given'}), "
              f"{args.requests} requests per level, {args.max_tokens} tokens each, server device "
              f"{args.device}, torch {torch.__version__}, CUDA {'yes' if cuda else 'no'}")  # fmt: skip
        console().print(render_table(result))
        first, last = result["levels"][0], result["levels"][-1]
        for level in result["levels"]:
            if level["errors"]:
                print(f"concurrency {level['concurrency']}: {level['errors']} errors, e.g. "
                      f"{level['error_samples'][0]}")  # fmt: skip
        ratio = last["output_tokens_per_s"] / first["output_tokens_per_s"]
        print(f"\ntokens/s at concurrency {last['concurrency']} / concurrency "
              f"{first['concurrency']}: {ratio:.2f}x (issue target on CPU: >= 4x)")  # fmt: skip

        if not (cuda or args.hf):
            print("HF transformers generate comparison skipped: no CUDA device here (the issue "
                  "asks for it on the GPU; pass --hf to time it on the CPU anyway)")  # fmt: skip
            return
        device = "cuda" if cuda else "cpu"
        hf = hf_generate_rate(
            Path(model_dir), list(DEFAULT_PROMPTS), args.requests, args.max_tokens,
            batch=last["concurrency"], device=device,
        )  # fmt: skip
        print(f"HF generate ({device}, batches of {last['concurrency']}): {hf:,.0f} tokens/s; "
              f"lmforge serve at {last['concurrency']} clients: "
              f"{last['output_tokens_per_s']:,.0f} tokens/s = "
              f"{last['output_tokens_per_s'] / hf:.2f}x HF")  # fmt: skip


if __name__ == "__main__":
    main()
