"""Ablations of what slows CALM down at small scale (issue 19, item 3), as one command for one GPU.

Every arm changes ONE thing against the baseline arm `calm`, the real-text pipeline's CALM (pipeline.py: 8 x 512
Llama backbone, K = 4, energy head with N = 8 samples, M = 100 target samples, 4 head blocks, noise size 64, lr 5e-4
constant after 200 warm-up steps, 16 x 2,048 tokens a step), and `transformer` is the same-backbone Transformer
(the pipeline's baseline), the reference BrierLM. `--list_arms` prints them all. Every arm trains for the same
number of optimizer steps (--steps), so that running several arms at once on one GPU (--parallel) changes their
wall times but not what they learn, from the same seed and data order. Every --curve_every steps (and at the last
step) an arm scores BrierLM on the in-domain held-out text (DATA/heldout.jsonl: the first --eval_blocks blocks of
1,024 tokens) with the pipeline's evaluate_brier over --seeds, for the figure of BrierLM against training FLOPs.

Training FLOPs are counted as pipeline.py counts them for its arms: steps x tokens per step x FLOPs per token, with
FLOPs per token in the Kaplan et al. convention (6 x matmul parameters per trained position, plus 12 x layers x
context x width for attention; embedding lookups free). A CALM's chunk position costs 6 x (backbone + input
compression + head x N for the energy head, head x 1 for the flow and diffusion heads, whose loss runs the network
once per position) + 2 x the frozen encoder's matmul parameters (the targets' posteriors, forward only), divided by
K; the Transformer's token costs 6 x all its matmul parameters (the softmax layer included). Not counted: the energy
score's pairwise distances (2 x N x M x Z per position, under 1 % of the head's FLOPs even at M = 400, so M shows
in wall time, not in FLOPs) and evaluation.

The two autoencoders (K = 4 for all CALM arms but `k2`, K = 2 for `k2`) are trained by the pipeline's own `ae`
stage (pipeline.stage_ae) for --ae_steps steps or --ae_seconds, whichever comes first, and scored by its `ae_eval`
stage on the first --eval_blocks held-out blocks; the K = 4 one first, with only the Transformer beside it (13
arms wait for it), then the K = 2 one beside the first CALM arms. Not run: `ae_finetune` (the autoencoder fine-tuned after a warm-up): CalmForCausalLM keeps it frozen by
construction (UNSUPPORTED_ARMS says why).

Layout: WORK/jobs/<job>.json (one record per arm or autoencoder, rewritten at every checkpoint), WORK/ablations.json
(all records, merged every few seconds; copied to --out as it grows), WORK/ablations.md (the table), WORK/logs/.
A finished job is not run again by a later call with the same settings. The run stops itself before --limit
seconds: an arm still training then stops at its next step with one last checkpoint ("truncated"), arms not
started by then are "not_started", and whatever finished is in ablations.json.

    python benchmarks/real_results/ablations.py --data .gpuh --work /root/abl --out OUT            # one H200
    python benchmarks/real_results/ablations.py --data .gpuh --work /tmp/abl_tiny --tiny           # CPU check
    python benchmarks/real_results/plot_ablations.py OUT/ablations.json --figure ablations.png     # CPU, after
"""

from __future__ import annotations

import time


PROCESS_START = time.time()  # --limit counts from here, the imports below included

import argparse
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pipeline  # noqa: E402  (puts the repository root on sys.path and imports modeling_calm)
import torch  # noqa: E402
from plot_ablations import markdown_table  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainerCallback  # noqa: E402

from modeling_calm import CalmAutoencoder, CalmForCausalLM  # noqa: E402


