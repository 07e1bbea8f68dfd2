"""`transformers.Trainer` subclasses for the two training stages of CALM (arXiv 2510.27688).

Not shipped to the Hub: the modeling files never import this module.

- Stage 1, :class:`CalmAutoencoderTrainer`: a `CalmAutoencoder` trained with its variational loss; logs the
  reconstruction loss, the KL term and token accuracy, and evaluates accuracy also under extra Gaussian noise on
  the latents (`eval_accuracy`, `eval_accuracy_noise_0.3`, ..., `eval_kl`).
- Stage 2, :class:`CalmTrainer`: a `CalmForCausalLM` trained with its head's loss (energy or flow) on the frozen
  autoencoder; logs the energy loss's fidelity and diversity terms and evaluates Brier-1..4 and BrierLM.

Everything else (optimiser, schedule, mixed precision, gradient accumulation, DDP/FSDP/DeepSpeed, checkpoints with
the remote code, resuming) is the Trainer's own. Each override says why it exists:

- `__init__`: both models return a per-batch *mean* loss, so the Trainer must divide it by the number of
  accumulation steps. It does so only when it does not pass `num_items_in_batch` to the model; a `**kwargs`
  forward would make it do that (transformers passes `num_items_in_batch` to a `**kwargs` forward), so `model_accepts_loss_kwargs` is forced to False.
- `compute_loss`: records the extra terms of every training micro-batch (detached, on device: no host sync).
- `log`: adds their means over the logging window (every micro-batch since the last log, all processes) to the
  training log, beside the Trainer's own window-mean `loss`.
- `__init__` also turns `dataloader_pin_memory` off on a CPU (there is nothing to pin for, and torch would warn
  at every dataloader).
- `create_model_card`: `Trainer.push_to_hub` (also reached from `save_model` with `--push_to_hub`) writes the
  Trainer's generic draft over README.md; a CALM card (`modeling_calm.card_calm`, with the BrierLM / accuracy
  model-index) already in `output_dir` is kept instead.
- `training_step` / `save_model` / `_load_optimizer_and_scheduler` and a `_TrainingGuard` callback: nothing goes
  wrong silently (docs/RELIABILITY.md). A non-finite loss, gradient or updated weight is caught at the optimizer step
  that meets it (`on_nonfinite`: raise, stop, or skip the update), instead of being logged as `loss 0.0` by the
  Trainer's NaN filter; `save_model` (and so every checkpoint) refuses non-finite weights; a training batch without
  any scored target logs a warning once, and an epoch (or a run) without any is an error; resuming from a checkpoint
  without `optimizer.pt` / `scheduler.pt` is refused unless `resume_without_optimizer=True`.
- `prediction_step`: one evaluation forward per batch, returned as one row of weighted statistics per example
  (weight = the example's number of scored targets). The Trainer then gathers the rows across processes and drops
  the duplicated examples of a distributed evaluation exactly as it does for `eval_loss`; the default
  `compute_metrics` turns the rows into weighted means.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from huggingface_hub import ModelCard
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME
from transformers.utils import logging

from .card_calm import CALM_TAGS, fill_repo_id
from .data_calm import check_block_size, model_context_tokens
from .modeling_calm import next_chunk_targets
from .modeling_calm_brier import BRIER_LM_MAX_N, brier_lm


logger = logging.get_logger(__name__)

NONFINITE_ACTIONS = ("raise", "stop", "skip")


def nonfinite_tensors(named_tensors, limit: int = 5) -> list[str]:
    """Names of (at most `limit`) floating tensors holding a NaN or an infinity."""
    bad = []
    for name, tensor in named_tensors:
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def _all_finite(tensors) -> torch.Tensor:
    """0-d bool tensor on the tensors' device: True when every tensor is finite (no host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


