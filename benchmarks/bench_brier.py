"""BrierLM evaluation speed: CALM against a Llama with the same backbone and vocabulary (arXiv 2510.27688, section
"Likelihood-Free LM Evaluation"; docs/brierlm.md).

Both models have random weights (speed does not depend on them, apart from the lazy decoding noted below) and
are scored by the package's own `evaluate_brier` (Brier-1..4 and BrierLM over 3 seeds, the whole evaluation:
sampling, scoring, accumulation) on the same blocks, in the same process: CALM-M (configuration/calm-m.json,
128,257 tokens, K = 4; the heads' zero-initialised output layers re-drawn with `zero_init_layers`, so that
samples differ as in a trained model) and transformers' LlamaForCausalLM built from CALM-M's backbone config
(the paper's Transformer-M shape), scored by `score_causal_lm`. Rows timed:
- "CALM": the package's default path (`score_brier_seeds`: one backbone forward per batch for all seeds, lazy
  decoding: a sampled token is projected onto the 128k vocabulary only while it can still change an estimate);
- "CALM (per-seed, full decoding)" unless --no-calm-baseline: one backbone forward per batch and seed and every
  one of the first max_n tokens projected, i.e. the path before those two changes (same numbers);
- "Llama": `score_causal_lm` (one forward over the block, then 3 cached forwards over 2 x 1,020 continuation rows
  under a 4-D mask, inverse-CDF sampling from the 128k softmax).

Text: the WikiText-103 test set, a JSON-lines file of documents (--text, default .gpuh/eval.jsonl, the same file
as wikitext103_test_documents.jsonl), tokenised by `load_text_blocks` with the tokenizer in --tokenizer (default
.gpuh/tokenizer, 32,000 ids, all inside both vocabularies) into blocks of --block-size tokens (last block
right-padded, padding never scored), the first --max-blocks of them. --random-tokens N scores N uniform random ids
instead (no text, no tokenizer; the default of --tiny). The models are random, so the tokenizer does not matter
for speed; it only fixes how many tokens the text has.

Measured per model: one warm-up evaluation (--warmup-batches batches, all seeds) untimed, then the whole
evaluation between torch.cuda.synchronize() calls: --repeats times for the CALM rows (median; they are short) and
--llama-repeats times (default once) for the Llama. "tokens/s" = real (unpadded) tokens of the blocks x number of
seeds / seconds, the same numerator for every model; "positions/s" counts the scored positions (a CALM is scored
at chunk boundaries, every K-th token: 255 per full block against the Llama's 1,020). Peak memory is the peak of
allocated memory during the timed runs above what was allocated before them (both models' weights). The CALM
rows also report how many rows the vocabulary projection saw: lazy decoding skips tokens of samples that have
already missed both the target and the other sample, so its saving depends on how often samples hit, more on a
random model than on a trained one; the per-seed full-decoding row is the model-independent figure.

GPU (default: CALM-M shape, bf16, batch 8, 3 seeds, the first 128 of the 285 blocks of 1,024 tokens to stay
under ~90 s in all; --max-blocks 0 scores every block):
    python benchmarks/bench_brier.py --output bench_brier.json
CPU smoke test (tiny models, random tokens, seconds):
    python benchmarks/bench_brier.py --tiny --output /tmp/bench_brier_tiny.json
--profile adds, for one batch, the share of CALM's scoring time spent in each module (backbone, head,
autoencoder decoder, vocabulary projection) and torch.profiler's top operators of both models.
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
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_calm import CalmConfig, CalmForCausalLM  # noqa: E402
from modeling_calm.evaluation_calm import evaluate_brier, load_text_blocks  # noqa: E402
from modeling_calm.modeling_calm_brier import BRIER_LM_MAX_N, IGNORE_INDEX  # noqa: E402
from modeling_calm.modeling_calm_heads import zero_init_layers  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
CALM = "CALM"
CALM_BASELINE = "CALM (per-seed, full decoding)"
LLAMA = "Llama"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, random tokens (a smoke test)")
    parser.add_argument("--config", default=None, help="CALM config json (default calm-m.json, tiny.json with --tiny)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu (cpu with --tiny)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--text", default=None, help="JSON-lines (or .txt) evaluation text (default .gpuh/eval.jsonl)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --text (default .gpuh/tokenizer)")
    parser.add_argument("--random-tokens", type=int, default=None,
                        help="score this many uniform random ids instead of a text (the default of --tiny)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per block (1024; 64 with --tiny)")
    parser.add_argument("--max-blocks", type=int, default=None,
                        help="score the first N blocks only, 0 = all (default 128: ~45%% of WikiText-103 test)")
    parser.add_argument("--batch-size", type=int, default=None, help="blocks per batch (8; 2 with --tiny)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--warmup-batches", type=int, default=1, help="batches of the untimed warm-up evaluation")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed evaluations of each CALM row, median reported (they take well under a second)")
    parser.add_argument("--llama-repeats", type=int, default=1, help="timed evaluations of the Llama")
    parser.add_argument("--no-calm-baseline", action="store_true", help="skip the per-seed, full-decoding CALM row")
    parser.add_argument("--no-llama", action="store_true", help="skip the Llama")
    parser.add_argument("--profile", action="store_true", help="per-module time shares and top operators, one batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (and random tokens)")
    parser.add_argument("--output", default="bench_brier.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(
        config=str(ROOT / "configuration" / ("tiny.json" if tiny else "calm-m.json")),
        device="cpu" if tiny else ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype="float32" if tiny else "bfloat16",
        block_size=64 if tiny else 1024,
        max_blocks=0 if tiny else 128,
        batch_size=2 if tiny else 8,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.random_tokens is not None and (args.text is not None or args.tokenizer is not None):
        parser.error("--random-tokens replaces the text: pass either --random-tokens or --text/--tokenizer, not both")
    if args.random_tokens is None and args.text is None and tiny:
        args.random_tokens = 5 * args.block_size + args.block_size // 2  # 6 blocks, the last one half padding
    if args.random_tokens is None:
        args.text = args.text or str(ROOT / ".gpuh" / "eval.jsonl")
        args.tokenizer = args.tokenizer or str(ROOT / ".gpuh" / "tokenizer")
        for flag, path in (("--text", args.text), ("--tokenizer", args.tokenizer)):
            if not Path(path).exists():
                parser.error(f"{flag} {path} does not exist: pass the WikiText-103 test documents (.jsonl) and a "
                             "tokenizer folder, or --random-tokens N")
    for flag, value, low in (("--random-tokens", args.random_tokens, 1), ("--block-size", args.block_size, 1),
                             ("--max-blocks", args.max_blocks, 0), ("--batch-size", args.batch_size, 1),
                             ("--warmup-batches", args.warmup_batches, 0), ("--repeats", args.repeats, 1),
                             ("--llama-repeats", args.llama_repeats, 1)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def build_models(args):
    """CALM from the config and a Llama with the same backbone config and vocabulary, random weights."""
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    config = CalmConfig.from_json_file(args.config)
    calm = CalmForCausalLM(config)
    # The heads' output layer starts at zero (every sample would be the same latent): give it random weights so
    # the two samples of a position differ, as in a trained model.
    for layer in zero_init_layers(calm):
        torch.nn.init.normal_(layer.weight, std=config.initializer_range)
    calm = calm.to(device=args.device, dtype=dtype).eval()
    llama = None
    if not args.no_llama:
        backbone = config.backbone_config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype"):
            backbone.pop(key, None)
        backbone.update(tie_word_embeddings=False)
        llama = LlamaForCausalLM(LlamaConfig(**backbone)).to(device=args.device, dtype=dtype).eval()
    return calm, llama


class PerSeedFullDecoding:
    """The CALM scored the way it was before `score_brier_seeds` and lazy decoding: `evaluate_brier` sees only
    `score_brier`, so it runs one pass (one backbone forward per batch) per seed, and every one of the first
    max_n tokens of each sample is projected onto the vocabulary. Same numbers as the default path."""

    def __init__(self, model: CalmForCausalLM):
        self.model = model
        self.device = model.device

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def score_brier(self, input_ids, labels=None, max_n=BRIER_LM_MAX_N, generator=None, attention_mask=None):
        return self.model.score_brier(input_ids, labels=labels, max_n=max_n, generator=generator,
                                      attention_mask=attention_mask, lazy_decoding=False)


def load_blocks(args, vocab_size: int) -> tuple[dict, dict]:
    """The evaluation blocks {"input_ids", "labels", "attention_mask"} [N, T] and a description of them."""
    k = CalmConfig.from_json_file(args.config).patch_size
    if args.block_size % k:
        raise ValueError(f"--block-size {args.block_size} must be a multiple of the CALM's K={k} (whole chunks).")
    if args.random_tokens is not None:
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(3, vocab_size, (args.random_tokens,), generator=generator)
        num_blocks = -(-ids.numel() // args.block_size)
        padding = num_blocks * args.block_size - ids.numel()
        input_ids = torch.cat([ids, torch.zeros(padding, dtype=torch.long)]).view(num_blocks, args.block_size)
        attention_mask = torch.ones_like(input_ids)
        attention_mask.view(-1)[ids.numel():] = 0  # right padding of the last block, as load_text_blocks writes it
        blocks = {"input_ids": input_ids, "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
                  "attention_mask": attention_mask}
        source = {"source": "random ids", "num_tokens": args.random_tokens}
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        start = time.perf_counter()
        blocks = load_text_blocks(args.text, tokenizer, args.block_size, multiple_of=k)
        largest = int(blocks["input_ids"].max())
        if largest >= vocab_size:
            raise ValueError(
                f"The tokenizer {args.tokenizer} gives id {largest}, outside the models' vocabulary of {vocab_size} "
                f"ids: every id must be < vocab_size."
            )
        source = {"source": args.text, "tokenizer": args.tokenizer, "tokenizer_size": len(tokenizer),
                  "num_tokens": int(blocks["attention_mask"].sum()), "tokenize_seconds": time.perf_counter() - start}
    source["blocks_in_source"] = int(blocks["input_ids"].shape[0])
    if args.max_blocks:
        blocks = {key: value[: args.max_blocks] for key, value in blocks.items()}
    source.update(num_blocks=int(blocks["input_ids"].shape[0]), block_size=args.block_size,
                  tokens_scored_per_seed=int(blocks["attention_mask"].sum()))
    return blocks, source


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class RowCounter:
    """Counts the rows the CALM's vocabulary projection sees (a forward hook on the autoencoder's lm_head)."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.rows += inputs[0].numel() // inputs[0].shape[-1]

    def remove(self) -> None:
        self.handle.remove()


