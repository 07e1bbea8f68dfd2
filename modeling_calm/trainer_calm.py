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
- `create_model_card`: `Trainer.push_to_hub` (also reached from `save_model` with `--push_to_hub`) writes the
  Trainer's generic draft over README.md; a CALM card (`modeling_calm.card_calm`, with the BrierLM / accuracy
  model-index) already in `output_dir` is kept instead.
- `prediction_step`: one evaluation forward per batch, returned as one row of weighted statistics per example
  (weight = the example's number of scored targets). The Trainer then gathers the rows across processes and drops
  the duplicated examples of a distributed evaluation exactly as it does for `eval_loss`; the default
  `compute_metrics` turns the rows into weighted means.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from huggingface_hub import ModelCard
from transformers import EvalPrediction, Trainer
from transformers.utils import logging

from .card_calm import CALM_TAGS
from .modeling_calm import next_chunk_targets
from .modeling_calm_brier import BRIER_LM_MAX_N, brier_lm


logger = logging.get_logger(__name__)


class _CalmStatsTrainer(Trainer):
    """Shared machinery: window means of extra training terms, and per-example rows of evaluation statistics."""

    # Extra training terms, read off the model output by `_training_terms`, logged as window means.
    train_term_names: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        user_metrics = kwargs.get("compute_metrics")
        super().__init__(*args, **kwargs)
        # Per-batch mean losses: the Trainer must divide by the accumulation steps (see the module docstring).
        self.model_accepts_loss_kwargs = False
        if user_metrics is None:
            self.compute_metrics = self._weighted_means
        self._window: dict[str, list[torch.Tensor]] = {}

    # -- training ----------------------------------------------------------------------------------------------
    def _training_terms(self, outputs) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
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

    # -- model card --------------------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs) -> None:
        path = os.path.join(self.args.output_dir, "README.md")
        if os.path.isfile(path) and CALM_TAGS[0] in (ModelCard.load(path).data.tags or []):
            logger.info(f"Keeping the CALM model card {path} (not replaced by the Trainer's draft).")
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


class CalmTrainer(_CalmStatsTrainer):
    """`Trainer` for stage 2: a `CalmForCausalLM` on its frozen autoencoder.

    Use it exactly like `Trainer` (any `TrainingArguments`, PEFT models, DDP/FSDP/DeepSpeed). The model's
    `train()` keeps the autoencoder frozen and in eval mode whenever the Trainer switches modes.

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
    """

    train_term_names = ("fidelity", "diversity")

    def __init__(self, *args, eval_brier: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_brier = bool(eval_brier)
        self._warned_short_chunks = False

    @property
    def eval_stat_names(self) -> list[str]:
        return ["fidelity", "diversity"] + [f"brier_{n}" for n in range(1, BRIER_LM_MAX_N + 1)]

    def _training_terms(self, outputs):
        return {"fidelity": outputs.fidelity, "diversity": outputs.diversity}

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
