"""Real results on real text: tokenizer -> autoencoder -> CALM and a same-backbone Transformer baseline.

Stages (each resumable: a finished stage leaves `WORK/<stage>/done.json` and is skipped on the next call):
  ae        train the autoencoder for --ae_seconds of GPU time (transformers.Trainer)
  ae_eval   token accuracy on the evaluation text: z = posterior mean, z sampled, z = mean + N(0, sigma^2)
            for sigma in 0, 0.1, 0.2, 0.3, 0.5; active latent dimensions; mean posterior std
  calm      train a CALM (K from the autoencoder) for --lm_seconds, BrierLM on an eval subset every
            --curve_every seconds of training time (the compute curve)
  baseline  the same for a LlamaForCausalLM with the same backbone config, tokenizer and data
  eval      BrierLM of both final models on the whole evaluation text over --seeds
  eval_heldout  the same on in-domain held-out text (DATA/heldout.jsonl, written by prepare_data.py
            --holdout_every N); skipped when there is none
  samples   continuations of evaluation prompts at T = 1, 0.5, 0.33 (--temperatures) from every trained model
  upcycle   (not a default stage) a CALM upcycled with `CalmForCausalLM.from_causal_lm` from the baseline's checkpoint
            at --donor_seconds X (saved by the baseline stage during its --lm_seconds run), trained for the rest of
            --lm_seconds, so that donor + CALM get the same training time as each model trained from scratch
  summary   (not a default stage, never skipped) the equal-compute comparison of the three arms, Transformer / CALM
            from scratch / Transformer then upcycled CALM, as results.json["upcycling"] and a printed table

Upcycling at equal compute (issue 19): `--lm_seconds 120 --donor_seconds 60 --stages ae baseline upcycle calm
eval_heldout eval samples summary`; eval and samples score the upcycled CALM too (as "upcycle").

Ablations of the CALM (issue 19, item 3: learning rate, warm-up, N, M, head depth, noise size, K, head type) run
through ablations.py, which imports this file's parser, stages and FLOP counts.

A second CALM (e.g. K = 2) can share a finished run's baseline: `--patch_size 2 --reuse_baseline WORK_OF_K4`
links that baseline into the new WORK folder and skips its training.

All figures land in WORK/results.json. The run is designed for the GPU machine (no `datasets` needed: the training
corpus arrives as the uint16 array written by prepare_data.py), and runs on a CPU with --tiny in a minute.

    python benchmarks/real_results/pipeline.py --data .gpu --work /root/calm_run            # H100
    python benchmarks/real_results/pipeline.py --data .gpu --work /tmp/calm_tiny --tiny     # CPU check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

# Run from a checkout without installing the package (the GPU machine has no install of it).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modeling_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmForCausalLM  # noqa: E402
from modeling_calm.evaluation_calm import evaluate_brier, load_text_blocks  # noqa: E402


STAGES = ("ae", "ae_eval", "calm", "baseline", "eval", "eval_heldout", "samples")  # the default run
EXTRA_STAGES = ("upcycle", "summary")
MODELS = ("calm", "baseline", "upcycle")  # WORK/<name>/model; eval and samples score those that exist
NOISE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5)
TEMPERATURES = (1.0, 0.5, 0.33)
CALM_HEAD = dict(noise_size=64, num_mlp_layers=4, num_samples=8, num_target_samples=100)
LM_WARMUP = 200  # warm-up steps of the language models (then a constant learning rate)


# ------------------------------------------------------------------------------------------------------------------
# Data and bookkeeping
# ------------------------------------------------------------------------------------------------------------------
class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of a flat token array (documents start with BOS)."""

    def __init__(self, ids: np.ndarray, block_size: int):
        self.ids, self.block_size = ids, block_size
        self.count = len(ids) // block_size
        if self.count == 0:
            raise ValueError(f"{len(ids)} tokens make no block of {block_size}")

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        start = index * self.block_size
        block = torch.from_numpy(self.ids[start : start + self.block_size].astype(np.int64))
        return {"input_ids": block, "labels": block.clone()}


