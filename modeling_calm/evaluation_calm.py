"""BrierLM evaluation of causal language models: sampling, scoring, data loading (arXiv 2510.27688, section
"Likelihood-Free LM Evaluation"; docs/brierlm.md).

Not shipped to the Hub (it imports the project package and tqdm); `datasets` is never needed.

Shape letters: B blocks in a batch, T tokens per block, U = T - max_n positions that have max_n true future tokens
inside the block, S = 2 independent samples per position, V vocabulary, max_n the largest n-gram order (4).

What is scored
--------------
At every position t of a block (context: tokens 0..t), two continuations of max_n tokens are sampled from the
model at temperature 1 (plain softmax, no top-k/top-p) and compared with the true tokens t+1..t+max_n by
`modeling_calm_brier.brier_indicators` (Brier-n = 1{x1=y} + 1{x2=y} - 1{x1=x2} on n-grams).

End-of-block rule: position t is scored only if all max_n true future tokens t+1..t+max_n lie inside the block
and none has label -100 (and, with an `attention_mask`, token t and the targets are real tokens). The same
positions are used for every n, so Brier-1..4 are means over one set of positions. Each block therefore scores
at most T - max_n positions; the last max_n positions of a block (and a "position -1" predicting token 0) are
never scored. Outputs keep the block layout: index t of `[B, T, max_n]` is position t, and the last max_n
entries are always masked out.

Plugging in other models: the `score_brier` protocol
----------------------------------------------------
`score_blocks` / `evaluate_brier` dispatch on the model. If it has a callable attribute

    model.score_brier(input_ids, labels=None, max_n=4, generator=None) -> (per_position_brier, mask)

(plus `attention_mask=` [B, T] when its signature takes it, as a CALM's does: then it must never score padding)

with `input_ids` and `labels` LongTensors [B, T] (right-padded blocks; labels of -100 mark tokens that must not
be targets, padding included; labels None means labels = input_ids), `generator` a `torch.Generator` (on the
CPU) or None that must be the only source of randomness so that a seed fixes the result, returning
`per_position_brier` float [B, U_model, max_n] (per-position estimates from `modeling_calm_brier.brier_indicators`, any
U_model, e.g. one entry per token or per chunk start) and `mask` bool [B, U_model] or [B, U_model, max_n] (True
where the entry counts), it is used as is. A CALM implements it by sampling two continuations per position from
its generative head (continuing autoregressively, each sample on its own previous chunk, while K < max_n).
Otherwise the model is treated as a standard transformers causal LM and scored by `score_causal_lm`.

A protocol model may also have

    model.score_brier_seeds(input_ids, labels=None, max_n=4, generators=[...]) -> [(per_position_brier, mask), ...]

(same arguments, `attention_mask=` likewise) returning one `score_brier` result per generator, entry g equal to
`score_brier(..., generator=generators[g])`. `evaluate_brier` then reads every batch once for all its seeds
(batch i gets the generators `batch_seed(seed, i)` of every seed, as in one pass per seed, so the numbers do not
change); a CALM uses it to run its backbone over a batch once instead of once per seed.

Fast path (`score_causal_lm`) versus reference (`score_causal_lm_ref`)
-------------------------------------------------------------------
The fast path runs one forward over the whole block (first sampled token for every position at once, and the
KV cache of the block), then max_n - 1 forwards that each append one token of all 2U continuations to the
cache: row r = 2t + s carries sample s of position t, at position id pos(t) + j, and a custom 4-D additive mask
lets it see prefix tokens <= t and its own earlier continuation tokens only. The reference loops over rows,
positions and samples with plain cache-free forwards of prefix + continuation. Both turn one uniform number
per (position, sample, step) into a token by inverse-CDF sampling, so given the same generator they draw the
same tokens (up to float rounding at CDF boundaries), which is what the tests compare. The fast path needs
an attention implementation that takes a 4-D float mask ("eager" or "sdpa") and a cache that keeps every token
(no sliding-window eviction); otherwise use the reference.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from modeling_calm.modeling_calm_brier import (
    BRIER_LM_MAX_N,
    IGNORE_INDEX,
    NUM_BRIER_SAMPLES,
    PAD_SAMPLE,
    BrierAccumulator,
    brier_indicators,
    check_max_n,
    check_maskable_attention,
    continuation_attention_mask,
    gather_targets,
)
from modeling_calm.modeling_calm_compat import cache_kwargs, output_cache


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and small helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_ids(name: str, t: torch.Tensor | None, like: torch.Tensor | None = None) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point():
        desc = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an integer tensor of shape [B, T], got {desc}.")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of input_ids {tuple(like.shape)}, got {tuple(t.shape)}.")


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _model_dtype(model, fallback: torch.dtype) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else fallback


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF convention for (left- or right-) padded rows: real tokens are numbered 0, 1, ... [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _draw_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniforms in [0, 1) for inverse-CDF sampling, drawn on the generator's device (CPU by default) so that a
    seed gives the same draws whatever device the model is on."""
    noise_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=noise_device).to(device)