def measure(name: str, model, blocks: dict, args, repeats: int, counter_module=None) -> dict:
    """Warm-up evaluation (untimed), then the whole evaluation `repeats` times: median seconds, tokens/s,
    positions/s, peak memory (over all repeats)."""
    cuda = args.device.startswith("cuda")
    warm = {key: value[: args.warmup_batches * args.batch_size] for key, value in blocks.items()}
    synchronize(args.device)
    start = time.perf_counter()
    if args.warmup_batches:
        evaluate_brier(model, warm, batch_size=args.batch_size, seeds=args.seeds, progress=False)
    synchronize(args.device)
    warmup_seconds = time.perf_counter() - start

    counter = RowCounter(counter_module) if counter_module is not None else None
    baseline = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()  # both models' weights
    times, results = [], []
    for _ in range(repeats):
        synchronize(args.device)
        start = time.perf_counter()
        results.append(evaluate_brier(model, blocks, batch_size=args.batch_size, seeds=args.seeds, progress=False))
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30 if cuda else None
    if counter is not None:
        counter.remove()
    if any(r != results[0] for r in results):
        raise RuntimeError(f"{name}: repeated evaluations with the same seeds gave different numbers")
    result = results[0]
    seconds = statistics.median(times)
    tokens = int(blocks["attention_mask"].sum()) * len(args.seeds)
    row = {
        "model": name,
        "seconds": seconds,
        "all_seconds": times,
        "warmup_seconds": warmup_seconds,
        "tokens_per_second": tokens / seconds,
        "positions_per_second": result["num_positions"] * len(args.seeds) / seconds,
        "num_positions_per_seed": result["num_positions"],
        "peak_memory_gib": peak,
        "brier": {"mean": result["mean"], "std": result["std"]},
    }
    if counter is not None:
        row["vocab_projection_rows"] = counter.rows // repeats  # per evaluation
    print(f"  {name:<32} {row['tokens_per_second']:>12,.0f} tok/s  median {seconds:8.3f} s of {repeats}  "
          f"(warm-up {warmup_seconds:.2f} s)", flush=True)
    return row