class TimeBudget(TrainerCallback):
    """Stops training after `seconds` of training time; every `curve_every` seconds calls `probe(model, step)`,
    whose time is not counted (evaluation is not training compute); once, at the first step end at or past
    `mark_seconds`, calls `on_mark(model, step, train_time)` (not counted either: e.g. saving a checkpoint)."""

    def __init__(self, seconds: float, curve_every: float | None = None, probe=None, mark_seconds=None, on_mark=None):
        self.seconds, self.curve_every, self.probe = seconds, curve_every, probe
        self.mark_seconds, self.on_mark = mark_seconds, on_mark
        self.train_time, self.last, self.next_probe, self.step_times = 0.0, None, curve_every, []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.last
        self.train_time += elapsed
        self.step_times.append(elapsed)
        if self.probe is not None and self.next_probe is not None and self.train_time >= self.next_probe:
            self.probe(model, state.global_step, self.train_time)
            self.next_probe += self.curve_every
        if self.on_mark is not None and self.train_time >= self.mark_seconds:
            self.on_mark(model, state.global_step, self.train_time)
            self.on_mark = None
        if self.train_time >= self.seconds:
            control.should_training_stop = True
        return control


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def state_checksum(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes and float32 values, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def update_results(work: Path, key: str, value) -> None:
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = value
    write_json(path, results)


def environment() -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def training_arguments(work: Path, args, lr: float, batch_size: int, warmup: int, max_steps: int = 10**7,
                       workers: int | None = None, logging_steps: int = 50) -> TrainingArguments:
    """The pipeline's optimizer and schedule (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, constant lr after `warmup`
    steps, bf16 on a GPU). `max_steps`: 10**7 leaves the stop to a time budget; `workers`: data loader processes
    (default 2 on a GPU, 0 on a CPU)."""
    if workers is None:
        workers = 2 if torch.cuda.is_available() else 0
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=warmup,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_steps=max_steps,
        bf16=torch.cuda.is_available(),
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=workers,
        disable_tqdm=True,
        seed=args.seed,
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
    )


# ------------------------------------------------------------------------------------------------------------------
# FLOPs (Kaplan et al. convention: 6 x matmul parameters per trained position, plus 12 x layers x context x width
# for attention scores; embeddings lookups are free)
# ------------------------------------------------------------------------------------------------------------------
def _matmul_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def calm_flops_per_token(model: CalmForCausalLM, context_chunks: int) -> float:
    config, k = model.config, model.config.patch_size
    backbone = _matmul_params(model.model) + _matmul_params(model.chunk_proj)
    # The energy head runs S = num_samples times per position (its conditioning projection, counted S times too,
    # runs once: an overcount of about 4 % of the head at the default sizes); the flow and diffusion heads' training
    # loss runs the network once per position (one time or noise level per position).
    head = _matmul_params(model.head) * (config.num_samples if config.head_type == "energy" else 1)
    encoder = 2 * _matmul_params(model.autoencoder.encoder)  # forward only: target posteriors
    layers, width = config.backbone_config.num_hidden_layers, config.hidden_size
    per_position = 6 * (backbone + head) + encoder + 12 * layers * context_chunks * width
    return per_position / k


def llama_flops_per_token(model: LlamaForCausalLM, context: int) -> float:
    config = model.config
    return 6 * _matmul_params(model) + 12 * config.num_hidden_layers * context * config.hidden_size


