"""GPU training throughput and MFU: lmforge vs nanoGPT vs Hugging Face Llama, same GPU, same run.

Issue #6's measurement: the gpt2-124m shape (12 layers, 768 wide, 12 heads, T=1024, vocab 50304,
micro-batch 12), bf16 autocast, torch.compile, fused AdamW (lr 6e-4, betas (0.9, 0.95), weight
decay 0.1, nanoGPT's gpt2 settings), grad clip 1.0, one micro-batch per optimizer step.

Contenders, built once, then timed round-robin in this one process (rounds alternate, so a slow
moment hits all of them), each round after its own warmup steps (the first round's warmup holds
the compile), with torch.cuda.synchronize() before each clock reading:

- nanogpt: nanoGPT's model.py GPT (imported from --nanogpt-dir, never vendored here) with
  bias=True as GPT-2, its configure_optimizers (fused AdamW on CUDA), torch.compile(model), in a
  transcription of its train.py iteration (get_batch from a uint16 memmap, pinned + non_blocking;
  forward, prefetch, backward, clip, step, zero_grad(set_to_none=True), loss.item()), TF32 on as
  train.py sets it.
- hf-llama: transformers' LlamaForCausalLM at the same size: 12 layers, hidden 768, 12 heads
  (no GQA), tied embeddings, attn_implementation="sdpa", use_cache=False, compiled, its own loss
  (labels with shift_labels, so it predicts the same T tokens), fused AdamW, the same loop.
  intermediate_size = 8C/3 = 2048: SwiGLU's three C x I matrices then hold exactly the weights of
  GPT-2's two C x 4C ones (3 * 2048 = 2 * 3072), so N differs only by biases and the position table.
- lmforge: our Transformer, preset gpt2-124m (GPT-2 style, tanh GELU), trained by
  `lmforge.train.loop.train()` as `lmforge pretrain --set train.compile=true --set train.dtype=bf16`
  runs it: TokenWindows loader, lm_loss, fused AdamW, metrics.jsonl and progress bar included.
- lmforge-llama: our Transformer in Llama style at hf-llama's shape (RMSNorm, RoPE, SwiGLU 2048),
  same loop; compare it with hf-llama.

MFU = FLOPs/token x tokens/s / peak, with one formula for all: 6N + 12 L H Q T (PaLM appendix B;
nanoGPT's estimate_mfu and our Transformer.flops_per_token), N = parameters less lookup-only
tables (the position embedding; a tied token embedding counts, as it is also the output matmul).
The peak comes from lmforge.train.pace.PEAK_FLOPS by device name (989 TFLOP/s dense bf16 on H100);
on CPU or an unknown GPU, MFU is null.

--micro-batch-sweep 12,16,24,32 then trains lmforge alone at each micro-batch (others freed
first), skipping a size that runs out of memory, and reports the best MFU.

    python benchmarks/bench_train_gpu.py --nanogpt-dir .bench/nanogpt --out bench_gpu.json
    python benchmarks/bench_train_gpu.py --device cpu --shape tiny --skip nanogpt  # dry run

Results print as a markdown table and go to --out as JSON, rewritten after every round.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from _common import import_nanogpt, nanogpt_get_batch, time_lmforge, time_nanogpt_loop, write_tokens

import lmforge
from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.pace import peak_flops as lmforge_peak_flops
from lmforge.train.pretrain import lm_loss

LR, BETAS, WEIGHT_DECAY = 6e-4, (0.9, 0.95), 0.1
CONTENDERS = ("nanogpt", "hf-llama", "lmforge", "lmforge-llama")
FORMULA = "6N + 12*L*H*Q*T (PaLM appendix B; nanoGPT estimate_mfu; Transformer.flops_per_token)"


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # T: every sequence is this long
    vocab_size: int
    micro_batch: int
    tokens: int  # size of the random token file


SHAPES = {
    "gpt2-124m": Shape(12, 12, 768, 1024, 50304, micro_batch=12, tokens=10_000_000),
    "tiny": Shape(2, 4, 64, 64, 512, micro_batch=4, tokens=100_000),  # the CPU dry run
}


@dataclass(frozen=True)
class Setup:
    """What every contender shares: shape, micro-batch, device, precision, compile, data."""

    shape: Shape
    micro_batch: int
    device: torch.device
    amp_dtype: torch.dtype | None
    compile: bool
    tokens_path: Path


@dataclass
class Contender:
    name: str
    params: int  # N of the FLOPs formula
    flops_per_token: float
    run: Callable[[int, int], float]  # (warmup, steps) -> tokens per second
    rounds: list[float] = field(default_factory=list)
    peak_mem_gib: float | None = None


def flops_per_token(n_params: int, shape: Shape) -> float:
    """6N + 12 L H Q T: training FLOPs per token, matmul weights plus attention scores."""
    head_dim = shape.n_embd // shape.n_head
    return float(6 * n_params + 12 * shape.n_layer * shape.n_head * head_dim * shape.block_size)


def llama_intermediate(n_embd: int) -> int:
    """8C/3: SwiGLU's 3 matrices of C x I hold as many weights as GPT-2's 2 of C x 4C."""
    return 8 * n_embd // 3


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """nanoGPT's train.py turns TF32 on for matmuls and cuDNN; lmforge leaves torch's defaults."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def nanogpt_style(
    s: Setup,
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable,
    n_params: int,
    use_tf32: bool,
) -> Contender:
    """A contender timed in nanoGPT's train.py iteration (the model compiled as train.py does)."""
    compiled = torch.compile(model) if s.compile else model
    get_batch = nanogpt_get_batch(s.tokens_path, s.shape.block_size, s.micro_batch, s.device)

    def run(warmup: int, steps: int) -> float:
        with tf32(use_tf32):
            return time_nanogpt_loop(
                compiled, loss_of, optimizer, get_batch, warmup, steps,
                lr=LR, amp_dtype=s.amp_dtype, device=s.device,
            )[0]  # fmt: skip

    return Contender(name, n_params, flops_per_token(n_params, s.shape), run)