def module_shares(calm: CalmForCausalLM, blocks: dict, args) -> dict:
    """Seconds of one warm batch of CALM scoring spent inside each module: between CUDA events recorded by forward
    hooks on the GPU (so GPU time, plus any wait for the host), wall time on the CPU."""
    cuda = args.device.startswith("cuda")
    head_modules = []  # the head runs through head.sample, not its forward: time its submodules
    for child in calm.head.children():
        head_modules.extend(child if isinstance(child, torch.nn.ModuleList) else [child])
    groups = {
        "backbone (transformer over chunks)": [calm.model],
        "input compression (chunk embedding)": [calm.chunk_proj],
        "generative head": head_modules,
        "autoencoder decoder": [calm.autoencoder.decoder],
        "vocabulary projection (lm_head + argmax input)": [calm.autoencoder.lm_head],
    }
    totals = {name: 0.0 for name in groups}
    stack: list = []
    spans: list = []

    def stamp():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def pre_hook(name):
        return lambda module, inputs: stack.append((name, stamp()))

    def post_hook(module, inputs, output):
        name, start = stack.pop()
        spans.append((name, start, stamp()))

    handles = []
    for name, modules in groups.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook))
    batch = {key: value[: args.batch_size] for key, value in blocks.items()}
    try:
        synchronize(args.device)
        start = time.perf_counter()
        evaluate_brier(calm, batch, batch_size=args.batch_size, seeds=args.seeds, progress=False)
        synchronize(args.device)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    for name, begin, end in spans:
        totals[name] += begin.elapsed_time(end) / 1000.0 if cuda else end - begin
    totals["other (noise, masks, estimator, host)"] = max(total - sum(totals.values()), 0.0)
    return {"total_seconds": total, "seconds": totals}