BASELINE = "calm"
# What each arm changes against the baseline. `cost`: one step's estimated GPU time against the baseline's, from its
# FLOPs per step (the Transformer's from its measured step time); only orders the queue, most expensive first.
ARMS = {
    "transformer": dict(model="transformer", cost=3.0),
    "calm": dict(cost=1.0),
    "lr_2.5e-4": dict(lr=2.5e-4, cost=1.0),
    "lr_1e-3": dict(lr=1e-3, cost=1.0),
    "warmup_400": dict(warmup=400, cost=1.0),
    "samples_16": dict(head=dict(num_samples=16), cost=1.6),
    "samples_32": dict(head=dict(num_samples=32), cost=2.9),
    "targets_25": dict(head=dict(num_target_samples=25), cost=0.95),
    "targets_400": dict(head=dict(num_target_samples=400), cost=1.2),
    "head_layers_2": dict(head=dict(num_mlp_layers=2), cost=0.65),
    "head_layers_8": dict(head=dict(num_mlp_layers=8), cost=1.6),
    "noise_32": dict(head=dict(noise_size=32), cost=1.0),
    "noise_128": dict(head=dict(noise_size=128), cost=1.0),
    "k2": dict(patch_size=2, cost=2.1),
    "flow": dict(head=dict(head_type="flow"), cost=0.45),
    "diffusion": dict(head=dict(head_type="diffusion"), cost=0.45),
    "warmup_50": dict(warmup=50, cost=1.0),  # not a default arm (--arms ... warmup_50)
}
DEFAULT_ARMS = tuple(name for name in ARMS if name != "warmup_50")
UNSUPPORTED_ARMS = {
    "ae_finetune": (
        "not supported by the model: CalmForCausalLM freezes its autoencoder in __init__ and again on every "
        "train() call (the Trainer makes one each step), and encodes the targets' posteriors under torch.no_grad(); "
        "its loss has no reconstruction term, so an autoencoder trained through the energy loss alone could move "
        "(collapse) the very targets it is scored against. It needs an opt-in unfrozen autoencoder plus a "
        "reconstruction + KL term in modeling_calm."
    ),
}
FLOPS_COUNTING = (
    "train_flops = steps x lm_batch x block_size x flops_per_token; flops_per_token as pipeline.py counts it: "
    "6 x matmul parameters per trained position + 12 x layers x context x width (attention); CALM: (backbone + "
    "input compression + energy head x N, or flow/diffusion head x 1) per chunk position, + 2 x the frozen "
    "encoder's matmul parameters, divided by K; Transformer: all matmul parameters, softmax layer included. "
    "The energy score's pairwise distances and evaluation are not counted."
)
GPU_DEFAULTS = dict(steps=400, curve_every=100, parallel=8, limit=450.0, ae_steps=600, ae_seconds=90.0,
                    eval_blocks=32, eval_batch=8, seeds=[0, 1])
TINY_DEFAULTS = dict(steps=4, curve_every=2, parallel=2, limit=110.0, ae_steps=10, ae_seconds=3.0,
                     eval_blocks=2, eval_batch=2, seeds=[0, 1])
DATA_FILES = ("train_ids.npy", "tokenizer", "heldout.jsonl", "data.json")
FINAL_STATUSES = ("done", "truncated", "error", "skipped", "killed", "not_started")