def _sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling at temperature 1.

    logits [..., V] and uniforms [..., S] in [0, 1) -> token ids [..., S]: token k is returned iff
    cdf[k-1] <= u * cdf[V-1] < cdf[k], i.e. with probability softmax(logits)[k]. Scaling u by the last CDF
    entry (1 up to rounding) keeps the search inside the vocabulary; zero-probability tokens have an empty
    interval and are never drawn.
    """
    # [..., V] float32 even for bf16 models; in-place cumsum keeps the peak at two float copies of the logits.
    cdf = torch.softmax(logits.float(), dim=-1).cumsum_(dim=-1)
    targets = uniforms.to(cdf.dtype) * cdf[..., -1:]  # [..., S]
    tokens = torch.searchsorted(cdf.contiguous(), targets.contiguous(), right=True)
    return tokens.clamp_(max=logits.shape[-1] - 1)


def _prepare(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_n: int, noise: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validates sampler inputs; returns (attention_mask as bool [B, T], noise [B, U, 2, max_n], U)."""
    check_max_n(max_n)
    _check_ids("input_ids", input_ids)
    _check_ids("attention_mask", attention_mask, like=input_ids)
    batch, length = input_ids.shape
    num_positions = max(length - max_n, 0)
    shape = (batch, num_positions, NUM_BRIER_SAMPLES, max_n)
    if noise is None:
        noise = _draw_noise(shape, generator, input_ids.device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape [B, T - max_n, 2, max_n] = {shape}, got {tuple(noise.shape)}.")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
    return mask, noise.to(input_ids.device), num_positions


# ----------------------------------------------------------------------------------------------------------------
# Sampling two continuations at every position
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_continuations(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_n: int = BRIER_LM_MAX_N,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Samples two independent max_n-token continuations at every position with max_n future tokens (fast path).

    Args:
        model: a transformers causal LM (`AutoModelForCausalLM`) with a KV cache and eager or sdpa attention.
        input_ids (`torch.LongTensor` of shape `[B, T]`): the blocks.
        attention_mask (`torch.Tensor` of shape `[B, T]`, *optional*): 1 for real tokens, 0 for padding (left or
            right); position ids are counted over real tokens only.
        max_n (`int`, *optional*, defaults to 4): continuation length.
        noise (`torch.FloatTensor` of shape `[B, T - max_n, 2, max_n]`, *optional*): uniforms in [0, 1) driving
            the draws; drawn from `generator` when None.
        generator (`torch.Generator`, *optional*): source of `noise`.
        return_logits (`bool`, *optional*): also return the logits each draw used.

    Returns:
        `samples` LongTensor [B, U, 2, max_n] with U = max(T - max_n, 0): `samples[b, t, s]` continues tokens
        0..t of block b; positions whose own token is padding hold -1. With `return_logits`, also float32
        logits [B, U, 2, max_n, V] (memory-hungry; meant for tests).
    """
    real, noise, num_positions = _prepare(input_ids, attention_mask, max_n, noise, generator)
    check_maskable_attention(getattr(model, "config", None), "The fast Brier sampler", "score_causal_lm_ref")
    batch, length = input_ids.shape
    device = input_ids.device
    samples = torch.full((batch, num_positions, NUM_BRIER_SAMPLES, max_n), PAD_SAMPLE, dtype=torch.long, device=device)
    if num_positions == 0:
        return (samples, torch.empty(*samples.shape, 0, device=device)) if return_logits else samples

    positions = _position_ids(real)  # [B, T]
    out = model(input_ids=input_ids, attention_mask=real.long(), position_ids=positions, use_cache=True)
    logits = out.logits[:, :num_positions]  # [B, U, V]: next-token logits of every scored position
    # One CDF per position serves both samples: uniforms [B, U, 2] -> tokens [B, U, 2].
    samples[..., 0] = _sample_from_logits(logits, noise[..., 0])
    kept = [logits[:, :, None].expand(-1, -1, NUM_BRIER_SAMPLES, -1).float()] if return_logits else []
    cache = output_cache(out)
    if max_n > 1 and cache is None:
        raise ValueError("The model returned no KV cache; the fast Brier sampler needs use_cache=True.")

    rows = NUM_BRIER_SAMPLES * num_positions  # continuation rows per block, row r = 2 t + s
    dtype = _model_dtype(model, out.logits.dtype)
    # Prefix visibility [B, 2U, T]: row (t, s) sees real prefix tokens k <= t (causal attention within the block).
    causal = torch.arange(length, device=device)[None, :] <= torch.arange(num_positions, device=device)[:, None]
    prefix = causal.repeat_interleave(NUM_BRIER_SAMPLES, dim=0)[None] & real[:, None, :]
    row_positions = positions[:, :num_positions, None].expand(-1, -1, NUM_BRIER_SAMPLES).reshape(batch, rows)  # [B, 2U]

    for step in range(1, max_n):
        # Keys so far: T prefix tokens, then `step` appended blocks (the last one is this step's input).
        additive = continuation_attention_mask(prefix, step, dtype)  # [B, 2U, T + 2U * step]
        out = model(
            input_ids=samples[..., step - 1].reshape(batch, rows),  # token step-1 of every continuation [B, 2U]
            attention_mask=additive[:, None],  # [B, 1, 2U, T + 2U * step]
            position_ids=row_positions + step,  # continuation token j sits at pos(t) + 1 + j
            use_cache=True,
            **cache_kwargs(model, cache),
        )
        cache = output_cache(out)
        step_logits = out.logits.reshape(batch, num_positions, NUM_BRIER_SAMPLES, -1)  # [B, U, 2, V]
        samples[..., step] = _sample_from_logits(step_logits, noise[..., step, None])[..., 0]
        if return_logits:
            kept.append(step_logits.float())

    samples.masked_fill_(~real[:, :num_positions, None, None], PAD_SAMPLE)
    if return_logits:
        return samples, torch.stack(kept, dim=3)  # [B, U, 2, max_n, V]
    return samples


@torch.no_grad()
def sample_continuations_ref(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_n: int = BRIER_LM_MAX_N,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Slow, obviously correct reference for `sample_continuations` (same arguments, same outputs).

    For every block, position and sample it strips padding, then grows the continuation one token at a time
    with a plain cache-free forward over prefix + continuation, using the same uniforms as the fast path.
    Cost: B * U * 2 * max_n forwards. Logits at padded positions are returned as zeros.
    """
    real, noise, num_positions = _prepare(input_ids, attention_mask, max_n, noise, generator)
    batch = input_ids.shape[0]
    samples = torch.full((batch, num_positions, NUM_BRIER_SAMPLES, max_n), PAD_SAMPLE, dtype=torch.long)
    kept: torch.Tensor | None = None
    for b in range(batch):
        for t in range(num_positions):
            if not real[b, t]:
                continue
            context = input_ids[b, : t + 1][real[b, : t + 1]]  # real tokens 0..t
            for s in range(NUM_BRIER_SAMPLES):
                sequence = context
                for j in range(max_n):
                    ids = sequence[None]
                    logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None])
                    last = logits.logits[0, -1].float()  # [V]
                    token = _sample_from_logits(last, noise[b, t, s, j, None])  # [1]
                    samples[b, t, s, j] = token.item()
                    if return_logits:
                        if kept is None:
                            kept = torch.zeros(*samples.shape, last.shape[-1])
                        kept[b, t, s, j] = last.cpu()
                    sequence = torch.cat([sequence, token.to(sequence.device)])
    samples = samples.to(input_ids.device)
    if return_logits:
        return samples, (kept if kept is not None else torch.empty(*samples.shape, 0))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def true_continuations(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    max_n: int = BRIER_LM_MAX_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """True next max_n tokens of every position and the end-of-block / label rule (module docstring).

    Returns:
        `targets` LongTensor [B, U, max_n] (`targets[b, t] = labels[b, t+1 : t+1+max_n]`, labels default to
        input_ids, HF convention: labels are aligned with input_ids and shifted here) and `valid` bool [B, U]:
        True iff all max_n targets are real (label != -100, attention_mask 1) and token t is real.
    """
    check_max_n(max_n)
    _check_ids("input_ids", input_ids)
    _check_ids("labels", labels, like=input_ids)
    _check_ids("attention_mask", attention_mask, like=input_ids)
    batch, length = input_ids.shape
    num_positions = max(length - max_n, 0)
    y = (input_ids if labels is None else labels).long()
    real = torch.ones_like(y, dtype=torch.bool) if attention_mask is None else attention_mask != 0
    y = y.masked_fill(~real, IGNORE_INDEX)
    if num_positions == 0:
        return y.new_zeros(batch, 0, max_n), real.new_zeros(batch, 0)
    targets = gather_targets(y, torch.arange(num_positions, device=y.device) + 1, max_n)  # row t = y[t+1 .. t+max_n]
    valid = (targets != IGNORE_INDEX).all(dim=-1) & real[:, :num_positions]
    return targets, valid


def _to_block_layout(
    samples: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None, max_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    targets, valid = true_continuations(input_ids, attention_mask, labels, max_n)
    targets = targets.to(samples.device)
    valid = valid.to(samples.device)
    per_position = brier_indicators(samples[:, :, 0], samples[:, :, 1], targets, max_n=max_n, mask=valid)
    batch, length = input_ids.shape
    brier = torch.zeros(batch, length, max_n, device=samples.device)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=samples.device)
    brier[:, : valid.shape[1]] = per_position
    mask[:, : valid.shape[1]] = valid
    return brier, mask


def score_causal_lm(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    max_n: int = BRIER_LM_MAX_N,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position Brier-1..max_n estimates of a transformers causal LM on a batch of blocks (fast path).

    Args:
        model: `AutoModelForCausalLM`-style model (eager or sdpa attention), put in eval mode by the caller.
        input_ids (`torch.LongTensor` of shape `[B, T]`): the blocks.
        attention_mask (`torch.Tensor` of shape `[B, T]`, *optional*): 1 for real tokens, 0 for padding.
        labels (`torch.LongTensor` of shape `[B, T]`, *optional*): targets aligned with input_ids (HF convention);
            -100 marks tokens that are not targets. Defaults to input_ids.
        max_n (`int`, *optional*, defaults to 4): largest n-gram order.
        generator (`torch.Generator`, *optional*): source of all sampling randomness (CPU generators give the same
            draws on every device).

    Returns:
        `(brier, mask)`: float32 [B, T, max_n] per-position estimates (0 where masked) and bool [B, T], True at
        the positions scored under the end-of-block rule (never at the last max_n positions of a block).
    """
    samples = sample_continuations(model, input_ids, attention_mask, max_n=max_n, generator=generator)
    return _to_block_layout(samples, input_ids, attention_mask, labels, max_n)


def score_causal_lm_ref(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    max_n: int = BRIER_LM_MAX_N,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`score_causal_lm` through the slow reference sampler; same arguments, same outputs for the same generator."""
    samples = sample_continuations_ref(model, input_ids, attention_mask, max_n=max_n, generator=generator)
    return _to_block_layout(samples, input_ids, attention_mask, labels, max_n)


# ----------------------------------------------------------------------------------------------------------------
# Batches of blocks, seeds
# ----------------------------------------------------------------------------------------------------------------

Blocks = torch.Tensor | Mapping[str, torch.Tensor] | Iterable


def _as_batch(item) -> dict[str, torch.Tensor | None]:
    if isinstance(item, torch.Tensor):
        return {"input_ids": item, "labels": None, "attention_mask": None}
    if isinstance(item, Mapping) and "input_ids" in item:
        return {k: (torch.as_tensor(item[k]) if item.get(k) is not None else None)
                for k in ("input_ids", "labels", "attention_mask")}
    raise ValueError(
        f"Each batch must be a LongTensor [B, T] of input_ids or a mapping with 'input_ids' (and optional 'labels', "
        f"'attention_mask'), got {type(item).__name__}."
    )


def _iter_batches(blocks: Blocks, batch_size: int) -> tuple[Iterator[dict], int | None]:
    """(batches, number of batches or None). A tensor or a mapping of tensors [N, T] is cut into `batch_size`
    rows; any other iterable (e.g. a DataLoader) is taken as already batched."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if isinstance(blocks, (torch.Tensor, Mapping)):
        whole = _as_batch(blocks)
        _check_ids("input_ids", whole["input_ids"])
        num_blocks = whole["input_ids"].shape[0]
        starts = range(0, num_blocks, batch_size)
        batches = ({k: (v[i : i + batch_size] if v is not None else None) for k, v in whole.items()} for i in starts)
        return batches, len(starts)
    if isinstance(blocks, Iterable):
        return (_as_batch(b) for b in blocks), (len(blocks) if hasattr(blocks, "__len__") else None)
    raise ValueError(
        f"blocks must be a tensor, a mapping of tensors or an iterable of batches, got {type(blocks).__name__}."
    )


def _takes_keyword(function, name: str) -> bool:
    """Whether `function` accepts the keyword argument `name` (by name or through **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _batch_inputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    device = _model_device(model)
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device) if batch["labels"] is not None else None
    attention_mask = batch["attention_mask"].to(device) if batch["attention_mask"] is not None else None
    return input_ids, labels, attention_mask


def _protocol_extra(function, attention_mask: torch.Tensor | None) -> dict:
    # Protocol models get right-padded blocks; padding is marked by labels of -100 (module docstring), and by the
    # attention mask for those that take one (a CALM does).
    if attention_mask is not None and _takes_keyword(function, "attention_mask"):
        return {"attention_mask": attention_mask}
    return {}


def _check_protocol_output(name: str, brier: torch.Tensor, input_ids: torch.Tensor, max_n: int) -> None:
    if brier.dim() != 3 or brier.shape[0] != input_ids.shape[0] or brier.shape[-1] != max_n:
        raise ValueError(
            f"model.{name} must return per-position estimates of shape [B={input_ids.shape[0]}, P, "
            f"max_n={max_n}], got {tuple(brier.shape)}."
        )


def _score_batch(
    model, batch: dict, max_n: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, labels, attention_mask = _batch_inputs(model, batch)
    score_brier = getattr(model, "score_brier", None)
    if callable(score_brier):
        extra = _protocol_extra(score_brier, attention_mask)
        brier, mask = score_brier(input_ids, labels=labels, max_n=max_n, generator=generator, **extra)
        _check_protocol_output("score_brier", brier, input_ids, max_n)
        return brier, mask
    return score_causal_lm(model, input_ids, attention_mask, labels, max_n=max_n, generator=generator)


def _seeds_scorer(model):
    """`model.score_brier_seeds` (one call scores a batch for several generators) if the model has it beside
    `score_brier`, else None."""
    score_brier_seeds = getattr(model, "score_brier_seeds", None)
    if callable(score_brier_seeds) and callable(getattr(model, "score_brier", None)):
        return score_brier_seeds
    return None


def _score_batch_seeds(
    model, batch: dict, max_n: int, generators: list[torch.Generator]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    input_ids, labels, attention_mask = _batch_inputs(model, batch)
    score_brier_seeds = _seeds_scorer(model)
    extra = _protocol_extra(score_brier_seeds, attention_mask)
    results = list(score_brier_seeds(input_ids, labels=labels, max_n=max_n, generators=generators, **extra))
    if len(results) != len(generators):
        raise ValueError(
            f"model.score_brier_seeds must return one (brier, mask) per generator: got {len(results)} for "
            f"{len(generators)} generators."
        )
    for brier, _ in results:
        _check_protocol_output("score_brier_seeds", brier, input_ids, max_n)
    return results


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of the generator that scores batch `batch_index` in the pass of `seed` (`evaluate_brier`).

    A 64-bit BLAKE2b hash of (seed, batch_index): it depends on nothing else (not on the number of processes or on
    which process scores the batch), and distinct pairs practically never share a seed.
    """
    for name, value in (("seed", seed), ("batch_index", batch_index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}.")
    if batch_index < 0:
        raise ValueError(f"batch_index must be >= 0, got {batch_index}.")
    digest = hashlib.blake2b(f"calm-brier:{seed}:{batch_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialized default torch.distributed process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _accumulate(
    model, blocks: Blocks, batch_size: int, max_n: int, generator: torch.Generator | None, bar: tqdm
) -> BrierAccumulator:
    """One pass over all blocks with one generator (one seed)."""
    accumulator = BrierAccumulator(max_n)
    batches, _ = _iter_batches(blocks, batch_size)
    with torch.no_grad():
        for batch in batches:
            brier, mask = _score_batch(model, batch, max_n, generator)
            accumulator.update(brier, mask)
            bar.update(1)
    return accumulator


def _accumulate_sharded(
    model, blocks: Blocks, batch_size: int, max_n: int, seed: int, rank: int, world_size: int, bar: tqdm
) -> BrierAccumulator:
    """One pass of `seed` over all blocks, split over processes: batch i is scored by process i % world_size with
    its own generator seeded by `batch_seed(seed, i)`. The per-batch sums of every process are gathered and added
    in batch order, so every process returns the same accumulator, bit for bit the one a single process gets."""
    local: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    batches, _ = _iter_batches(blocks, batch_size)
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if index % world_size != rank:
                continue
            brier, mask = _score_batch(model, batch, max_n, torch.Generator().manual_seed(batch_seed(seed, index)))
            local.append((index, 0, *_batch_sums(brier, mask, max_n)))
            bar.update(1)
    return _merge_batches(local, world_size, max_n, num_passes=1)[0]


def _accumulate_sharded_seeds(
    model, blocks: Blocks, batch_size: int, max_n: int, seeds: list[int], rank: int, world_size: int, bar: tqdm
) -> list[BrierAccumulator]:
    """The passes of all `seeds` at once, for a model with `score_brier_seeds`: every batch is read once and
    scored for each seed with the generator `batch_seed(seed, i)` that `_accumulate_sharded` would give it, so
    the accumulators are exactly those of one `_accumulate_sharded` per seed (a CALM runs its backbone once per
    batch instead of once per batch and seed)."""
    local: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    batches, _ = _iter_batches(blocks, batch_size)
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if index % world_size != rank:
                continue
            generators = [torch.Generator().manual_seed(batch_seed(seed, index)) for seed in seeds]
            for position, (brier, mask) in enumerate(_score_batch_seeds(model, batch, max_n, generators)):
                local.append((index, position, *_batch_sums(brier, mask, max_n)))
            bar.update(len(seeds))
    return _merge_batches(local, world_size, max_n, num_passes=len(seeds))


def _batch_sums(brier: torch.Tensor, mask: torch.Tensor, max_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    one = BrierAccumulator(max_n)
    one.update(brier, mask)
    return one.sums, one.counts


def _merge_batches(
    local: list[tuple[int, int, torch.Tensor, torch.Tensor]], world_size: int, max_n: int, num_passes: int
) -> list[BrierAccumulator]:
    """Gathers the (batch index, pass, sums, counts) records of every process and adds them in batch order, one
    accumulator per pass; every batch index 0..N-1 must appear once per pass."""
    if world_size > 1:
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, local)
        local = [record for part in gathered for record in part]
    accumulators = []
    for position in range(num_passes):
        records = sorted((r for r in local if r[1] == position), key=lambda record: record[0])
        indices = [index for index, _, _, _ in records]
        if len(set(indices)) != len(indices) or indices != list(range(len(indices))):
            raise ValueError(
                f"The processes scored batches {indices}, not each of 0..{len(indices) - 1} once: every process "
                f"must see the same blocks in the same order."
            )
        accumulator = BrierAccumulator(max_n)
        for _, _, sums, counts in records:
            accumulator.sums += sums
            accumulator.counts += counts
        accumulators.append(accumulator)
    return accumulators


def score_blocks(
    model,
    blocks: Blocks,
    batch_size: int = 8,
    max_n: int = BRIER_LM_MAX_N,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> BrierAccumulator:
    """Scores every block once and returns the accumulated Brier-1..max_n sums (one seed's pass).

    Args:
        model: a model with `score_brier` (protocol in the module docstring) or a transformers causal LM.
        blocks: LongTensor [N, T] of input_ids, a mapping {"input_ids", optional "labels", "attention_mask"} of
            [N, T] tensors (e.g. from `load_text_blocks`), or an iterable of such batches (e.g. a DataLoader).
        batch_size (`int`): blocks per forward; ignored for an already batched iterable.
        max_n (`int`): largest n-gram order. generator: source of all sampling randomness.
        progress (`bool`): show a tqdm bar.

    Returns:
        `BrierAccumulator`; `.compute()` gives Brier-1..max_n, BrierLM and the number of positions.
    """
    check_max_n(max_n)
    _, total = _iter_batches(blocks, batch_size)
    with tqdm(total=total, disable=not progress, desc="BrierLM") as bar:
        return _accumulate(model, blocks, batch_size, max_n, generator, bar)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    # Sample standard deviation over seeds (n - 1); undefined (NaN) for a single seed.
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def evaluate_brier(
    model,
    blocks: Blocks,
    batch_size: int = 8,
    seeds: Sequence[int] = (0, 1, 2),
    progress: bool = True,
    max_n: int = BRIER_LM_MAX_N,
) -> dict:
    """BrierLM of a model on evaluation blocks, repeated over sampling seeds, on one or several processes.

    Randomness: in the pass of seed s, batch i (the i-th batch of `batch_size` blocks, or the i-th item of an
    already batched iterable) is scored with its own `torch.Generator().manual_seed(batch_seed(s, i))`, so the
    result of a seed depends only on the blocks, the batching and the model, not on the number of processes.
    (Before, one generator per seed ran through all batches in order; the same seed now gives different samples,
    hence slightly different numbers, than in versions with that scheme.) The blocks must come in the same order
    every pass and on every process, so an iterable of batches must be re-iterable: a list or a DataLoader (not
    shuffled), not a generator. The model is put in eval mode and restored to its previous mode afterwards.
    A model with `score_brier_seeds` (a CALM) is given each batch once with the generators of all seeds (same
    draws, same numbers; its backbone reads the batch once); other models are run one pass per seed.

    Several processes: when a torch.distributed default process group is initialized (e.g. by
    `accelerate.PartialState()` under `accelerate launch` or `torchrun`; gloo on CPUs, NCCL on GPUs), batch i is
    scored by process i % world_size only, and the per-batch Brier sums of all processes are gathered and added in
    batch order before `compute()`. Every process returns the same dict, equal (exactly, not within a tolerance)
    to the one a single process returns for the same seeds. Each process must hold the whole model (it is not
    wrapped or sharded) and see the same `blocks`; the progress bar shows on process 0 only, counting its batches.
    Without a process group this is a plain one-process loop.

    Args:
        model: a model with `score_brier` or a transformers causal LM. blocks: see `score_blocks`.
        batch_size (`int`): blocks per forward. seeds (sequence of `int`): one pass per seed.
        progress (`bool`): show a tqdm bar. max_n (`int`): largest n-gram order (BrierLM uses 4).

    Returns:
        `dict` with
        - "per_seed": list of {"seed", "brier_1".."brier_{max_n}", "brier_lm", "num_positions"};
        - "mean" and "std": {"brier_1".., "brier_lm"} over seeds (BrierLM averaged per seed; std is the sample
          standard deviation, NaN for one seed);
        - "pooled": Brier-n means over all seeds' samples together and the BrierLM of those (less noisy);
        - "num_positions": positions scored per pass; "seeds"; "max_n".
    """
    check_max_n(max_n)
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of integers, got {seeds!r}.")
    if isinstance(blocks, Iterator) and len(seeds) > 1:
        raise ValueError("blocks is a one-shot iterator but every seed re-reads it; pass a list or a DataLoader.")
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    pooled = BrierAccumulator(max_n)
    per_seed = []
    rank, world_size = _process_group()
    _, num_batches = _iter_batches(blocks, batch_size)
    # Batches of this process per pass: indices rank, rank + world_size, ...
    local_batches = None if num_batches is None else len(range(rank, num_batches, world_size))
    total = None if local_batches is None else local_batches * len(seeds)
    bar = tqdm(total=total, disable=not progress or rank != 0, desc="BrierLM")
    if world_size > 1:
        logger.info("BrierLM over %d processes (this is process %d).", world_size, rank)
    try:
        # A model with score_brier_seeds (a CALM) scores each batch once for all seeds; the numbers are the same.
        together = (
            _accumulate_sharded_seeds(model, blocks, batch_size, max_n, seeds, rank, world_size, bar)
            if _seeds_scorer(model) is not None
            else None
        )
        for position, seed in enumerate(seeds):
            if together is not None:
                accumulator = together[position]
            else:
                accumulator = _accumulate_sharded(model, blocks, batch_size, max_n, seed, rank, world_size, bar)
            result = accumulator.compute()
            per_seed.append({"seed": seed, **result})
            pooled.merge(accumulator)
            bar.set_postfix(seed=seed, brier_lm=f"{result['brier_lm']:.3f}")
            if rank == 0:
                logger.info("BrierLM seed %d: %s", seed, result)
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()

    keys = [f"brier_{n + 1}" for n in range(max_n)] + ["brier_lm"]
    stats = {k: _mean_std([r[k] for r in per_seed]) for k in keys}
    counts = {r["num_positions"] for r in per_seed}
    if len(counts) > 1:
        logger.warning("Seeds scored different numbers of positions %s; num_positions reports the first.", counts)
    pooled_result = pooled.compute()
    pooled_result.pop("num_positions")
    return {
        "per_seed": per_seed,
        "mean": {k: m for k, (m, _) in stats.items()},
        "std": {k: s for k, (_, s) in stats.items()},
        "pooled": pooled_result,
        "num_positions": per_seed[0]["num_positions"],
        "seeds": seeds,
        "max_n": max_n,
    }


# ----------------------------------------------------------------------------------------------------------------
# Evaluation text
# ----------------------------------------------------------------------------------------------------------------


def load_text_blocks(
    path: str | os.PathLike,
    tokenizer,
    block_size: int,
    multiple_of: int = 1,
    drop_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenizes an evaluation file and cuts it into blocks of `block_size` tokens, without `datasets`.

    - Documents are read by `modeling_calm.data_calm.iter_texts`, the reader of the training data too: in a `.txt`
      file documents are separated by blank lines (line breaks inside a document are kept); a `.jsonl` file has one
      JSON object with a "text" field per line. Either may be compressed (.gz, .bz2, .xz). Blank documents are
      skipped.
    - Documents are tokenized without special tokens and concatenated with one separator token between
      consecutive documents: the tokenizer's eos token, else its bos token, else none. The separator is scored
      like any other token.
    - The last partial block is kept, right-padded (pad token, else the separator, else 0) with labels -100 and
      attention_mask 0, so every token is a target exactly once; `drop_last=True` drops it instead.

    Args:
        path: the .txt or .jsonl file. tokenizer: a transformers tokenizer.
        block_size (`int`): tokens per block; must be a multiple of `multiple_of`.
        multiple_of (`int`, *optional*): K (tokens per chunk) for a CALM, 1 otherwise.
        drop_last (`bool`, *optional*): drop the last partial block instead of padding it.

    Returns:
        {"input_ids", "labels", "attention_mask"}: LongTensors [N, block_size].
    """
    for name, value in (("block_size", block_size), ("multiple_of", multiple_of)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if block_size % multiple_of != 0:
        raise ValueError(
            f"block_size={block_size} must be a multiple of multiple_of={multiple_of} (a CALM scores whole chunks "
            f"of K tokens)."
        )
    path = os.fspath(path)
    from modeling_calm.data_calm import iter_texts

    documents = [d for d in iter_texts(path) if d.strip()]
    if not documents:
        raise ValueError(f"Evaluation file {path!r} contains no text.")

    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if separator is None:
        logger.warning("Tokenizer has neither eos nor bos token; documents of %s are concatenated directly.", path)
    ids: list[int] = []
    for document in documents:
        tokens = list(tokenizer(document, add_special_tokens=False)["input_ids"])
        if not tokens:
            continue
        if ids and separator is not None:
            ids.append(separator)
        ids.extend(tokens)
    if not ids:
        raise ValueError(f"Evaluation file {path!r} tokenizes to no tokens.")

    num_full, remainder = divmod(len(ids), block_size)
    if drop_last and num_full == 0:
        raise ValueError(
            f"Evaluation file {path!r} has {len(ids)} tokens, fewer than block_size={block_size}, and drop_last=True."
        )
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    attention_mask = torch.ones_like(input_ids)
    if remainder and not drop_last:
        padding = block_size - remainder
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator
        pad = torch.full((padding,), 0 if pad_id is None else pad_id, dtype=torch.long)
        input_ids = torch.cat([input_ids, pad])
        labels = torch.cat([labels, torch.full((padding,), IGNORE_INDEX, dtype=torch.long)])
        attention_mask = torch.cat([attention_mask, torch.zeros(padding, dtype=torch.long)])
    num_blocks = input_ids.numel() // block_size
    keep = num_blocks * block_size
    logger.info("%s: %d tokens in %d blocks of %d.", path, len(ids), num_blocks, block_size)
    return {
        "input_ids": input_ids[:keep].view(num_blocks, block_size),
        "labels": labels[:keep].view(num_blocks, block_size),
        "attention_mask": attention_mask[:keep].view(num_blocks, block_size),
    }