def top_operators(model, blocks: dict, args, limit: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    batch = {key: value[: args.batch_size] for key, value in blocks.items()}
    with profile(activities=activities) as prof:
        evaluate_brier(model, batch, batch_size=args.batch_size, seeds=args.seeds, progress=False)
        synchronize(args.device)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=limit)


def main(argv=None) -> None:
    args = parse_args(argv)
    calm, llama = build_models(args)
    blocks, data = load_blocks(args, calm.config.vocab_size)
    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "attention": {"calm_backbone": calm.model.config._attn_implementation,
                      "llama": None if llama is None else llama.config._attn_implementation},
    }
    print(f"{data['num_blocks']} blocks of {args.block_size} tokens ({data['tokens_scored_per_seed']:,} tokens) from "
          f"{data['source']}, seeds {args.seeds}, batch {args.batch_size}, {args.dtype} on {environment['device']}")
    results = []
    results.append(measure(CALM, calm, blocks, args, args.repeats, counter_module=calm.autoencoder.lm_head))
    if not args.no_calm_baseline:
        results.append(measure(CALM_BASELINE, PerSeedFullDecoding(calm), blocks, args, args.repeats,
                               counter_module=calm.autoencoder.lm_head))
    if llama is not None:
        results.append(measure(LLAMA, llama, blocks, args, args.llama_repeats))

    rows = {row["model"]: row for row in results}
    ratios = {}
    if LLAMA in rows:
        ratios["CALM / Llama tokens/s"] = rows[CALM]["tokens_per_second"] / rows[LLAMA]["tokens_per_second"]
        if CALM_BASELINE in rows:
            ratios["CALM (per-seed, full decoding) / Llama tokens/s"] = (
                rows[CALM_BASELINE]["tokens_per_second"] / rows[LLAMA]["tokens_per_second"]
            )
    if CALM_BASELINE in rows:
        ratios["CALM / CALM (per-seed, full decoding) tokens/s"] = (
            rows[CALM]["tokens_per_second"] / rows[CALM_BASELINE]["tokens_per_second"]
        )
        ratios["CALM vocabulary rows / full decoding rows"] = (
            rows[CALM]["vocab_projection_rows"] / max(rows[CALM_BASELINE]["vocab_projection_rows"], 1)
        )
        same = rows[CALM]["brier"] == rows[CALM_BASELINE]["brier"]
        if not same:
            print("NOTE: the two CALM paths gave different Brier numbers (argmax near-ties in low precision?)")
        ratios["CALM paths give identical Brier numbers"] = same
    profile = None
    if args.profile:
        profile = {"calm_module_seconds": module_shares(calm, blocks, args),
                   "calm_top_operators": top_operators(calm, blocks, args)}
        if llama is not None:
            profile["llama_top_operators"] = top_operators(llama, blocks, args)

    output = {"settings": vars(args), "environment": environment, "data": data, "results": results,
              "ratios": ratios, "profile": profile}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(output, indent=2))

    print("\n| model | tokens/s | positions/s | seconds | warm-up s | peak GiB over weights | vocab rows | BrierLM |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        peak = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "-"
        vocab = f"{row['vocab_projection_rows']:,}" if "vocab_projection_rows" in row else "-"
        print(f"| {row['model']} | {row['tokens_per_second']:,.0f} | {row['positions_per_second']:,.0f} | "
              f"{row['seconds']:.2f} | {row['warmup_seconds']:.2f} | {peak} | {vocab} | "
              f"{row['brier']['mean']['brier_lm']:.3f} |")
    if ratios:
        print("\n| ratio | value |")
        print("|---|---|")
        for name, value in ratios.items():
            print(f"| {name} | {value if isinstance(value, bool) else f'{value:.2f}'} |")
    if profile is not None:
        shares = profile["calm_module_seconds"]
        print(f"\nCALM, one batch of {args.batch_size} blocks, {len(args.seeds)} seeds: "
              f"{shares['total_seconds']:.4f} s")
        for name, value in shares["seconds"].items():
            print(f"  {name:<50} {value:.4f} s  {100 * value / max(shares['total_seconds'], 1e-12):5.1f} %")
        print("\nCALM top operators\n" + profile["calm_top_operators"])
        if "llama_top_operators" in profile:
            print("Llama top operators\n" + profile["llama_top_operators"])
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