# ------------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=".gpuh", help="the folder prepare_data.py wrote (with heldout.jsonl)")
    parser.add_argument("--work", default="runs/ablations")
    parser.add_argument("--out", default=None, help="ablations.json, ablations.md and the logs are copied here")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and budgets: a CPU check")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), metavar="ARM",
                        help=f"arms to run (default: all but warmup_50): {', '.join(ARMS)}")
    parser.add_argument("--list_arms", action="store_true", help="print the arms and what they change, then exit")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps of every arm ({GPU_DEFAULTS['steps']})")
    parser.add_argument("--curve_every", type=int, default=None,
                        help=f"steps between BrierLM checkpoints ({GPU_DEFAULTS['curve_every']}; the last step is one)")
    parser.add_argument("--parallel", type=int, default=None,
                        help=f"jobs running at once, one process each ({GPU_DEFAULTS['parallel']})")
    parser.add_argument("--limit", type=float, default=None,
                        help=f"wall seconds for the whole run; it stops itself before ({GPU_DEFAULTS['limit']:.0f})")
    parser.add_argument("--ae_steps", type=int, default=None, help=f"autoencoder steps ({GPU_DEFAULTS['ae_steps']})")
    parser.add_argument("--ae_seconds", type=float, default=None,
                        help=f"autoencoder training seconds at most ({GPU_DEFAULTS['ae_seconds']:.0f})")
    parser.add_argument("--eval_blocks", type=int, default=None,
                        help=f"held-out blocks scored at every checkpoint ({GPU_DEFAULTS['eval_blocks']})")
    parser.add_argument("--eval_batch", type=int, default=None, help=f"blocks per forward ({GPU_DEFAULTS['eval_batch']})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="sampling seeds of BrierLM (0 1)")
    parser.add_argument("--lm_batch", type=int, default=None, help="sequences per step (the pipeline's, 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: a worker process
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # internal: epoch seconds
    return parser


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name} must be an integer >= {minimum}, got {value!r}.")


def validate(args) -> None:
    """Raise a ValueError naming the value and the rule for any argument that cannot work."""
    for name in ("steps", "curve_every", "parallel", "ae_steps", "eval_blocks", "eval_batch", "lm_batch"):
        _check_int(name, getattr(args, name), 1)
    if args.curve_every > args.steps:
        raise ValueError(f"--curve_every must be at most --steps ({args.steps}), got {args.curve_every}.")
    for name in ("limit", "ae_seconds"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--{name} must be a number of seconds > 0, got {value!r}.")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct integers (at least one), got {args.seeds!r}.")
    for arm in args.arms:
        if arm in UNSUPPORTED_ARMS:
            raise ValueError(f"arm {arm!r} cannot run: {UNSUPPORTED_ARMS[arm]}")
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}: an arm must be one of {', '.join(ARMS)}.")
    if len(set(args.arms)) != len(args.arms):
        raise ValueError(f"--arms must name each arm once, got {args.arms!r}.")
    data = Path(args.data)
    missing = [name for name in DATA_FILES if not (data / name).exists()]
    if missing:
        raise ValueError(f"--data {args.data!r} lacks {', '.join(missing)}: it must be a folder written by "
                         "prepare_data.py --holdout_every N.")


def parse_args(argv=None) -> argparse.Namespace:
    """The pipeline's defaults (its --tiny sizes with --tiny), then this script's options; argparse errors for
    values that cannot work."""
    parser = build_parser()
    own = parser.parse_args(argv)
    args = pipeline.build_parser().parse_args([])
    if own.tiny:
        pipeline.apply_tiny(args)
    for key, value in (TINY_DEFAULTS if own.tiny else GPU_DEFAULTS).items():
        if getattr(own, key, None) is None:
            setattr(own, key, value)
    if own.lm_batch is None:
        own.lm_batch = args.lm_batch
    vars(args).update(vars(own))
    args.curve_blocks = args.eval_blocks  # the pipeline's probe scores its first --curve_blocks blocks
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.list_arms:
        try:
            validate(args)
        except ValueError as error:
            parser.error(str(error))
    return args


# ------------------------------------------------------------------------------------------------------------------
# Arms and jobs
# ------------------------------------------------------------------------------------------------------------------
def arm_settings(name: str, args) -> dict:
    """Everything that defines an arm's training (the baseline's values where the arm changes nothing)."""
    spec = ARMS[name]
    settings = {"model": spec.get("model", "calm"), "lr": spec.get("lr", args.lm_lr),
                "warmup": spec.get("warmup", pipeline.LM_WARMUP)}
    if settings["model"] == "calm":
        settings["patch_size"] = spec.get("patch_size", 4)
        settings["head"] = {"head_type": "energy", **pipeline.CALM_HEAD, **spec.get("head", {})}
    return settings


