"""Training throughput and peak memory through the user's path: `CalmTrainer` (a `transformers.Trainer`) on a
CALM-M-shaped model, with `TrainingArguments(torch_compile=True, torch_compile_mode=...)`.

`bench_train.py` times a hand-written step against the Llama; this script checks that the `Trainer` a user runs
gets the same speed and memory, CUDA graphs included, and that it logs the energy loss's terms while doing so.

- Data: random token blocks (no `datasets` needed), 4 x 2,048 tokens a step by default, as in `bench_train.py`.
- Arguments as the paper's recipe: AdamW (fused on CUDA) lr 3e-4, betas (0.9, 0.95), weight decay 0.1, clip 1.0,
  bf16 mixed precision on CUDA.
- Timing: a callback synchronises the GPU at every step's start and end; tokens/s = tokens per step / median step
  time over the steps after `--warmup` (compilation and CUDA-graph recording happen in the warm-up).
- Memory: `torch.cuda.max_memory_allocated` and `max_memory_reserved` from before the model is built to the end
  (a peak taken after warm-up would miss the CUDA graphs' memory pool, which is allocated while recording).

    python benchmarks/bench_trainer.py --compile-mode reduce-overhead --json trainer.json      # H100
    python benchmarks/bench_trainer.py --tiny                                                  # CPU check
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback, TrainingArguments


HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # run from a checkout without installing the package; bench_train

from bench_train import COMPILE_MODES, GIB, add_size_arguments, resolve_sizes  # noqa: E402
from modeling_calm import CalmConfig, CalmForCausalLM, CalmTrainer  # noqa: E402


class RandomBlocks(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int, vocab: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.blocks = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index], "labels": self.blocks[index].clone()}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=("none", *COMPILE_MODES),
                        help="torch_compile_mode of TrainingArguments; none: no compilation")
    args = parser.parse_args(argv)
    resolve_sizes(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    config = CalmConfig.from_json_file(args.preset)
    if args.seq_len % config.patch_size:
        raise ValueError(f"--seq_len {args.seq_len} must be a multiple of K={config.patch_size}.")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = CalmForCausalLM(config)
    total_steps = args.warmup + args.steps
    dataset = RandomBlocks(total_steps * args.batch_size, args.seq_len, config.backbone_config.vocab_size)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, max_steps=total_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1, max_grad_norm=1.0,
            lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda,
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            torch_compile=args.compile_mode != "none",
            torch_compile_mode=None if args.compile_mode in ("none", "default") else args.compile_mode,
            logging_steps=max(1, total_steps // 4), save_strategy="no", report_to="none",
            dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = CalmTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
        trainer.train()
    measured = timer.times[args.warmup:] or timer.times
    median = statistics.median(measured)
    tokens_per_step = args.batch_size * args.seq_len
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "environment": {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "preset": Path(args.preset).name, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "warmup": args.warmup, "steps": args.steps, "compile_mode": args.compile_mode,
            "precision": "bf16 mixed precision (TrainingArguments(bf16=True))" if cuda else "fp32",
        },
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_per_step": tokens_per_step,
        "median_step_ms": 1000 * median,
        "tokens_per_second": tokens_per_step / median,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "logged": logs,
    }
    memory = f"{result['peak_memory_gib']:.2f} GiB" if cuda else "n/a"
    print(f"CalmTrainer, {result['environment']['preset']}, compile {args.compile_mode}: "
          f"{result['median_step_ms']:.1f} ms/step, {result['tokens_per_second']:,.0f} tokens/s, peak {memory}")
    if logs:
        print("last log:", {k: v for k, v in logs[-1].items() if k in ("loss", "fidelity", "diversity", "grad_norm")})
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