class _TrainingGuard(TrainerCallback):
    """Checks every optimizer step of its trainer (see `_CalmStatsTrainer`): one host sync per step."""

    def __init__(self, trainer: "_CalmStatsTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.trainer._check_update(state, control, model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.trainer._check_weights(state, control, model)

    def on_epoch_end(self, args, state, control, **kwargs):  # also reached when max_steps ends an epoch early
        self.trainer._check_targets_seen(state)


class _CalmStatsTrainer(Trainer):
    """Shared machinery: window means of extra training terms, per-example rows of evaluation statistics, and the
    reliability checks (non-finite values, empty targets, partial checkpoints)."""

    # Extra training terms, read off the model output by `_training_terms`, logged as window means.
    train_term_names: tuple[str, ...] = ()
    _empty_hint = ""  # what else leaves a batch without a target, for the messages

    def __init__(self, *args, on_nonfinite: str = "raise", resume_without_optimizer: bool = False, **kwargs):
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}.")
        user_metrics = kwargs.get("compute_metrics")
        super().__init__(*args, **kwargs)
        self.on_nonfinite = on_nonfinite
        self.resume_without_optimizer = bool(resume_without_optimizer)
        self.nonfinite_steps: list[int] = []  # optimizer steps (1-based) skipped or stopped at for non-finite values
        # Since the last optimizer step, on device: non-finite losses of batches with / without a target, batches
        # without a target, targets.
        self._step_stats: torch.Tensor | None = None
        self._targets_in_epoch = self._steps_in_epoch = 0
        self._warned_empty_batch = False
        self.add_callback(_TrainingGuard(self))
        # Per-batch mean losses: the Trainer must divide by the accumulation steps (see the module docstring).
        self.model_accepts_loss_kwargs = False
        if self.args.dataloader_pin_memory and self.args.device.type == "cpu":
            self.args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns once per loader
        if user_metrics is None:
            self.compute_metrics = self._weighted_means
        self._window: dict[str, list[torch.Tensor]] = {}

    # -- training ----------------------------------------------------------------------------------------------
    def _training_terms(self, outputs) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    def _target_count(self, model, inputs) -> torch.Tensor:
        """Scored targets of a training batch (0-d tensor, by the model's own rule)."""
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            # Summed on device (no host sync), read once at the optimizer step (see `_step_stats`).
            count = self._target_count(model, inputs).to(loss.device).float().reshape(())
            empty = (count == 0).float()
            bad = (~torch.isfinite(loss.detach()).all()).float()
            stats = torch.stack([bad * (1 - empty), bad * empty, empty, count])
            self._step_stats = stats if self._step_stats is None else self._step_stats + stats
            for name, value in self._training_terms(outputs).items():
                if value is not None:
                    total = value.detach().float().reshape(())
                    entry = self._window.setdefault(name, [torch.zeros_like(total), torch.zeros_like(total)])
                    entry[0] += total
                    entry[1] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # "loss" marks the periodic training log, which every process reaches at the same step: the all-reduce
        # below is safe there. Sums and counts are reduced separately, so a process that saw no value of a term
        # (e.g. a batch without targets) does not bias the mean.
        if "loss" in logs and self.train_term_names:
            device = self.args.device
            stats = torch.zeros(2, len(self.train_term_names), device=device)
            for j, name in enumerate(self.train_term_names):
                if name in self._window:
                    stats[0, j], stats[1, j] = (t.to(device) for t in self._window[name])
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            for j, name in enumerate(self.train_term_names):
                if stats[1, j] > 0:
                    logs[name] = float(stats[0, j] / stats[1, j])
            self._window = {}
        super().log(logs, *args, **kwargs)

    # -- reliability (called by `_TrainingGuard` at every optimizer step) ---------------------------------------
    def _summed(self, values: torch.Tensor) -> list[float]:
        if self.accelerator.num_processes > 1:  # every process reaches the optimizer step: the reduce is safe
            values = self.accelerator.reduce(values, reduction="sum")
        return values.tolist()

    def _nonfinite(self, state, control, model, what: str, names: list[str], can_skip: bool, cause: str = "") -> None:
        step = state.global_step + 1
        self.nonfinite_steps.append(step)
        cause = cause or "the training diverged (try a lower learning rate, warm-up, gradient clipping or bf16 over fp16)"
        message = f"Non-finite {what} at optimizer step {step}" + (f" in {names}" if names else "") + f": {cause}."
        action = "stop" if self.on_nonfinite == "skip" and not can_skip else self.on_nonfinite
        if action == "raise":
            raise FloatingPointError(
                f"{message} Pass on_nonfinite='stop' (end training without this update) or 'skip' (drop "
                f"such updates) to {type(self).__name__} to continue instead of raising."
            )
        if can_skip:  # drop the update: optimizers skip parameters without a gradient
            model.zero_grad(set_to_none=True)
        if action == "stop":
            control.should_training_stop = True
            kept = "this update was not applied" if can_skip else "the weights are no longer finite and cannot be saved"
            logger.error(f"{message} Training stopped (on_nonfinite={self.on_nonfinite!r}): {kept}.")
        else:
            logger.warning(f"{message} This update was skipped (on_nonfinite='skip').")

    def _check_update(self, state, control, model) -> None:
        device = self.args.device
        stats = torch.zeros(4, device=device) if self._step_stats is None else self._step_stats.to(device)
        self._step_stats = None
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        # fp16 loss scaling skips overflowing steps by itself (its gradients are legitimately inf at times).
        check_grads = self.accelerator.scaler is None
        bad_grads = (~_all_finite([p.grad for _, p in trainable])).float().to(device) if check_grads else stats[:1] * 0
        bad_losses, bad_empty_losses, empty, targets, bad_grads = self._summed(torch.cat([stats, bad_grads.reshape(1)]))
        self._steps_in_epoch += 1
        self._targets_in_epoch += targets
        if empty and not self._warned_empty_batch:
            self._warned_empty_batch = True
            logger.warning(
                f"Optimizer step {state.global_step + 1}: {int(empty)} training batch(es) had no scored target "
                f"(every label -100 or padding{self._empty_hint}); they add nothing to the loss. (Warned once.)"
            )
        if bad_losses:
            self._nonfinite(state, control, model, "loss", [], can_skip=True)
        elif bad_empty_losses:  # the model's mean over zero targets (0/0), not a divergence
            self._nonfinite(state, control, model, "loss", [], can_skip=True, cause=(
                "it comes from a batch without any scored target, whose mean loss is 0/0; the data has batches in "
                f"which every label is -100 or padding{self._empty_hint}"))
        elif bad_grads:
            names = nonfinite_tensors((name, p.grad) for name, p in trainable)
            self._nonfinite(state, control, model, "gradients", names, can_skip=True)

    def _check_weights(self, state, control, model) -> None:
        if self.nonfinite_steps[-1:] == [state.global_step + 1]:
            return  # this update was dropped
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        (bad,) = self._summed((~_all_finite([p for _, p in trainable])).float().to(self.args.device).reshape(1))
        if bad:
            names = nonfinite_tensors(trainable)
            self._nonfinite(state, control, model, "weights after the update", names, can_skip=False)

    def _check_targets_seen(self, state) -> None:
        steps, targets = self._steps_in_epoch, self._targets_in_epoch
        self._steps_in_epoch = self._targets_in_epoch = 0
        if steps and not targets:
            raise ValueError(
                f"No training batch had a scored target in the {steps} optimizer steps of the epoch up to epoch "
                f"{state.epoch:.2f} (they changed nothing): every label is -100 or padding{self._empty_hint}. "
                "Check the labels, the collator and the data."
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self.accelerator.unwrap_model(self.model)
        bad = nonfinite_tensors(list(model.named_parameters()) + list(model.named_buffers()))
        if bad:
            raise ValueError(
                f"Refusing to save a model with non-finite weights to {output_dir or self.args.output_dir} (step "
                f"{self.state.global_step}): {bad} hold NaN or infinity. The training diverged; save an earlier "
                "checkpoint instead."
            )
        super().save_model(output_dir, _internal_call)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and not self.is_deepspeed_enabled and os.path.isdir(checkpoint):
            names = set(os.listdir(checkpoint))
            has_optimizer = bool({OPTIMIZER_NAME, OPTIMIZER_NAME_BIN} & names) or any(
                "optimizer" in n and os.path.isdir(os.path.join(checkpoint, n)) for n in names  # FSDP sharded state
            )
            missing = [n for n, present in ((OPTIMIZER_NAME, has_optimizer), (SCHEDULER_NAME, SCHEDULER_NAME in names))
                       if not present]
            if missing:
                message = (
                    f"Resuming from {checkpoint}, which has no {' and no '.join(missing)}: the optimizer state and "
                    "the learning-rate schedule would both restart from scratch"
                )
                if not self.resume_without_optimizer:
                    raise ValueError(
                        f"{message}. Pass resume_without_optimizer=True to {type(self).__name__} to resume anyway "
                        "(e.g. from a save_only_model checkpoint)."
                    )
                logger.warning(f"{message} (resume_without_optimizer=True).")
        super()._load_optimizer_and_scheduler(checkpoint)

    # -- model card --------------------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs) -> None:
        path = os.path.join(self.args.output_dir, "README.md")
        if os.path.isfile(path) and CALM_TAGS[0] in (ModelCard.load(path).data.tags or []):
            logger.info(f"Keeping the CALM model card {path} (not replaced by the Trainer's draft).")
            repo_id = getattr(self, "hub_model_id", None)
            if repo_id:  # a card built without repo_id: name the repo it is pushed to
                with open(path, encoding="utf-8") as file:
                    text = file.read()
                if fill_repo_id(text, repo_id) != text:
                    with open(path, "w", encoding="utf-8") as file:
                        file.write(fill_repo_id(text, repo_id))
            return
        super().create_model_card(*args, **kwargs)

    # -- evaluation --------------------------------------------------------------------------------------------
    @property
    def eval_stat_names(self) -> list[str]:
        """Names of the statistic columns of the evaluation rows (after the weight column)."""
        raise NotImplementedError

    def _evaluation_stats(self, model, inputs, prediction_loss_only: bool = False):
        """Evaluation forward(s) of one batch -> `(loss, weights, stats)`: per-example weights `[B]` and the batch's
        statistics (0-d tensors or None) in `eval_stat_names` order."""
        raise NotImplementedError

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if inputs.get("labels") is None:
            raise ValueError(f"{type(self).__name__} evaluates with labels: the eval batches have no `labels`.")
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, weights, stats = self._evaluation_stats(model, inputs, prediction_loss_only)
        loss = loss.detach().float()
        if prediction_loss_only:
            return loss, None, None
        nan = torch.full((), math.nan, device=weights.device)
        values = torch.stack([nan if s is None else s.detach().float().reshape(()).to(nan.device) for s in stats])
        # [B, 1 + num_stats]: the example's weight, then the batch's statistics (means over the batch's targets).
        rows = torch.cat([weights[:, None].float(), values.expand(weights.shape[0], -1)], dim=-1)
        return loss, rows, weights.float()  # labels must be non-None, or compute_metrics is never called

    def _weighted_means(self, eval_prediction: EvalPrediction) -> dict[str, float]:
        rows = np.asarray(eval_prediction.predictions, dtype=np.float64).reshape(-1, 1 + len(self.eval_stat_names))
        weights, values = rows[:, 0], rows[:, 1:]
        metrics = {}
        for j, name in enumerate(self.eval_stat_names):
            keep = np.isfinite(values[:, j]) & (weights > 0)
            if keep.any():
                metrics[name] = float((weights[keep] * values[keep, j]).sum() / weights[keep].sum())
        return metrics


def _longest_example(dataset) -> int | None:
    """Tokens of the longest example of a map-style dataset: exact for a `datasets.Dataset` (from its features or
    Arrow lengths), the first example's length otherwise; None when unknown (streams, no `input_ids`)."""
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or not len(dataset):
        return None
    features = getattr(dataset, "features", None)
    if features is not None and "input_ids" in features:
        length = getattr(features["input_ids"], "length", -1)
        if isinstance(length, int) and length > 0:
            return length
        import pyarrow.compute as pc

        return pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py()
    try:
        first = dataset[0]
        return len(first["input_ids"]) if isinstance(first, Mapping) and "input_ids" in first else None
    except (IndexError, KeyError, TypeError):
        return None


class CalmTrainer(_CalmStatsTrainer):
    """`Trainer` for stage 2: a `CalmForCausalLM` on its frozen autoencoder.

    Use it exactly like `Trainer` (any `TrainingArguments`, PEFT models, DDP/FSDP/DeepSpeed). The model's
    `train()` keeps the autoencoder frozen and in eval mode whenever the Trainer switches modes. Examples longer
    than the model's context (the backbone's `max_position_embeddings` chunks x K) are refused at construction
    with a ValueError, since `generate` could never reach such lengths.

    Training logs: `loss` (the head loss; the negative energy score for the energy head), `fidelity` and
    `diversity` (the energy score's two terms, `loss = 2 * fidelity - diversity`), `grad_norm`, `learning_rate`;
    the extra terms are means over the logging window, as `loss` is.
    Evaluation metrics: `eval_loss`, `eval_fidelity`, `eval_diversity` and, with `eval_brier`, `eval_brier_1`
    .. `eval_brier_{min(K, 4)}` from two independent head samples per position, and `eval_brier_lm` (100 x the
    geometric mean of Brier-1..4) when K >= 4. For K < 4 the four-token continuations need autoregressive sampling:
    use `modeling_calm.evaluation_calm.evaluate_brier`.

    Args:
        *args, **kwargs: as for `transformers.Trainer`. Without `compute_metrics`, the trainer's own weighted means
            are used; a `compute_metrics` of yours receives rows `[weight, fidelity, diversity, brier_1..brier_4]`
            per example (NaN where a value does not exist).
        eval_brier (`bool`, *optional*, defaults to `True`): estimate Brier-n and BrierLM during evaluation.
        on_nonfinite (`str`, *optional*, defaults to `"raise"`): on a non-finite loss, gradient or updated weight:
            `"raise"` a `FloatingPointError` naming the optimizer step (before that update), `"stop"` training with a
            logged error, or `"skip"` the update with a warning. The steps met are in `trainer.nonfinite_steps`.
        resume_without_optimizer (`bool`, *optional*, defaults to `False`): allow resuming from a checkpoint that
            lacks `optimizer.pt` / `scheduler.pt` (both then restart, with a warning); refused otherwise.
    """

    train_term_names = ("fidelity", "diversity")

    def __init__(self, *args, eval_brier: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        context = model_context_tokens(self.model.config)
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            for part, data in (dataset.items() if isinstance(dataset, dict) else [(None, dataset)]):
                length = _longest_example(data)
                if length is not None:
                    where = name if part is None else f"{name}[{part!r}]"
                    check_block_size(length, context, f"the longest {where} example, of length")
        self.eval_brier = bool(eval_brier)
        self._warned_short_chunks = False

    @property
    def eval_stat_names(self) -> list[str]:
        return ["fidelity", "diversity"] + [f"brier_{n}" for n in range(1, BRIER_LM_MAX_N + 1)]

    _empty_hint = ", or sequences of a single chunk"

    def _training_terms(self, outputs):
        return {"fidelity": outputs.fidelity, "diversity": outputs.diversity}

    def _target_count(self, model, inputs):
        labels = inputs.get("labels")
        labels = inputs["input_ids"] if labels is None else labels
        patch_size = self.accelerator.unwrap_model(model).config.patch_size
        if labels.dim() != 2 or labels.shape[-1] % patch_size:
            return torch.ones(())  # the model's forward has already refused such a batch; nothing to count
        return next_chunk_targets(labels, patch_size, inputs.get("attention_mask"))[1].sum()

    def _evaluation_stats(self, model, inputs, prediction_loss_only=False):
        return_brier = self.eval_brier and not prediction_loss_only
        outputs = model(**inputs, return_brier=return_brier, use_cache=False)
        patch_size = self.accelerator.unwrap_model(model).config.patch_size
        # Scored next-chunk targets per example [B], by the forward's own rule (token or chunk attention masks).
        weights = next_chunk_targets(inputs["labels"], patch_size, inputs.get("attention_mask"))[1].sum(-1)
        brier = [None] * BRIER_LM_MAX_N
        if outputs.brier is not None:
            brier[: outputs.brier.numel()] = list(outputs.brier.unbind())
        return outputs.loss, weights, [outputs.fidelity, outputs.diversity, *brier]

    def _weighted_means(self, eval_prediction: EvalPrediction) -> dict[str, float]:
        metrics = super()._weighted_means(eval_prediction)
        briers = [metrics.get(f"brier_{n}") for n in range(1, BRIER_LM_MAX_N + 1)]
        if all(b is not None for b in briers):
            metrics["brier_lm"] = brier_lm(briers)
        elif self.eval_brier and briers[0] is not None and not self._warned_short_chunks:
            self._warned_short_chunks = True
            logger.warning(
                "K < 4: one model step gives fewer than 4 tokens, so eval_brier_lm is not reported (BrierLM needs "
                "Brier-1..4). modeling_calm.evaluation_calm.evaluate_brier continues the samples autoregressively."
            )
        return metrics


class CalmAutoencoderTrainer(_CalmStatsTrainer):
    """`Trainer` for stage 1: a `CalmAutoencoder`.

    Training logs: `loss` (`K * cross_entropy + kl_weight * KL`), `reconstruction_loss`, `kl` (the clamped KL,
    summed over Z, mean over chunks) and `accuracy` (token accuracy of the training forward, i.e. under input
    token dropout, latent sampling and latent dropout), as means over the logging window.
    Evaluation metrics (eval mode: no dropout, latents sampled from the posterior as in the paper): `eval_loss`
    (token cross-entropy), `eval_accuracy`, `eval_kl`, and `eval_accuracy_noise_{s}` for every s in
    `latent_noise_stds`: accuracy when Gaussian noise of std s is added to the sampled latents (how robust the
    latent space is to the errors of the generative head).

    Args:
        *args, **kwargs: as for `transformers.Trainer`.
        latent_noise_stds (sequence of `float`, *optional*, defaults to `(0.3,)`): extra latent noise levels.
        on_nonfinite (`str`, *optional*, defaults to `"raise"`): on a non-finite loss, gradient or updated weight:
            `"raise"` a `FloatingPointError` naming the optimizer step (before that update), `"stop"` training with a
            logged error, or `"skip"` the update with a warning. The steps met are in `trainer.nonfinite_steps`.
        resume_without_optimizer (`bool`, *optional*, defaults to `False`): allow resuming from a checkpoint that
            lacks `optimizer.pt` / `scheduler.pt` (both then restart, with a warning); refused otherwise.
    """

    train_term_names = ("reconstruction_loss", "kl", "accuracy")

    def __init__(self, *args, latent_noise_stds: Sequence[float] = (0.3,), **kwargs):
        stds = tuple(latent_noise_stds)
        for std in stds:
            if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std <= 0:
                raise ValueError(f"latent_noise_stds must hold finite numbers > 0, got {std!r}.")
        super().__init__(*args, **kwargs)
        self.latent_noise_stds = stds

    @property
    def eval_stat_names(self) -> list[str]:
        return ["kl", "accuracy"] + [f"accuracy_noise_{std:g}" for std in self.latent_noise_stds]

    def _training_terms(self, outputs):
        return {"reconstruction_loss": outputs.reconstruction_loss, "kl": outputs.kl_loss, "accuracy": outputs.accuracy}

    def _target_count(self, model, inputs):
        labels = inputs.get("labels")
        valid = (inputs["input_ids"] if labels is None else labels) != -100
        if inputs.get("attention_mask") is not None and inputs["attention_mask"].shape == valid.shape:
            valid &= inputs["attention_mask"] != 0
        return valid.sum()

    def _evaluation_stats(self, model, inputs, prediction_loss_only=False):
        outputs = model(**inputs)
        labels = inputs["labels"]
        weights = labels != -100
        if inputs.get("attention_mask") is not None:
            weights &= inputs["attention_mask"] != 0
        stats = [outputs.kl_loss, outputs.accuracy]
        if not prediction_loss_only:
            stats += [model(**inputs, latent_noise_std=std).accuracy for std in self.latent_noise_stds]
        return outputs.loss, weights.sum(-1), stats