def arm_changes(name: str, args) -> dict:
    """The arm's settings that differ from the baseline's (flat): e.g. {"num_samples": 16}."""
    if ARMS[name].get("model") == "transformer":
        return {}
    mine, base = arm_settings(name, args), arm_settings(BASELINE, args)
    flat = lambda s: {**{k: v for k, v in s.items() if k != "head"}, **s.get("head", {})}  # noqa: E731
    mine, base = flat(mine), flat(base)
    return {k: v for k, v in mine.items() if base.get(k) != v}


def autoencoder_job(patch_size: int) -> str:
    return f"ae_k{patch_size}"


def job_requires(job: str, args) -> str | None:
    """The job that must end first: a CALM arm's autoencoder; for a second autoencoder the first one (whichever way
    it ends: only so that the first, which most arms wait for, shares the GPU with the Transformer alone)."""
    if job.startswith("ae_k"):
        first = job_order(args)[0]
        return None if job == first else first
    if ARMS[job].get("model") == "transformer":
        return None
    return autoencoder_job(arm_settings(job, args)["patch_size"])


def job_order(args) -> list[str]:
    """The queue: the autoencoders (K = 4 first), then the Transformer, the baseline, and the other arms from the
    most expensive step down (the longest jobs start first, so the last ones to finish are short). A worker takes
    the first job whose requirement (`job_requires`) has ended."""
    sizes = sorted({arm_settings(a, args)["patch_size"] for a in args.arms if ARMS[a].get("model") != "transformer"},
                   key=lambda k: (k != 4, k))
    first = [a for a in ("transformer", BASELINE) if a in args.arms]
    rest = sorted((a for a in args.arms if a not in first), key=lambda a: -ARMS[a]["cost"])
    return [autoencoder_job(k) for k in sizes] + first + rest


def job_signature(job: str, args) -> dict:
    """What a finished job's record must match to be reused by a later call."""
    common = {"tiny": args.tiny, "seed": args.seed, "block_size": args.block_size}
    if job.startswith("ae_k"):
        return {**common, "ae_steps": args.ae_steps, "ae_seconds": args.ae_seconds}
    return {**common, "settings": arm_settings(job, args), "steps": args.steps, "curve_every": args.curve_every,
            "seeds": list(args.seeds), "eval_blocks": args.eval_blocks, "lm_batch": args.lm_batch}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_path(work: Path, job: str) -> Path:
    return work / "jobs" / f"{job}.json"


def read_record(work: Path, job: str) -> dict | None:
    path = record_path(work, job)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
        return None


def write_record(work: Path, job: str, record: dict) -> None:
    path = record_path(work, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, path)  # readers never see half a file


