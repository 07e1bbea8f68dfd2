"""Generation speed of the three generative heads (energy, flow, diffusion) on one backbone, eager decoding.

Every head is built on the same CALM config (CALM-M by default; random weights, the zero-initialised output layers
given random values so samples differ), in bf16 on CUDA, and generates at T = 1 from the same random prompts with
stop tokens off; eager decoding (`calm_compile=False`) so that no compilation time enters and the heads' own cost
(one network call for the energy head, `flow_num_steps` Euler steps, `diffusion_num_steps` DDIM steps) shows
directly. Median of --repeats timed runs after one warm-up.

    python benchmarks/bench_heads.py --output bench_heads.json                 # GPU
    python benchmarks/bench_heads.py --tiny --output /tmp/bench_heads.json     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_calm import CalmConfig, CalmForCausalLM  # noqa: E402
from modeling_calm.modeling_calm_heads import zero_init_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("energy", "flow", "diffusion")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="configuration/tiny.json on the CPU, few tokens")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="bench_heads.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.config = ROOT / "configuration" / ("tiny.json" if args.tiny else "calm-m.json")
    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.tiny else [1, 32])
    args.new_tokens = args.new_tokens or (16 if args.tiny else 256)
    return args


def build(config_path: Path, head_type: str, device: str, dtype) -> CalmForCausalLM:
    torch.manual_seed(0)
    config = CalmConfig.from_json_file(str(config_path))
    config.head_type = head_type
    for c in (config, config.autoencoder_config, config.backbone_config):
        c.eos_token_id = None
    model = CalmForCausalLM(config)
    for layer in zero_init_layers(model):
        torch.nn.init.normal_(layer.weight, std=config.initializer_range)
    model.generation_config.eos_token_id = None
    return model.to(device=device, dtype=dtype).eval()


def time_generate(model, prompts, new_tokens: int, repeats: int, device: str) -> list[float]:
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=new_tokens, calm_compile=False, seed=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up
    return [once() for _ in range(repeats)]


def main() -> None:
    args = parse_args()
    results = []
    for head_type in HEADS:
        model = build(args.config, head_type, args.device, args.dtype)
        steps = {"energy": 1, "flow": model.config.flow_num_steps, "diffusion": model.config.diffusion_num_steps}
        for batch in args.batch_sizes:
            prompts = torch.randint(3, model.config.vocab_size, (batch, 64 if not args.tiny else 8), device=args.device)
            times = time_generate(model, prompts, args.new_tokens, args.repeats, args.device)
            median = statistics.median(times)
            row = {"head": head_type, "head_network_calls_per_step": steps[head_type], "batch_size": batch,
                   "new_tokens": args.new_tokens, "median_s": median, "tokens_per_second": batch * args.new_tokens / median,
                   "ms_per_step": 1000 * median / (args.new_tokens / model.config.patch_size)}
            results.append(row)
            print(f"{head_type:10s} calls/step {row['head_network_calls_per_step']:3d} batch {batch:3d}  "
                  f"{row['tokens_per_second']:10,.0f} tok/s  {row['ms_per_step']:7.2f} ms/step")
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    environment = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   "torch": torch.__version__, "transformers": transformers.__version__, "config": args.config.name,
                   "dtype": str(args.dtype), "decoding": "eager (calm_compile=False), T=1"}
    Path(args.output).write_text(json.dumps({"environment": environment, "results": results}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
