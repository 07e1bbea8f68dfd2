"""Training throughput and peak memory: a CALM-M-shaped model (energy loss) vs the same-backbone Llama, one run.

Both models take the same training step on random tokens (4 x 2,048 tokens by default), measured after warm-up:

    zero_grad -> bf16 autocast forward with labels -> backward -> clip_grad_norm_(1.0) -> AdamW step

- Precision: bf16 autocast with float32 master weights, gradients and AdamW states (what `TrainingArguments(bf16=
  True)` does); the same for both models. The frozen autoencoder stays float32 like the rest.
- Optimiser: AdamW (fused on CUDA), lr 3e-4, betas (0.9, 0.95), weight decay 0.1, as in the paper's recipe.
- Attention: PyTorch SDPA (flash kernels on the GPU) for both backbones.
- `--compile` (default on CUDA): `torch.compile` of each whole model (`model.compile()`, mode from
  `--compile-mode`). CALM's training forward (compression, backbone, head, energy score) is one graph with no
  break: the loss covers every position with weights instead of selecting the valid ones (no host sync), which
  also allows `--compile-mode reduce-overhead` (CUDA graphs).
- Reported: median step time over the measured steps, tokens/s = tokens per step / median step time, and peak
  memory = `torch.cuda.max_memory_allocated` from before the model is built to the last step (weights, gradients,
  AdamW states, warm-up and compilation included), with `max_memory_reserved` next to it. The peak must cover the
  warm-up: under `reduce-overhead` the CUDA graphs' memory pool is allocated while the graphs are recorded, and
  replays allocate nothing, so a peak taken over the replayed steps alone leaves activations and gradients out.
  On the CPU memory is not measured.
Needs only torch and transformers (no `datasets`).

H100 (the reference numbers of the authors' code, one run: CALM 83,000 tokens/s at 8.4 GiB, Llama 90,600 at 20.2):
    python benchmarks/bench_train.py --json bench_train.json
CPU smoke run (tiny preset, a minute):
    python benchmarks/bench_train.py --tiny
"""

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import LlamaForCausalLM


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from modeling_calm import CalmConfig, CalmForCausalLM  # noqa: E402


GIB = 2**30
# The project's target for CALM-M vs the same-backbone Llama in one H100 run (the authors' code reaches 0.92x at
# 8.4 GiB: 83,000 vs 90,600 tokens/s).
TARGET_SPEEDUP = 2.5
TARGET_MEMORY_GIB = 8.4


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# (tiny, full) defaults of the step's size, shared with bench_trainer.py.
SIZE_DEFAULTS = dict(batch_size=(2, 4), seq_len=(256, 2048), warmup=(3, 10), steps=(5, 30))


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --tiny, --batch_size, --seq_len, --warmup, --steps, --json (resolved by `resolve_sizes`)."""
    parser.add_argument("--preset", default=str(REPO_ROOT / "configuration" / "calm-m.json"))
    parser.add_argument("--tiny", action="store_true", help="configuration/tiny.json, 2 x 256 tokens (CPU test)")
    parser.add_argument("--batch_size", type=int, default=None, help="sequences per step (default 4; tiny 2)")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default 2048; tiny 256)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10; tiny 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; tiny 5)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def resolve_sizes(args: argparse.Namespace) -> None:
    """Fills the defaults (tiny or full) and rejects sizes no step can have."""
    if args.tiny:
        args.preset = str(REPO_ROOT / "configuration" / "tiny.json")
    for name, (tiny, full) in SIZE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
        least = 0 if name == "warmup" else 1
        if getattr(args, name) < least:
            raise ValueError(f"--{name} must be >= {least}, got {getattr(args, name)}.")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile both models (default: on CUDA)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode; reduce-overhead = CUDA graphs (CALM's training step is one graph "
                        "with static shapes)")
    parser.add_argument("--models", default="calm,llama", help="comma-separated subset of calm,llama")
    args = parser.parse_args()
    resolve_sizes(args)
    if args.compile is None:
        args.compile = torch.cuda.is_available()
    return args


def build(name: str, config: CalmConfig) -> torch.nn.Module:
    if name == "calm":
        return CalmForCausalLM(config)
    # The reference: the very same backbone config (vocabulary 128,257 for the official presets) with an LM head.
    return LlamaForCausalLM(config.backbone_config)


def measure(name: str, config: CalmConfig, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model = build(name, config).to(device).train()
    if args.compile:
        model.compile(mode=None if args.compile_mode == "default" else args.compile_mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    vocab = config.backbone_config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), device=device) for _ in range(4)]

    def step(ids: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return loss

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        loss = step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {
        "model": name,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "tokens_per_step": args.batch_size * args.seq_len,
        "median_step_ms": 1000 * median,
        "tokens_per_second": args.batch_size * args.seq_len / median,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "final_loss": loss.item(),
    }
    del model, optimizer, trainable, batches, loss
    # Compiled code and CUDA-graph pools are process-global: drop them so the next model starts from nothing.
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = CalmConfig.from_json_file(args.preset)
    if args.seq_len % config.patch_size:
        raise ValueError(f"--seq_len {args.seq_len} must be a multiple of K={config.patch_size}.")
    environment = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "preset": Path(args.preset).name,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "precision": "bf16 autocast, fp32 master weights and AdamW states",
    }
    results = []
    for name in args.models.split(","):
        print(f"measuring {name} ({args.warmup} warm-up + {args.steps} timed steps)...", file=sys.stderr, flush=True)
        try:
            results.append(measure(name, config, args, device))
        except Exception as error:  # report the other model anyway; the traceback says what failed
            traceback.print_exc()
            results.append({"model": name, "error": f"{type(error).__name__}: {error}"[:500]})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(", ".join(f"{k}={v}" for k, v in environment.items()))
    print(f"{'model':<6} {'trainable':>11} {'tokens/step':>11} {'step ms':>9} {'tokens/s':>11} {'peak GiB':>9} "
          f"{'reserved':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['model']:<6} failed: {r['error']}")
            continue
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        reserved = f"{r['peak_reserved_gib']:.2f}" if r["peak_reserved_gib"] is not None else "n/a"
        print(f"{r['model']:<6} {r['trainable_parameters'] / 1e6:>10.1f}M {r['tokens_per_step']:>11} "
              f"{r['median_step_ms']:>9.1f} {r['tokens_per_second']:>11,.0f} {memory:>9} {reserved:>9}")
    summary = {"environment": environment, "results": results}
    by_name = {r["model"]: r for r in results if "error" not in r}
    if {"calm", "llama"} <= set(by_name):
        speedup = by_name["calm"]["tokens_per_second"] / by_name["llama"]["tokens_per_second"]
        summary["calm_over_llama_tokens_per_second"] = speedup
        print(f"CALM / Llama tokens/s: {speedup:.2f}x")
        memory = by_name["calm"]["peak_memory_gib"]
        if memory is not None and not args.tiny:
            met = speedup >= TARGET_SPEEDUP and memory <= TARGET_MEMORY_GIB
            summary["target_met"] = met
            print(f"target (CALM >= {TARGET_SPEEDUP}x the Llama's tokens/s, <= {TARGET_MEMORY_GIB} GiB): "
                  f"{'met' if met else 'NOT met'}")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