# ------------------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------------------
def stage_ae(work, args, tokenizer, train_ids):
    config = CalmAutoencoderConfig(
        vocab_size=len(tokenizer), hidden_size=args.ae_hidden, intermediate_size=args.ae_intermediate,
        latent_size=args.latent_size, patch_size=args.patch_size, num_encoder_layers=2, num_decoder_layers=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = CalmAutoencoder(config)
    budget = TimeBudget(args.ae_seconds)
    max_steps = getattr(args, "ae_steps", None) or 10**7  # --ae_steps: also stop at this many steps
    trainer = Trainer(
        model=model, args=training_arguments(work / "ae", args, args.ae_lr, args.ae_batch, 200, max_steps=max_steps),
        train_dataset=TokenBlocks(train_ids, args.block_size), callbacks=[budget],
    )
    result = trainer.train()
    model.save_pretrained(work / "ae" / "model")
    tokens = result.global_step * args.ae_batch * args.block_size
    log = [r for r in trainer.state.log_history if "loss" in r]
    summary = {"steps": result.global_step, "tokens": tokens, "epochs": tokens / len(train_ids),
               "train_seconds": budget.train_time,
               "tokens_per_second": tokens / budget.train_time, "final_loss": log[-1]["loss"] if log else None,
               "parameters": sum(p.numel() for p in model.parameters()), "log": log}
    write_json(work / "ae" / "done.json", summary)
    update_results(work, "autoencoder_training", {k: v for k, v in summary.items() if k != "log"})


@torch.no_grad()
def stage_ae_eval(work, args, tokenizer, eval_blocks):
    model = CalmAutoencoder.from_pretrained(work / "ae" / "model").to(args.device).eval()
    ids = eval_blocks["input_ids"].to(args.device)
    labels = eval_blocks["labels"].to(args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)

    def accuracy(**kwargs):
        hits = total = 0
        for start in range(0, len(ids), 16):
            out = model(ids[start : start + 16], labels=labels[start : start + 16], generator=generator, **kwargs)
            valid = labels[start : start + 16] != -100
            hits += (out.logits.argmax(-1)[valid] == labels[start : start + 16][valid]).sum().item()
            total += valid.sum().item()
        return hits / total

    means, stds = [], []
    for start in range(0, len(ids), 16):
        mean, log_std = model.encode(ids[start : start + 16])
        means.append(mean.reshape(-1, mean.shape[-1]).float())
        stds.append(log_std.exp().reshape(-1, mean.shape[-1]).float())
    means, stds = torch.cat(means), torch.cat(stds)
    # Active units (Burda et al. 2016): dimensions whose posterior mean varies across chunks (variance > 0.01).
    active = int((means.var(0) > 0.01).sum())
    results = {
        "accuracy_posterior_mean": accuracy(sample_latents=False),
        "accuracy_posterior_sample": accuracy(sample_latents=True),
        "accuracy_mean_plus_noise": {str(s): accuracy(sample_latents=False, latent_noise_std=s) for s in NOISE_LEVELS},
        "active_dimensions": active,
        "latent_size": means.shape[-1],
        "mean_posterior_std": stds.mean().item(),
        "eval_tokens": int((labels != -100).sum()),
    }
    write_json(work / "ae_eval" / "done.json", results)
    update_results(work, "autoencoder_eval", results)


def _curve_probe(curve, eval_blocks, args, flops_per_token, tokens_per_step, seeds=(0,), label="curve"):
    """`probe(model, step, train_time)`: BrierLM of the first --curve_blocks evaluation blocks over `seeds` (mean;
    with several seeds also their std and the pooled estimate), appended to `curve` with the step's tokens and
    training FLOPs (step x tokens per step x FLOPs per token)."""
    subset = {k: v[: args.curve_blocks] for k, v in eval_blocks.items()}

    def probe(model, step, train_time):
        was_training = model.training
        model.eval()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            result = evaluate_brier(model, subset, batch_size=args.eval_batch, seeds=tuple(seeds), progress=False)
        model.train(was_training)
        tokens = step * tokens_per_step
        point = {"step": step, "train_seconds": train_time, "tokens": tokens, "flops": tokens * flops_per_token,
                 "brier_lm": result["mean"]["brier_lm"],
                 **{f"brier_{n}": result["mean"][f"brier_{n}"] for n in range(1, 5)}}
        if len(seeds) > 1:
            point.update(seeds=list(seeds), std=result["std"], pooled=result["pooled"])
        curve.append(point)
        print(f"[{label}] step {step} t={train_time:.0f}s BrierLM={point['brier_lm']:.2f} "
              f"Brier-1={100 * point['brier_1']:.2f}", flush=True)

    return probe


def _train_lm(work, name, model, args, train_ids, eval_blocks, flops_per_token, seconds=None, lr=None,
              mark_seconds=None, on_mark=None, extra=None):
    curve = []
    tokens_per_step = args.lm_batch * args.block_size
    budget = TimeBudget(args.lm_seconds if seconds is None else seconds, args.curve_every,
                        _curve_probe(curve, eval_blocks, args, flops_per_token, tokens_per_step),
                        mark_seconds=mark_seconds, on_mark=on_mark)
    trainer = Trainer(
        model=model, args=training_arguments(work / name, args, lr or args.lm_lr, args.lm_batch, LM_WARMUP),
        train_dataset=TokenBlocks(train_ids, args.block_size), callbacks=[budget],
    )
    result = trainer.train()
    model.save_pretrained(work / name / "model")
    tokens = result.global_step * tokens_per_step
    median_step = float(np.median(budget.step_times[10:] or budget.step_times))
    log = [r for r in trainer.state.log_history if "loss" in r]
    summary = {
        "steps": result.global_step, "tokens": tokens, "epochs": tokens / len(train_ids),
        "train_seconds": budget.train_time,
        "tokens_per_second": tokens_per_step / median_step, "flops_per_token": flops_per_token,
        "train_flops": tokens * flops_per_token,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": log[-1]["loss"] if log else None, "curve": curve, **(extra or {}), "log": log,
    }
    write_json(work / name / "done.json", summary)
    update_results(work, f"{name}_training", {k: v for k, v in summary.items() if k != "log"})


def backbone_config(args, tokenizer, positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def stage_calm(work, args, tokenizer, train_ids, eval_blocks):
    torch.manual_seed(args.seed)
    autoencoder = CalmAutoencoder.from_pretrained(work / "ae" / "model")
    k = autoencoder.config.patch_size
    model = CalmForCausalLM.from_autoencoder(
        autoencoder, backbone_config=backbone_config(args, tokenizer, args.block_size // k).to_dict(), **CALM_HEAD
    )
    _train_lm(work, "calm", model, args, train_ids, eval_blocks, calm_flops_per_token(model, args.block_size // k))


def stage_baseline(work, args, tokenizer, train_ids, eval_blocks):
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(backbone_config(args, tokenizer, args.block_size))
    flops_per_token = llama_flops_per_token(model, args.block_size)
    tokens_per_step = args.lm_batch * args.block_size
    donor = {}

    def save_donor(model, step, train_time):  # the Transformer at X seconds: the upcycle stage's starting point
        model.save_pretrained(work / "baseline" / "donor")
        donor.update(steps=step, train_seconds=train_time, tokens=step * tokens_per_step,
                     flops_per_token=flops_per_token, train_flops=step * tokens_per_step * flops_per_token,
                     backbone_checksum=state_checksum(model.model))
        write_json(work / "baseline" / "donor" / "donor.json", donor)
        print(f"[baseline] donor saved at step {step}, {train_time:.1f}s of training", flush=True)

    marks = dict(mark_seconds=args.donor_seconds, on_mark=save_donor, extra={"donor": donor}) if args.donor_seconds else {}
    _train_lm(work, "baseline", model, args, train_ids, eval_blocks, flops_per_token, **marks)


def stage_upcycle(work, args, tokenizer, train_ids, eval_blocks):
    """Arm (c): the baseline's X-second checkpoint, upcycled into a CALM and trained for the rest of --lm_seconds."""
    path = work / "baseline" / "donor"
    if not (path / "donor.json").exists():
        raise ValueError(f"no donor checkpoint in {path}: run the baseline stage with --donor_seconds X (in a fresh "
                         "WORK folder, or after removing WORK/baseline).")
    donor = json.loads((path / "donor.json").read_text())
    seconds = args.lm_seconds - donor["train_seconds"]
    if seconds <= 0:
        raise ValueError(f"the donor trained {donor['train_seconds']:.1f}s, nothing is left of --lm_seconds "
                         f"{args.lm_seconds}.")
    autoencoder = CalmAutoencoder.from_pretrained(work / "ae" / "model")
    if autoencoder.config.vocab_size != len(tokenizer):
        raise ValueError(f"the autoencoder's vocabulary ({autoencoder.config.vocab_size}) is not the data's tokenizer's "
                         f"({len(tokenizer)}): WORK/ae was trained on other data.")
    transformer = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    if state_checksum(transformer.model) != donor["backbone_checksum"]:
        raise ValueError(f"{path} does not hold the weights its donor.json describes.")
    torch.manual_seed(args.seed)
    model = CalmForCausalLM.from_causal_lm(transformer, autoencoder=autoencoder, **CALM_HEAD)
    del transformer
    start = {"backbone_checksum": state_checksum(model.model)}  # before training: must be the donor's
    k = autoencoder.config.patch_size
    _train_lm(work, "upcycle", model, args, train_ids, eval_blocks, calm_flops_per_token(model, args.block_size // k),
              seconds=seconds, lr=args.upcycle_lr, extra={"donor": donor, "start": start})


def load_lm(work, name, args):
    cls = LlamaForCausalLM if name == "baseline" else CalmForCausalLM
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return cls.from_pretrained(work / name / "model", dtype=dtype).to(args.device).eval()


def trained_models(work) -> list[str]:
    return [name for name in MODELS if (work / name / "model").is_dir()]


def stage_eval(work, args, tokenizer, eval_blocks, stage="eval", key="brier_lm"):
    results = {}
    for name in trained_models(work):
        model = load_lm(work, name, args)
        start = time.perf_counter()
        result = evaluate_brier(model, eval_blocks, batch_size=args.eval_batch, seeds=tuple(args.seeds), progress=False)
        result["seconds"] = time.perf_counter() - start
        results[name] = result
        print(f"[{stage}] {name}: BrierLM {result['mean']['brier_lm']:.2f} +- {result['std']['brier_lm']:.2f}, "
              f"Brier-1 {result['mean']['brier_1']:.4f}", flush=True)
    write_json(work / stage / "done.json", results)
    update_results(work, key, results)


@torch.no_grad()
def stage_samples(work, args, tokenizer, eval_blocks):
    prompt_ids = eval_blocks["input_ids"][: args.num_prompts, : args.prompt_tokens].to(args.device)
    samples = {"prompts": tokenizer.batch_decode(prompt_ids)}
    for name in trained_models(work):
        model = load_lm(work, name, args)
        for temperature in args.temperatures:
            generator = torch.Generator(device=args.device).manual_seed(0)
            torch.manual_seed(0)
            kwargs = dict(max_new_tokens=args.new_tokens, temperature=temperature)
            if name != "baseline":
                # Eager decoding: compiling the step for a few 64-token samples costs more GPU time than it saves.
                kwargs.update(generator=generator, sampling_method="approximate" if temperature < 1 else None,
                              num_candidates=200, calm_compile=False)
                kwargs = {k: v for k, v in kwargs.items() if v is not None}
            else:
                kwargs.update(do_sample=True, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)
            output = model.generate(input_ids=prompt_ids, **kwargs)
            samples[f"{name}_T{temperature}"] = tokenizer.batch_decode(output[:, prompt_ids.shape[1] :])
    write_json(work / "samples" / "done.json", samples)
    update_results(work, "samples", samples)


def stage_summary(work, args):
    """The three arms of the equal-compute comparison, from what the other stages wrote into results.json."""
    results = json.loads((work / "results.json").read_text())
    missing = [key for key in ("baseline_training", "calm_training", "upcycle_training") if key not in results]
    if missing:
        raise ValueError(f"the summary needs the baseline, calm and upcycle stages; results.json lacks {missing}.")

    def scores(name):
        row = {}
        for key, label in (("brier_lm_heldout", "heldout"), ("brier_lm", "wikitext103")):
            if name in results.get(key, {}):
                result = results[key][name]
                row[f"brier_lm_{label}"] = {"mean": result["mean"]["brier_lm"], "std": result["std"]["brier_lm"],
                                            "brier_1_mean": result["mean"]["brier_1"], "seeds": result["seeds"]}
        samples = results.get("samples", {})
        row["samples"] = {f"T{t}": samples[f"{name}_T{t}"] for t in args.temperatures if f"{name}_T{t}" in samples}
        return row

    def arm(training):
        return {"train_seconds": training["train_seconds"], "steps": training["steps"], "tokens": training["tokens"],
                "train_flops": training["train_flops"]}

    baseline, calm, upcycle = (results[f"{n}_training"] for n in ("baseline", "calm", "upcycle"))
    donor = upcycle["donor"]
    arms = {
        "a_transformer": {**arm(baseline), **scores("baseline")},
        "b_calm_scratch": {**arm(calm), **scores("calm")},
        "c_upcycled": {
            "train_seconds": donor["train_seconds"] + upcycle["train_seconds"],
            "steps": donor["steps"] + upcycle["steps"], "tokens": donor["tokens"] + upcycle["tokens"],
            "train_flops": donor["train_flops"] + upcycle["train_flops"],
            "donor": {k: donor[k] for k in ("train_seconds", "steps", "tokens", "train_flops")},
            "calm": arm(upcycle), **scores("upcycle"),
        },
    }
    summary = {"x_seconds": donor["train_seconds"], "y_seconds": upcycle["train_seconds"],
               "lm_seconds": args.lm_seconds, "arms": arms}
    update_results(work, "upcycling", summary)

    def brier(row, label, brier_1=False):
        value = row.get(f"brier_lm_{label}")
        if not value:
            return "-"
        return f"{100 * value['brier_1_mean']:.2f}" if brier_1 else f"{value['mean']:.2f} +- {value['std']:.2f}"

    print(f"\nUpcycling at equal compute: X = {summary['x_seconds']:.0f}s, Y = {summary['y_seconds']:.0f}s", flush=True)
    print(f"{'arm':<37} {'train s':>8} {'steps':>7} {'train FLOPs':>12} {'BrierLM held-out':>17} "
          f"{'Brier-1 x 100':>13} {'BrierLM WT103':>14}")
    labels = {"a_transformer": "(a) Transformer X+Y", "b_calm_scratch": "(b) CALM from scratch X+Y",
              "c_upcycled": "(c) Transformer X -> upcycled CALM Y"}
    for key, row in arms.items():
        print(f"{labels[key]:<37} {row['train_seconds']:>8.1f} {row['steps']:>7} {row['train_flops']:>12.3e} "
              f"{brier(row, 'heldout'):>17} {brier(row, 'heldout', True):>13} {brier(row, 'wikitext103'):>14}",
              flush=True)
    print(f"(BrierLM: mean +- std over seeds {args.seeds}; Brier-1 on the held-out text; FLOPs of (c): the donor's X "
          "seconds plus the CALM's Y)", flush=True)


# ------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The pipeline's command line; `build_parser().parse_args([])` holds its defaults (the ablations start there)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=".gpu")
    parser.add_argument("--work", default="runs/real_results")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES + EXTRA_STAGES)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and budgets: a CPU check of the pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--latent_size", type=int, default=128)
    parser.add_argument("--ae_hidden", type=int, default=512)
    parser.add_argument("--ae_intermediate", type=int, default=1280)
    parser.add_argument("--ae_seconds", type=float, default=240)
    parser.add_argument("--ae_steps", type=int, default=None,
                        help="also stop the autoencoder after this many optimizer steps (default: --ae_seconds only)")
    parser.add_argument("--ae_batch", type=int, default=32)
    parser.add_argument("--ae_lr", type=float, default=5e-4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--lm_seconds", type=float, default=300)
    parser.add_argument("--lm_batch", type=int, default=16)
    parser.add_argument("--lm_lr", type=float, default=5e-4)
    parser.add_argument("--donor_seconds", type=float, default=None, metavar="X",
                        help="the baseline saves its checkpoint at X seconds of training (WORK/baseline/donor), the "
                             "starting point of the upcycle stage, which trains for --lm_seconds minus X")
    parser.add_argument("--upcycle_lr", type=float, default=None, help="learning rate of the upcycle stage "
                                                                          "(default: --lm_lr)")
    parser.add_argument("--curve_every", type=float, default=60)
    parser.add_argument("--curve_blocks", type=int, default=32)
    parser.add_argument("--eval_block_size", type=int, default=1024)
    parser.add_argument("--eval_batch", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--reuse_baseline", default=None, metavar="WORK",
                        help="use the finished baseline of another run's WORK folder (e.g. for a K = 2 CALM: "
                             "same backbone, tokenizer and data, so the Transformer need not be trained again)")
    return parser


def apply_tiny(args) -> None:
    """--tiny: sizes and budgets small enough for a CPU check."""
    args.block_size, args.ae_hidden, args.ae_intermediate, args.latent_size = 64, 32, 64, 16
    args.hidden, args.intermediate, args.layers, args.heads = 32, 64, 2, 4
    args.ae_seconds = args.lm_seconds = 6
    args.curve_every, args.curve_blocks, args.eval_block_size = 3, 2, 64
    args.ae_batch = args.lm_batch = 8
    args.seeds, args.num_prompts, args.new_tokens = [0, 1], 2, 8


def load_train_ids(data: Path, tiny: bool) -> np.ndarray:
    """The training corpus written by prepare_data.py (memory-mapped; its first 200,000 tokens with --tiny)."""
    train_ids = np.load(Path(data) / "train_ids.npy", mmap_mode="r")
    return np.asarray(train_ids[:200_000]) if tiny else train_ids


def load_eval_blocks(path: Path, tokenizer, args, multiple_of: int) -> dict:
    """WikiText-103 or the in-domain held-out text, as blocks of --eval_block_size tokens, whole chunks of
    `multiple_of` tokens (the first 4 blocks with --tiny)."""
    blocks = load_text_blocks(str(path), tokenizer, args.eval_block_size, multiple_of=multiple_of)
    return {k: v[:4] for k, v in blocks.items()} if args.tiny else blocks


def main():
    args = build_parser().parse_args()
    if args.tiny:
        apply_tiny(args)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.ae_steps is not None and args.ae_steps < 1:
        raise ValueError(f"--ae_steps must be an integer >= 1, got {args.ae_steps}.")
    if args.donor_seconds is not None and not 0 < args.donor_seconds < args.lm_seconds:
        raise ValueError(f"--donor_seconds must be > 0 and below --lm_seconds ({args.lm_seconds}), "
                         f"got {args.donor_seconds}.")

    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.reuse_baseline is not None:
        source = Path(args.reuse_baseline).resolve() / "baseline"
        if not (source / "done.json").exists() or not (source / "model").is_dir():
            raise ValueError(f"--reuse_baseline {args.reuse_baseline!r} holds no finished baseline "
                             f"({source}/done.json and model/ are needed).")
        target = work / "baseline"
        if target.is_symlink() and target.resolve() != source:
            target.unlink()
        if not target.exists():
            target.symlink_to(source, target_is_directory=True)
        elif target.resolve() != source:
            raise ValueError(f"{target} exists and is not the baseline of {args.reuse_baseline!r}; remove it first.")
        args.stages = [stage for stage in args.stages if stage != "baseline"]
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    train_ids = load_train_ids(data, args.tiny)
    eval_blocks = load_eval_blocks(data / "eval.jsonl", tokenizer, args, args.patch_size)
    update_results(work, "setup", {**environment(), **json.loads((data / "data.json").read_text()),
                                   "arguments": {k: v for k, v in vars(args).items()},
                                   "eval_blocks": int(eval_blocks["input_ids"].shape[0])})
    for stage in args.stages:
        if stage == "summary":
            stage_summary(work, args)
            continue
        if (work / stage / "done.json").exists():
            print(f"[{stage}] already done", flush=True)
            continue
        start = time.perf_counter()
        print(f"[{stage}] start", flush=True)
        if stage == "ae":
            stage_ae(work, args, tokenizer, train_ids)
        elif stage == "ae_eval":
            stage_ae_eval(work, args, tokenizer, eval_blocks)
        elif stage == "calm":
            stage_calm(work, args, tokenizer, train_ids, eval_blocks)
        elif stage == "baseline":
            stage_baseline(work, args, tokenizer, train_ids, eval_blocks)
        elif stage == "upcycle":
            stage_upcycle(work, args, tokenizer, train_ids, eval_blocks)
        elif stage == "eval":
            stage_eval(work, args, tokenizer, eval_blocks)
        elif stage == "eval_heldout":
            heldout = data / "heldout.jsonl"
            if not heldout.exists():
                print("[eval_heldout] no heldout.jsonl in the data folder: skipped", flush=True)
                continue
            stage_eval(work, args, tokenizer, load_eval_blocks(heldout, tokenizer, args, args.patch_size),
                       stage="eval_heldout", key="brier_lm_heldout")
        elif stage == "samples":
            stage_samples(work, args, tokenizer, eval_blocks)
        print(f"[{stage}] done in {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
