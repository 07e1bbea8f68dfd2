"""Where a CALM decoding step spends its time: each part timed alone, and the kernels of one step.

CALM-M shape (configuration/calm-m.json, bf16, random weights with the zero-initialised head layers re-randomised,
as in bench_generate.py). For each (batch, N) it times, by replaying a CUDA graph of the part (so launch gaps do
not count; on the CPU the part runs eagerly) and taking the median of --repeats replays:
- the backbone advancing one chunk over a StaticCache of --cache-chunks (the fill level is reset before each
  replay), the input compression (`embed_chunks`) included;
- the head's sample for B (T = 1) or B*N (approximate method) hidden states;
- `decode_tokens` of B or B*N latents (autoencoder decoder + 128k-way projection + argmax), and its projection
  alone (GEMM, no argmax) for the same rows;
- the approximate method's selection (`selection_probabilities` + `pick_by_uniform`) over [B, N, K] candidates;
- a whole decoding step (`_calm_step`), for comparison with the sum.
Then, unless --no-profile, torch.profiler over a few eager steps: kernels per step and the kernels with the most
GPU time. The two floors (bytes of weights read per step / bandwidth; FLOPs / bf16 matrix rate) are printed too.

    python benchmarks/profile_decoding.py --output profile.json                    # GPU
    python benchmarks/profile_decoding.py --tiny --output /tmp/profile_tiny.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.cache_utils import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_calm import CalmConfig, CalmForCausalLM  # noqa: E402
from modeling_calm.modeling_calm_heads import zero_init_layers  # noqa: E402
from modeling_calm.modeling_calm_sampling import pick_by_uniform, selection_probabilities  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Leads for the floors (measured on this workplace's H200, see /work/.library/device KINDS.md and H200.md).
BANDWIDTH = 4.8e12
BF16_RATE = 7.9e14


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=None, help="BATCHxN pairs, N=1 for T = 1 (e.g. 1x1 32x200)")
    parser.add_argument("--cache-chunks", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--output", default="profile_decoding.json")
    args = parser.parse_args()
    if args.shapes is None:
        args.shapes = ["1x1", "2x4"] if args.tiny else ["1x1", "1x200", "32x1", "32x200"]
    shapes = []
    for text in args.shapes:
        try:
            batch, num = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {text!r} is not BATCHxN (two positive integers, e.g. 32x200)") from None
        if batch < 1 or num < 1:
            raise SystemExit(f"--shapes: {text!r} needs a positive batch and N")
        shapes.append((batch, num))
    args.shapes = shapes
    args.cache_chunks = args.cache_chunks or (16 if args.tiny else 192)
    args.repeats = args.repeats or (3 if args.tiny else 50)
    return args


def build(tiny: bool, device: str):
    torch.manual_seed(0)
    config = CalmConfig.from_json_file(str(ROOT / "configuration" / ("tiny.json" if tiny else "calm-m.json")))
    model = CalmForCausalLM(config)
    for layer in zero_init_layers(model):
        torch.nn.init.normal_(layer.weight, std=config.initializer_range)
    dtype = torch.float32 if tiny else torch.bfloat16
    return model.to(device=device, dtype=dtype).eval()


def timer(device: str, repeats: int):
    """time(fn, before=None) -> median ms of fn over `repeats` (a CUDA graph replay on CUDA)."""
    cuda = device.startswith("cuda")

    def time_it(fn, before=None):
        if not cuda:
            times = []
            for _ in range(repeats):
                if before:
                    before()
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (libraries' lazy state) on the recording stream
            if before:
                before()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        if before:
            before()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = []
        for _ in range(repeats):
            if before:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return time_it


@torch.no_grad()
def main():
    args = parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    model = build(args.tiny, device)
    config, k = model.config, model.config.patch_size
    time_it = timer(device, args.repeats)
    weights = {
        "backbone": sum(p.numel() * p.element_size() for p in model.model.parameters()),
        "head": sum(p.numel() * p.element_size() for p in model.head.parameters()),
        "autoencoder decoder + projection": sum(p.numel() * p.element_size() for p in model.autoencoder.decoder.parameters())
        + model.autoencoder.lm_head.weight.numel() * model.autoencoder.lm_head.weight.element_size(),
    }
    rows, kernels = [], []
    for batch, num in args.shapes:
        cands = batch * num
        cache = StaticCache(config=model.model.config, max_cache_len=args.cache_chunks)
        prompt = torch.randint(3, config.vocab_size - 1, (batch, 8 * k), device=device)
        out = model.model(inputs_embeds=model.embed_chunks(prompt), use_cache=True, **{model._cache_kwarg: cache})
        hidden = out.last_hidden_state[:, -1].contiguous()
        fill = 8

        def reset():
            for layer in cache.layers:
                layer.cumulative_length.fill_(fill)

        tokens = torch.randint(3, config.vocab_size - 1, (batch, k), device=device)
        position = torch.full((batch, 1), fill, dtype=torch.long, device=device)
        noise_t1 = model.head.draw_noise((batch,), device=device)
        noise = model.head.draw_noise((batch, num), device=device)
        uniforms = torch.rand(batch, device=device)
        expanded = hidden[:, None].expand(batch, num, -1).reshape(cands, -1)
        latents = model.head.sample(expanded, noise=noise.reshape(cands, -1))
        candidates = model.autoencoder.decode_tokens(latents[:, None]).view(batch, num, k)
        decoded = model.autoencoder.decoder(latents.to(model.dtype)).reshape(-1, config.autoencoder_config.hidden_size)
        temperature = 1.0 if num == 1 else 0.5
        step_noise = noise_t1 if num == 1 else noise
        step_uniforms = None if num == 1 else uniforms
        parts = {
            "backbone + embed_chunks (one chunk)": (lambda: model._calm_advance(tokens, cache, position, None), reset),
            "head sample": (lambda: model.head.sample(expanded, noise=noise.reshape(cands, -1)), None),
            "decode_tokens": (lambda: model.autoencoder.decode_tokens(latents[:, None]), None),
            "  of which projection + argmax (argmax_tokens)": (lambda: model.autoencoder.argmax_tokens(decoded), None),
        }
        if num > 1:
            parts["selection (multiplicities, probabilities, pick)"] = (
                lambda: pick_by_uniform(selection_probabilities(candidates, temperature), uniforms), None)
        parts["whole step (_calm_step)"] = (
            lambda: type(model)._calm_step(model, cache, hidden, step_noise, step_uniforms, position, None, temperature),
            reset)
        for name, (fn, before) in parts.items():
            ms = time_it(fn, before)
            rows.append({"batch": batch, "N": num, "part": name, "ms": ms})
            print(f"batch {batch:>3} N {num:>3}  {name:<52} {ms:8.3f} ms", flush=True)
        flops = 2 * cands * k * config.autoencoder_config.hidden_size * config.vocab_size
        rows.append({"batch": batch, "N": num, "part": "floor: projection FLOPs / bf16 rate", "ms": flops / BF16_RATE * 1e3})
        read = weights["backbone"] + weights["head"] + weights["autoencoder decoder + projection"]
        rows.append({"batch": batch, "N": num, "part": "floor: weights read once / bandwidth", "ms": read / BANDWIDTH * 1e3})
        if not args.no_profile and device == "cuda":
            from torch.profiler import ProfilerActivity, profile

            steps = 5
            reset()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    type(model)._calm_step(model, cache, hidden, step_noise, step_uniforms, position, None, temperature)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            total = sum(e.self_device_time_total for e in events)
            count = sum(e.count for e in events)
            top = sorted(events, key=lambda e: -e.self_device_time_total)[:12]
            kernels.append({
                "batch": batch, "N": num, "kernels_per_step": count / steps, "gpu_ms_per_step": total / steps / 1e3,
                "top": [{"kernel": e.key[:120], "calls_per_step": e.count / steps,
                         "share": e.self_device_time_total / total} for e in top],
            })
            print(f"  eager step: {count / steps:.0f} kernels, {total / steps / 1e3:.3f} ms GPU time per step")
            for e in top:
                print(f"    {e.self_device_time_total / total:6.1%}  x{e.count / steps:5.1f}  {e.key[:100]}")
    environment = {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__,
                   "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"environment": environment, "weights_bytes": weights, "parts": rows,
                                             "kernels": kernels}, indent=2))
    print("\n| batch | N | part | ms |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['N']} | {row['part']} | {row['ms']:.3f} |")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
