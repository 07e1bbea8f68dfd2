"""The vocabulary projection + argmax of decoding, on CUDA: torch's product then `argmax` (the unaligned full
product, and the aligned split used without Triton) against the fused Triton kernel of
`modeling_calm.modeling_calm_kernels` at several launch configurations.

Shapes: CALM-M's decoder width 512 and Llama 3's vocabulary 128,257, bf16; rows = decoder states per step (batch 1
at T = 1: 4; batch 1 with N = 200 candidates: 800; batch 8 / 32 with N = 200: 6,400 / 25,600). Times are medians of
CUDA-event timings after warm-up; `agree` is the share of rows whose token equals torch's full argmax.

    python benchmarks/bench_projection_argmax.py --output bench_projection_argmax.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_calm.modeling_calm_autoencoder import split_argmax_projection  # noqa: E402
from modeling_calm.modeling_calm_kernels import _launch, _launch_config, projection_argmax  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` runs (two warm-up runs first)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def blocked(fn, hidden: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    return torch.cat([fn(part) for part in hidden.split(rows_per_block)])


def candidate_configs(rows: int, hidden_size: int):
    """Launch configurations worth trying for `rows`: (block_m, block_n, block_k, warps, stages, programs per SM,
    packed epilogue)."""
    packed = [True, False]
    if rows <= 16:
        grid = itertools.product([16], [64, 128], [64, 128], [4], [3, 4], [8], packed)
    elif rows <= 1024:
        grid = itertools.product([32, 64], [64, 128], [64], [4], [3], [4, 8], packed)
    else:
        grid = itertools.chain(
            itertools.product([128], [128, 256], [64], [4, 8], [3, 4], [8, 16], packed),
            itertools.product([256], [128], [64], [8], [3], [8], packed),
            itertools.product([128], [128], [32], [8], [4], [8], packed),
        )
    for config in grid:
        if hidden_size % config[2] == 0:
            yield config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 800, 6_400, 25_600])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=128_257)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-sweep", action="store_true", help="only the default launch configuration")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (0.05 * torch.randn(args.vocab_size, args.hidden_size, device="cuda", generator=gen)).bfloat16()
    aligned = args.vocab_size - args.vocab_size % 64
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    for rows in args.rows:
        hidden = torch.randn(rows, args.hidden_size, device="cuda", generator=gen).bfloat16()
        flops = 2 * rows * args.hidden_size * args.vocab_size
        per_block = max(1, 2**27 // args.vocab_size)  # the row blocks of `argmax_tokens` without the kernel
        reference = blocked(lambda part: F.linear(part, weight).argmax(-1), hidden, per_block)
        entry = {
            "torch_full_ms": timed(lambda: blocked(lambda p: F.linear(p, weight).argmax(-1), hidden, per_block),
                                   args.repeats),
            "torch_aligned_split_ms": timed(
                lambda: blocked(lambda p: split_argmax_projection(p, weight, None, aligned), hidden, per_block),
                args.repeats,
            ),
            "fused_default_config": list(_launch_config(rows, args.hidden_size)),
            "fused_default_ms": timed(lambda: projection_argmax(hidden, weight), args.repeats),
            "fused_default_agree": (projection_argmax(hidden, weight) == reference).float().mean().item(),
            "floor_ms": {"compute_790_tflops": flops / 790e9, "weights_once_4.8_tbs": weight.numel() * 2 / 4.8e9},
            "sweep": [],
        }
        print(f"rows {rows}: torch {entry['torch_full_ms']:.3f} ms, aligned split {entry['torch_aligned_split_ms']:.3f}"
              f" ms, fused default {entry['fused_default_ms']:.3f} ms ({flops / entry['fused_default_ms'] / 1e9:.0f}"
              f" TFLOP/s), agree {entry['fused_default_agree']:.5f}", flush=True)
        if not args.no_sweep:
            for config in candidate_configs(rows, args.hidden_size):
                try:
                    ms = timed(lambda: _launch(hidden, weight, *config), args.repeats)
                    agree = (_launch(hidden, weight, *config) == reference).float().mean().item()
                except Exception as error:  # e.g. out of shared memory for this tile size
                    entry["sweep"].append({"config": list(config), "error": type(error).__name__})
                    continue
                entry["sweep"].append({"config": list(config), "ms": ms, "agree": agree})
            ok = [item for item in entry["sweep"] if "ms" in item]
            ok.sort(key=lambda item: item["ms"])
            for item in ok[:5]:
                print(f"    {item['config']}: {item['ms']:.3f} ms ({flops / item['ms'] / 1e9:.0f} TFLOP/s), "
                      f"agree {item['agree']:.5f}", flush=True)
        results["rows"][str(rows)] = entry
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