def claim(work: Path, job: str) -> bool:
    """Atomically take a job for this process (False when another worker has it)."""
    (work / "claims").mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(work / "claims" / job, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def dependency_state(work: Path, job: str | None) -> str:
    if job is None:
        return "done"
    record = read_record(work, job)
    if record is None or record.get("status") == "running":
        return "pending"
    return "done" if record["status"] == "done" else "failed"


# ------------------------------------------------------------------------------------------------------------------
# One worker: runs jobs from the queue until none is left or the deadline is near
# ------------------------------------------------------------------------------------------------------------------
class StepCheckpoints(TrainerCallback):
    """BrierLM every `curve_every` steps and at the last one (evaluation time is kept out of the training time);
    stops training, with one last checkpoint, when the deadline is too close for another step and checkpoint."""

    def __init__(self, steps, curve_every, probe, deadline, on_update, first_probe_guess):
        self.steps, self.curve_every, self.probe, self.deadline = steps, curve_every, probe, deadline
        self.on_update, self.longest_probe = on_update, first_probe_guess
        self.eval_seconds, self.last_probe_step, self.truncated, self.start = 0.0, None, False, None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def _checkpoint(self, model, step):
        self._sync()
        begin = time.perf_counter()
        self.probe(model, step, self.train_seconds())
        self._sync()
        duration = time.perf_counter() - begin
        self.eval_seconds += duration
        self.longest_probe = max(self.longest_probe, duration)
        self.last_probe_step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.curve_every == 0 or step >= self.steps:
            self._checkpoint(model, step)
        if step < self.steps and time.time() + 1.5 * self.longest_probe + 2.0 >= self.deadline:
            self.truncated = True
            control.should_training_stop = True
            if self.last_probe_step != step:
                self._checkpoint(model, step)
        if step % 25 == 0 or control.should_training_stop or self.last_probe_step == step:
            self.on_update(step, self.train_seconds())
        return control


def build_arm_model(name: str, args, tokenizer, work: Path):
    settings = arm_settings(name, args)
    torch.manual_seed(args.seed)
    if settings["model"] == "transformer":
        model = LlamaForCausalLM(pipeline.backbone_config(args, tokenizer, args.block_size))
        return model, pipeline.llama_flops_per_token(model, args.block_size)
    k = settings["patch_size"]
    autoencoder = CalmAutoencoder.from_pretrained(work / autoencoder_job(k) / "ae" / "model")
    model = CalmForCausalLM.from_autoencoder(
        autoencoder, backbone_config=pipeline.backbone_config(args, tokenizer, args.block_size // k).to_dict(),
        **settings["head"],
    )
    return model, pipeline.calm_flops_per_token(model, args.block_size // k)


def run_arm(name: str, args, work: Path, tokenizer, train_ids, heldout, record: dict) -> None:
    settings = arm_settings(name, args)
    model, flops_per_token = build_arm_model(name, args, tokenizer, work)
    tokens_per_step = args.lm_batch * args.block_size
    curve = []
    record.update(
        tokens_per_step=tokens_per_step, flops_per_token=flops_per_token, curve=curve,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )

    def update(step, train_seconds, status="running"):
        record.update(status=status, steps=step, tokens=step * tokens_per_step,
                      train_flops=step * tokens_per_step * flops_per_token, train_seconds=train_seconds,
                      steps_per_second=step / train_seconds if train_seconds > 0 else None,
                      eval_seconds=checkpoints.eval_seconds)
        write_record(work, name, record)

    probe = pipeline._curve_probe(curve, heldout, args, flops_per_token, tokens_per_step, seeds=args.seeds, label=name)
    checkpoints = StepCheckpoints(args.steps, args.curve_every, probe, args.deadline, update,
                                  first_probe_guess=1.0 if args.tiny else 10.0)
    training = pipeline.training_arguments(work / "arms" / name, args, settings["lr"], args.lm_batch,
                                           settings["warmup"], max_steps=args.steps, workers=0,
                                           logging_steps=1 if args.tiny else 25)
    trainer = Trainer(model=model, args=training, train_dataset=pipeline.TokenBlocks(train_ids, args.block_size),
                      callbacks=[checkpoints])
    result = trainer.train()
    checkpoints._sync()
    record["loss_log"] = [{k: r[k] for k in ("step", "loss", "grad_norm", "learning_rate") if k in r}
                          for r in trainer.state.log_history if "loss" in r]
    record["final_loss"] = record["loss_log"][-1]["loss"] if record["loss_log"] else None
    update(result.global_step, checkpoints.train_seconds(), status="truncated" if checkpoints.truncated else "done")


def run_autoencoder(job: str, args, work: Path, tokenizer, train_ids, heldout, record: dict) -> None:
    """The pipeline's own `ae` stage into WORK/ae_k<K>, then its `ae_eval` stage (token accuracy) on the first
    --eval_blocks held-out blocks (each kept if it finished before: the stages resume)."""
    folder = work / job
    ae_args = argparse.Namespace(**vars(args))
    ae_args.patch_size = int(job[len("ae_k"):])
    if not (folder / "ae" / "done.json").exists():
        pipeline.stage_ae(folder, ae_args, tokenizer, train_ids)
    if not (folder / "ae_eval" / "done.json").exists():
        pipeline.stage_ae_eval(folder, ae_args, tokenizer, {k: v[: args.eval_blocks] for k, v in heldout.items()})
    summary = json.loads((folder / "ae" / "done.json").read_text())
    accuracy = json.loads((folder / "ae_eval" / "done.json").read_text())
    record.update({k: v for k, v in summary.items() if k != "log"}, status="done", heldout_eval=accuracy,
                  model_path=str(folder / "ae" / "model"), patch_size=ae_args.patch_size)
    write_record(work, job, record)


def worker(args) -> None:
    work, data = Path(args.work), Path(args.data)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    train_ids = pipeline.load_train_ids(data, args.tiny)
    lcm = math.lcm(*(arm_settings(a, args).get("patch_size", 1) for a in args.arms))
    heldout = pipeline.load_eval_blocks(data / "heldout.jsonl", tokenizer, args, lcm)  # the same blocks for all
    environment = pipeline.environment()
    jobs = job_order(args)
    minimum_start = 5.0 if args.tiny else 30.0  # no new job this close to the deadline
    while args.deadline - time.time() > minimum_start:
        open_jobs = [job for job in jobs if not (work / "claims" / job).exists()]
        if not open_jobs:
            return
        job = None
        for candidate in open_jobs:
            state = dependency_state(work, job_requires(candidate, args))
            if candidate.startswith("ae_k") and state == "failed":
                state = "done"  # an autoencoder waits for another only to leave it the GPU
            if state != "pending" and claim(work, candidate):
                job = candidate
                break
        if job is None:
            time.sleep(0.2 if args.tiny else 1.0)
            continue
        record = {"name": job, "status": "running", "worker": args.worker, "started": _now(),
                  "started_epoch": time.time(), "environment": environment, "signature": job_signature(job, args)}
        if not job.startswith("ae_k"):
            record.update(model=arm_settings(job, args)["model"], settings=arm_settings(job, args),
                          changes=arm_changes(job, args), steps_requested=args.steps)
        write_record(work, job, record)
        if state == "failed":
            record.update(status="skipped", error=f"its autoencoder {job_requires(job, args)} did not finish")
        else:
            print(f"[worker {args.worker}] {job} start", flush=True)
            try:
                if job.startswith("ae_k"):
                    run_autoencoder(job, args, work, tokenizer, train_ids, heldout, record)
                else:
                    run_arm(job, args, work, tokenizer, train_ids, heldout, record)
            except Exception as error:  # one arm's failure (e.g. out of memory) must not stop the others
                record.update(status="error", error=f"{type(error).__name__}: {error}",
                              traceback=traceback.format_exc()[-4000:])
                print(record["traceback"], flush=True)
        record.update(finished=_now(), finished_epoch=time.time(),
                      wall_seconds=time.time() - record["started_epoch"])
        write_record(work, job, record)
        print(f"[worker {args.worker}] {job} {record['status']} in {record['wall_seconds']:.1f}s", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------------
# The orchestrating process: starts the workers, merges their records, stops them in time
# ------------------------------------------------------------------------------------------------------------------
def prepare_work(work: Path, args, jobs: list[str]) -> None:
    """Keep the records of jobs a previous call finished with the same settings (claimed, so no worker reruns them);
    forget every other record, claim and unfinished autoencoder."""
    shutil.rmtree(work / "claims", ignore_errors=True)
    (work / "claims").mkdir(parents=True)
    for job in jobs:
        record = read_record(work, job)
        kept = record is not None and record.get("status") == "done" and record.get("signature") == job_signature(job, args)
        if job.startswith("ae_k") and not kept:
            shutil.rmtree(work / job, ignore_errors=True)  # retrain: its stage would otherwise resume as done
        requirement = None if job.startswith("ae_k") else job_requires(job, args)
        if kept and requirement is not None and not (work / "claims" / requirement).exists():
            kept = False  # its autoencoder is retrained
        if kept:
            (work / "claims" / job).touch()
        else:
            record_path(work, job).unlink(missing_ok=True)


def mean_concurrency(record: dict, records: list[dict], now: float) -> float | None:
    """Jobs running on average during this job's lifetime, itself included (its wall times were measured so)."""
    start = record.get("started_epoch")
    if start is None:
        return None
    end = record.get("finished_epoch", now)
    if end <= start:
        return 1.0
    overlap = sum(max(0.0, min(end, r.get("finished_epoch", now)) - max(start, r["started_epoch"]))
                  for r in records if r.get("started_epoch") is not None)
    return overlap / (end - start)


def merge(work: Path, args, jobs: list[str], started: float, final: bool) -> dict:
    records = {job: read_record(work, job) for job in jobs}
    now = time.time()
    for job, record in records.items():
        if final and record is None:
            records[job] = {"name": job, "status": "not_started"}
            if not job.startswith("ae_k"):
                records[job].update(model=arm_settings(job, args)["model"], settings=arm_settings(job, args),
                                    changes=arm_changes(job, args), steps_requested=args.steps)
        elif final and record.get("status") == "running":
            record.update(status="killed", error="still running at the hard stop (the --limit)")
            write_record(work, job, record)
    present = [r for r in records.values() if r is not None]
    for record in present:
        if record.get("started_epoch") is not None:
            record["mean_concurrency"] = mean_concurrency(record, present, now)
    environment = next((r["environment"] for r in present if r.get("environment")), None)
    arguments = {k: getattr(args, k) for k in (
        "steps", "curve_every", "parallel", "limit", "ae_steps", "ae_seconds", "eval_blocks", "eval_batch", "seeds",
        "lm_batch", "block_size", "eval_block_size", "seed", "tiny", "arms", "hidden", "intermediate", "layers",
        "heads", "lm_lr", "latent_size", "ae_hidden", "ae_intermediate", "ae_batch", "ae_lr", "data")}
    results = {
        "setup": {"baseline": BASELINE, "started": datetime.fromtimestamp(started, timezone.utc).isoformat(
                      timespec="seconds"),
                  "environment": environment, "data": json.loads((Path(args.data) / "data.json").read_text()),
                  "arguments": arguments, "jobs": jobs},
        "flops_counting": FLOPS_COUNTING,
        "skipped_arms": UNSUPPORTED_ARMS,
        "autoencoders": {job: records[job] for job in jobs if job.startswith("ae_k") and records[job] is not None},
        "arms": {arm: records[arm] for arm in args.arms if records.get(arm) is not None},
        "wall_seconds": now - started,
        "finished": final,
    }
    pipeline.write_json(work / "ablations.json", results)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "ablations.json", Path(args.out) / "ablations.json")
    return results


def _describe(record: dict) -> str:
    text = f"{record['name']} {record['status']}"
    if record.get("steps") is not None and record.get("train_seconds") is not None:
        text += f": {record['steps']} steps in {record['train_seconds']:.1f}s"
    if record.get("curve"):
        last = record["curve"][-1]
        text += f", Brier-1 x 100 {100 * last['brier_1']:.2f}, BrierLM {last['brier_lm']:.2f}"
    if record.get("error"):
        text += f" ({record['error'][:300]})"
    return text


def orchestrate(args, argv: list[str]) -> int:
    started = PROCESS_START
    work = Path(args.work).resolve()
    args.work = str(work)
    jobs = job_order(args)
    work.mkdir(parents=True, exist_ok=True)
    prepare_work(work, args, jobs)
    # Workers stop their arms by `deadline` (with a last checkpoint); what still runs at `hard_stop` is killed.
    deadline = started + args.limit - max(5.0, 0.03 * args.limit)
    hard_stop = started + args.limit - 2.0
    (work / "logs").mkdir(exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "TOKENIZERS_PARALLELISM": "false",
                   "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    open_jobs = [job for job in jobs if not (work / "claims" / job).exists()]
    workers, logs = [], []
    for index in range(min(args.parallel, len(open_jobs))):
        log = open(work / "logs" / f"worker_{index}.log", "w")
        logs.append(log)
        command = [sys.executable, "-u", str(Path(__file__).resolve()), *argv, "--work", str(work),
                   "--worker", str(index), "--deadline", repr(deadline)]
        workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment))
    print(f"[ablations] {len(jobs)} jobs ({len(open_jobs)} to run), {len(workers)} workers, {args.steps} steps each, "
          f"limit {args.limit:.0f}s; logs in {work / 'logs'}", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    reported, last_heartbeat = {}, time.time()
    try:
        while any(w.poll() is None for w in workers):
            if time.time() >= hard_stop:
                print("[ablations] hard stop: killing the workers still running", flush=True)
                break
            time.sleep(0.5 if args.tiny else 3.0)
            results = merge(work, args, jobs, started, final=False)
            for record in [*results["autoencoders"].values(), *results["arms"].values()]:
                if record["status"] in FINAL_STATUSES and reported.get(record["name"]) != record["status"]:
                    reported[record["name"]] = record["status"]
                    print(f"[{time.time() - started:.0f}s] {_describe(record)}", flush=True)
            if time.time() - last_heartbeat >= 30:
                last_heartbeat = time.time()
                running = [f"{r['name']} {r.get('steps', 0)}/{r.get('steps_requested', '-')}"
                           for r in results["arms"].values() if r["status"] == "running"]
                print(f"[{time.time() - started:.0f}s] running: {', '.join(running) or '(autoencoders)'}", flush=True)
    except KeyboardInterrupt as interrupt:
        print(f"[ablations] interrupted ({interrupt}): stopping the workers", flush=True)
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            try:
                w.wait(timeout=5)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        for log in logs:
            log.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    results = merge(work, args, jobs, started, final=True)
    table = markdown_table(results)
    (work / "ablations.md").write_text(table)
    for record in [*results["autoencoders"].values(), *results["arms"].values()]:
        if reported.get(record["name"]) != record["status"]:
            print(f"[{time.time() - started:.0f}s] {_describe(record)}", flush=True)
    if args.out:
        out = Path(args.out)
        shutil.copyfile(work / "ablations.md", out / "ablations.md")
        shutil.copytree(work / "logs", out / "logs", dirs_exist_ok=True)
    print("\n" + table, flush=True)
    statuses = [r["status"] for r in [*results["autoencoders"].values(), *results["arms"].values()]]
    print(f"[ablations] {statuses.count('done')} of {len(statuses)} jobs done, {time.time() - started:.0f}s wall",
          flush=True)
    return 0 if all(s == "done" for s in statuses) else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.list_arms:
        for name in ARMS:
            changes = arm_changes(name, args)
            what = ("the same-backbone Transformer" if ARMS[name].get("model") == "transformer"
                    else ", ".join(f"{k}={v}" for k, v in changes.items()) or "the baseline")
            print(f"{name:<14} {what}{'' if name in DEFAULT_ARMS else '  (not a default arm)'}")
        for name, reason in UNSUPPORTED_ARMS.items():
            print(f"{name:<14} not run: {reason}")
        return 0
    if args.worker is not None:
        if args.deadline is None:
            raise ValueError("--worker needs --deadline (both are set by the orchestrating process).")
        worker(args)
        return 0
    return orchestrate(args, [a for a in argv])


if __name__ == "__main__":
    sys.exit(main())