def nanogpt_contender(s: Setup, nanogpt_dir: Path) -> Contender:
    ng = import_nanogpt(nanogpt_dir)
    sh = s.shape
    torch.manual_seed(0)
    cfg = ng.GPTConfig(
        block_size=sh.block_size, vocab_size=sh.vocab_size, n_layer=sh.n_layer,
        n_head=sh.n_head, n_embd=sh.n_embd, dropout=0.0, bias=True,
    )  # fmt: skip
    model = ng.GPT(cfg).to(s.device)
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, s.device.type)
    loss_of = lambda m, x, y: m(x, y)[1]  # noqa: E731
    return nanogpt_style(s, "nanogpt", model, optimizer, loss_of, model.get_num_params(), True)


def hf_llama_contender(s: Setup) -> Contender:
    from transformers import LlamaConfig, LlamaForCausalLM

    sh = s.shape
    cfg = LlamaConfig(
        vocab_size=sh.vocab_size, hidden_size=sh.n_embd, intermediate_size=llama_intermediate(sh.n_embd),
        num_hidden_layers=sh.n_layer, num_attention_heads=sh.n_head, num_key_value_heads=sh.n_head,
        max_position_embeddings=sh.block_size, tie_word_embeddings=True, use_cache=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(s.device)
    if model.config._attn_implementation != "sdpa":
        raise SystemExit(f"hf-llama: attention is {model.config._attn_implementation}, not sdpa")
    params = list(model.parameters())  # tied: the shared embedding is listed once
    groups = [  # nanoGPT's rule: matrices decay, vectors do not
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)
    loss_of = lambda m, x, y: m(input_ids=x, labels=y, shift_labels=y).loss  # noqa: E731
    n = sum(p.numel() for p in params)  # no position table; the tied head is the output matmul
    return nanogpt_style(s, "hf-llama", model, optimizer, loss_of, n, False)


def lmforge_contender(s: Setup, name: str = "lmforge") -> Contender:
    """Our Transformer (gpt2-124m preset at the shape, or Llama style) in our training loop."""
    sh = s.shape
    shape = dict(
        vocab_size=sh.vocab_size, n_layer=sh.n_layer, n_head=sh.n_head, n_kv_head=sh.n_head,
        n_embd=sh.n_embd, intermediate_size=4 * sh.n_embd, block_size=sh.block_size,
    )  # fmt: skip
    if name == "lmforge-llama":  # hf-llama's architecture
        shape.update(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False,
                     intermediate_size=llama_intermediate(sh.n_embd))  # fmt: skip
    cfg = preset_config("gpt2-124m", **shape)
    torch.manual_seed(0)
    model = Transformer(cfg)
    flops = model.flops_per_token(sh.block_size)
    train_cfg = dict(
        lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, micro_batch_size=s.micro_batch,
        seq_len=sh.block_size, warmup_steps=0, schedule="constant", eval_every=0, ckpt_every=0,
        grad_clip=1.0, device=s.device.type, dtype="bf16" if s.amp_dtype else "fp32",
        compile=s.compile,
    )  # fmt: skip

    def run(warmup: int, steps: int) -> float:
        tc = TrainConfig(max_steps=warmup + steps, **train_cfg)
        return time_lmforge(model, lm_loss, s.tokens_path, tc, warmup, flops)[0]

    return Contender(name, model.num_params(exclude_embeddings=True), flops, run)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of this GPU from lmforge's table (None on CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    return lmforge_peak_flops(torch.cuda.get_device_name(device))


def timed(c: Contender, s: Setup, warmup: int, steps: int) -> float:
    """One run of a contender; records the process's peak GPU memory during it.

    In the rounds that peak includes the other contenders' resident weights and optimizer
    state (a few GiB at gpt2-124m); in the sweep lmforge is alone.
    """
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    tok_s = c.run(warmup, steps)
    if s.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(s.device) / 2**30
        c.peak_mem_gib = round(max(peak, c.peak_mem_gib or 0.0), 2)
    return tok_s


def entry(c: Contender, peak: float | None) -> dict[str, Any]:
    tok_s = statistics.median(c.rounds) if c.rounds else None
    mfu = c.flops_per_token * tok_s / peak if peak and tok_s else None
    return {
        "params": c.params, "flops_per_token": c.flops_per_token,
        "tokens_per_s": round(tok_s) if tok_s else None, "mfu": round(mfu, 4) if mfu else None,
        "rounds": [round(x) for x in c.rounds], "peak_mem_gib": c.peak_mem_gib,
    }  # fmt: skip


def ratios(results: dict[str, dict]) -> dict[str, float]:
    pairs = [("lmforge", "nanogpt"), ("lmforge", "hf-llama"), ("lmforge-llama", "hf-llama")]
    out = {}
    for a, b in pairs:
        ta, tb = (results.get(k, {}).get("tokens_per_s") for k in (a, b))
        if ta and tb:
            out[f"{a}/{b}"] = round(ta / tb, 3)
    return out


def sweep(
    s: Setup, sizes: list[int], warmup: int, steps: int, known: dict | None
) -> Iterator[dict]:
    """lmforge alone at each micro-batch; a size that runs out of memory is noted and skipped."""
    peak = peak_flops(s.device)
    for mb in sizes:
        if known and mb == s.micro_batch:  # measured in the rounds already
            yield {"micro_batch": mb, **known, "from": "rounds"}
            continue
        c, row = None, {"micro_batch": mb, "error": "out of memory"}
        try:
            c = lmforge_contender(replace(s, micro_batch=mb))
            c.rounds.append(timed(c, s, warmup, steps))
            row = {"micro_batch": mb, **entry(c, peak)}
        except torch.OutOfMemoryError:
            pass  # the traceback (and the tensors its frames hold) is dropped here
        del c
        free_memory(s.device)
        yield row


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(report: dict[str, Any]) -> str:
    """The tables for docs/benchmarks.md."""
    names = {"nanogpt": "nanoGPT (model.py + train.py loop)", "hf-llama": "HF LlamaForCausalLM",
             "lmforge": "lmforge (gpt2-124m, our loop)", "lmforge-llama": "lmforge, Llama style"}  # fmt: skip
    pct = lambda m: f"{100 * m:.1f}%" if m else "n/a"  # noqa: E731
    lines = [
        f"Device: {report['device']}; torch {report['torch']}; dtype {report['dtype']}; "
        f"compile {report['compile']}; micro-batch {report['micro_batch']} x T {report['shape']['block_size']}.",
        f"FLOPs/token = {FORMULA}; peak {report['peak_flops'] or 'n/a'} FLOP/s.", "",
        "| contender | N (params) | tokens/s (median) | MFU | process peak GPU mem |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, r in report["results"].items():
        mem = f"{r['peak_mem_gib']} GiB" if r["peak_mem_gib"] else "n/a"
        lines.append(
            f"| {names[name]} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s'] or 0:,} | {pct(r['mfu'])} | {mem} |"
        )
    lines += [f"| **{k}** | | **{v:.2f}x** | | |" for k, v in report["ratios"].items()]
    if report.get("sweep"):
        lines += [
            "",
            "| lmforge micro-batch | tokens/s | MFU | peak GPU mem (GiB) |",
            "|---:|---:|---:|---:|",
        ]
        for r in report["sweep"]:
            if "error" in r:
                lines.append(f"| {r['micro_batch']} | {r['error']} | | |")
            else:
                lines.append(f"| {r['micro_batch']} | {r['tokens_per_s']:,} | {pct(r['mfu'])} | {r['peak_mem_gib'] or 'n/a'} |")  # fmt: skip
        best = report.get("best_sweep")
        if best:
            what = (
                f"MFU {pct(best['mfu'])}" if best["mfu"] else f"{best['tokens_per_s']:,} tokens/s"
            )
            lines.append(f"\nBest lmforge: {what} at micro-batch {best['micro_batch']}.")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-124m")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the shape's (12)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile every model (auto: on for CUDA, off for CPU)")  # fmt: skip
    p.add_argument(
        "--nanogpt-dir", type=Path, default=None, help="directory with nanoGPT's model.py"
    )
    p.add_argument("--skip", default="", help=f"comma-separated contenders to leave out: {','.join(CONTENDERS)}")  # fmt: skip
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before each timed run")
    p.add_argument("--steps", type=int, default=50, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--micro-batch-sweep", default="", help="e.g. 12,16,24,32 (lmforge only)")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    skip = {x for x in args.skip.split(",") if x}
    if unknown := skip - set(CONTENDERS):
        p.error(f"--skip: unknown {', '.join(sorted(unknown))}; valid: {', '.join(CONTENDERS)}")
    args.contenders = [c for c in CONTENDERS if c not in skip]
    if "nanogpt" in args.contenders and args.nanogpt_dir is None:
        p.error("nanogpt needs --nanogpt-dir DIR (with nanoGPT's model.py), or --skip nanogpt")
    args.sweep = [int(x) for x in args.micro_batch_sweep.split(",") if x]
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    compile_ = args.compile == "on" or (args.compile == "auto" and use_cuda)
    if compile_:  # `lmforge pretrain` compiles one model at one shape per process; here several
        # share a process, so each shape gets a static graph of its own, not a dynamic one
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = 64
    logging.getLogger("lmforge").setLevel(logging.WARNING)
    shape = SHAPES[args.shape]
    peak = peak_flops(device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
        "torch": torch.__version__, "lmforge": lmforge.__version__,
        "shape": {**shape.__dict__, "name": args.shape},
        "micro_batch": args.micro_batch or shape.micro_batch, "dtype": args.dtype,
        "compile": compile_, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
        "peak_flops": peak, "flops_formula": FORMULA, "results": {}, "ratios": {},
    }  # fmt: skip

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory() as tmp:
        tokens_path = Path(tmp) / "train.bin"
        write_tokens(tokens_path, min(shape.vocab_size, 50257), shape.tokens)  # GPT-2's real ids
        amp = torch.bfloat16 if args.dtype == "bf16" else None
        s = Setup(shape, report["micro_batch"], device, amp, compile_, tokens_path)
        build = {
            "nanogpt": lambda: nanogpt_contender(s, args.nanogpt_dir),
            "hf-llama": lambda: hf_llama_contender(s),
            "lmforge": lambda: lmforge_contender(s),
            "lmforge-llama": lambda: lmforge_contender(s, "lmforge-llama"),
        }
        contenders = [build[name]() for name in args.contenders]
        if "nanogpt" in args.contenders:  # which model.py was measured
            model_py = (args.nanogpt_dir / "model.py").read_bytes()
            report["nanogpt_model_py_sha256"] = hashlib.sha256(model_py).hexdigest()[:16]
        for r in range(args.rounds):
            for c in contenders:
                c.rounds.append(timed(c, s, args.warmup, args.steps))
            shown = "  ".join(f"{c.name} {c.rounds[-1]:,.0f} tok/s" for c in contenders)
            print(f"round {r + 1}: {shown}", flush=True)
            report["results"] = {c.name: entry(c, peak) for c in contenders}
            report["ratios"] = ratios(report["results"])
            save()
        if args.sweep:
            contenders.clear()  # free the other models before the larger batches
            c = None
            free_memory(device)
            report["sweep"] = []
            known = report["results"].get("lmforge")
            for row in sweep(s, args.sweep, args.warmup, args.steps, known):
                print(f"sweep micro-batch {row['micro_batch']}: {row}", flush=True)
                report["sweep"].append(row)
                ok = [r for r in report["sweep"] if r.get("tokens_per_s")]
                best = max(ok, key=lambda r: r["mfu"] or r["tokens_per_s"], default=None)
                report["best_sweep"] = best
                save()
    print(markdown(report))


if __name__ == "__main__":
    main()
