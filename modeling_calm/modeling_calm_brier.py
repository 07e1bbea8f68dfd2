"""BrierLM for CALM: the estimator and the CALM sampler (arXiv 2510.27688, section "Likelihood-Free LM Evaluation").

The Brier score of a predictive distribution P for the observed outcome y, Brier(P, y) = 2 P(y) - sum_x P(x)^2
(eq. 1), has an unbiased estimator from two independent samples x1, x2 ~ P:
1{x1 = y} + 1{x2 = y} - 1{x1 = x2} (eq. 2). Brier-n applies it to the next n tokens as one outcome, and
BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4)^(1/4). The derivation, what a CALM is scored on (chunk
boundaries, continuations while K < max_n), the randomness and the fast path's 4-D mask are written out in
docs/brierlm.md.

This module holds three things: the estimator (`brier_indicators`, `brier_sums`, `brier_scores`, `brier_lm`,
`BrierAccumulator`), the pieces every sampler shares (the constants, `check_maskable_attention`,
`continuation_attention_mask`, `gather_targets`), and the CALM sampler (`score_calm_brier`, fast and reference;
`score_calm_brier_seeds`, the fast path for several generators with one backbone forward, and lazy decoding: see
docs/brierlm.md, "Speed"). `evaluation_calm` (not shipped) builds the causal-LM sampler from the same pieces.

Shape letters (besides those of `modeling_calm`): `...` any leading dimensions, R = ceil(max_n / K) head steps
per sample, U scored positions (chunk boundaries for a CALM), and the estimator's `n_tokens >= max_n` tokens per
continuation. Two samples per position. Per-position estimates lie in {-1, 0, 1}: only means over many
positions (and seeds) are meaningful.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .modeling_calm_compat import output_cache
from .modeling_calm_sampling import check_positive_int


__all__ = [
    "BRIER_LM_MAX_N",
    "BRIER_LM_SCALE",
    "IGNORE_INDEX",
    "MASKABLE_ATTENTION",
    "NUM_BRIER_SAMPLES",
    "PAD_SAMPLE",
    "BrierAccumulator",
    "brier_indicators",
    "brier_chunk_masks",
    "brier_lm",
    "brier_num_positions",
    "brier_num_steps",
    "brier_scores",
    "brier_sums",
    "brier_targets",
    "check_max_n",
    "check_maskable_attention",
    "continuation_attention_mask",
    "draw_brier_noise",
    "gather_targets",
    "sample_brier_continuations",
    "sample_brier_continuations_ref",
    "score_calm_brier",
    "score_calm_brier_seeds",
]

# The paper's BrierLM is the geometric mean of Brier-1..4.
BRIER_LM_MAX_N = 4
# BrierLM is reported in percent.
BRIER_LM_SCALE = 100.0
# The estimator of eq. 2 needs exactly two independent samples per position.
NUM_BRIER_SAMPLES = 2
# transformers' convention for "not a target".
IGNORE_INDEX = -100
# Token id written into sample slots that are never scored (padding, boundaries too close to the block end).
PAD_SAMPLE = -1
# Attention implementations that take an arbitrary 4-D additive float mask.
MASKABLE_ATTENTION = ("eager", "sdpa")


def check_max_n(max_n: int) -> None:
    """Raises unless the n-gram order `max_n` is an integer >= 1."""
    check_positive_int("max_n", max_n)


def _check_mask(mask: torch.Tensor, lead_shape: torch.Size, max_n: int, name: str = "mask") -> torch.Tensor:
    """Returns `mask` as bool of shape [..., max_n] (a per-position mask [...] is broadcast over n)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}.")
    if mask.shape == lead_shape:
        mask = mask.unsqueeze(-1).expand(*lead_shape, max_n)
    elif mask.shape != (*lead_shape, max_n):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}; it must be the leading shape {tuple(lead_shape)} (one flag per "
            f"position) or {(*lead_shape, max_n)} (one flag per position and n-gram order)."
        )
    return mask != 0


def brier_indicators(
    sample1: torch.Tensor,
    sample2: torch.Tensor,
    targets: torch.Tensor,
    max_n: int = BRIER_LM_MAX_N,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position unbiased estimates of Brier-1..max_n (eq. 2) from two sampled continuations.

    Args:
        sample1 (`torch.LongTensor` of shape `[..., n_tokens]`):
            First sampled continuation at each position, n_tokens >= max_n.
        sample2 (`torch.LongTensor` of shape `[..., n_tokens]`):
            Second sampled continuation, drawn independently of `sample1` given the same context (with identical
            draws the estimate degenerates to 2 * 1{x = y} - 1 and is meaningless).
        targets (`torch.LongTensor` of shape `[..., n_tokens]`):
            The true continuation at each position.
        max_n (`int`, *optional*, defaults to 4):
            Largest n-gram order; only the first `max_n` tokens of each continuation are compared.
        mask (`torch.Tensor` of shape `[...]` or `[..., max_n]`, *optional*):
            Non-zero where the estimate is valid (per position, or per position and n). Invalid entries are set
            to 0 so that sums over the output stay correct; divide by `mask.sum()` (see `brier_sums`), never by
            the number of entries.

    Returns:
        `torch.FloatTensor` of shape `[..., max_n]` (float32): entry `[..., n - 1]` is
        1{x1[:n] = y[:n]} + 1{x2[:n] = y[:n]} - 1{x1[:n] = x2[:n]}, in {-1, 0, 1}.
    """
    check_max_n(max_n)
    names = ("sample1", "sample2", "targets")
    tensors = (sample1, sample2, targets)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(t).__name__}.")
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must hold integer token ids, got dtype {t.dtype}.")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension [..., n_tokens], got a 0-d tensor.")
    if not (sample1.shape == sample2.shape == targets.shape):
        raise ValueError(
            f"sample1, sample2 and targets must have the same shape [..., n_tokens], got {tuple(sample1.shape)}, "
            f"{tuple(sample2.shape)} and {tuple(targets.shape)}."
        )
    n_tokens = targets.shape[-1]
    if n_tokens < max_n:
        raise ValueError(
            f"Continuations have n_tokens={n_tokens} tokens but max_n={max_n}; Brier-n needs at least n tokens, so "
            f"n_tokens must be >= max_n."
        )

    x1, x2, y = sample1[..., :max_n], sample2[..., :max_n], targets[..., :max_n]
    # Prefix equality via cumprod: the n-grams agree iff tokens 1..n all agree. [..., max_n] each.
    hit1 = (x1 == y).long().cumprod(dim=-1)
    hit2 = (x2 == y).long().cumprod(dim=-1)
    collide = (x1 == x2).long().cumprod(dim=-1)
    scores = (hit1 + hit2 - collide).float()  # eq. 2 for n = 1..max_n, [..., max_n]

    if mask is not None:
        valid = _check_mask(mask.to(scores.device), y.shape[:-1], max_n)
        scores = scores.masked_fill(~valid, 0.0)
    return scores


def brier_sums(
    indicators: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of per-position Brier estimates over valid positions, the sufficient statistics for means.

    Args:
        indicators (`torch.Tensor` of shape `[..., max_n]`): output of `brier_indicators`.
        mask (`torch.Tensor` of shape `[...]` or `[..., max_n]`, *optional*): non-zero where valid; all valid if None.

    Returns:
        `(sums, counts)`, both float64 of shape `[max_n]` on the CPU: the sum of valid estimates and the number of
        valid positions for each n. float64 because evaluation sums millions of small integers.
    """
    if not isinstance(indicators, torch.Tensor) or indicators.dim() < 1:
        raise ValueError("indicators must be a tensor of shape [..., max_n] (the output of brier_indicators).")
    max_n = indicators.shape[-1]
    check_max_n(max_n)
    values = indicators.detach().to(torch.float64)
    if mask is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    else:
        valid = _check_mask(mask.detach().to(values.device), values.shape[:-1], max_n)
    sums = values.masked_fill(~valid, 0.0).reshape(-1, max_n).sum(dim=0)
    counts = valid.reshape(-1, max_n).sum(dim=0).to(torch.float64)
    return sums.cpu(), counts.cpu()


def brier_scores(indicators: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Brier-1..max_n over the valid positions.

    Args:
        indicators (`torch.Tensor` of shape `[..., max_n]`): output of `brier_indicators`.
        mask (`torch.Tensor` of shape `[...]` or `[..., max_n]`, *optional*): non-zero where valid (e.g. False where
            a target is a label of -100 or a position lacks max_n future tokens); all valid if None.

    Returns:
        `torch.Tensor` float64 of shape `[max_n]`: mean Brier-n estimates, each an unbiased estimate of the mean
        Brier-n score over the valid positions.

    Raises:
        ValueError: if some n has no valid position (a mean over nothing is undefined).
    """
    sums, counts = brier_sums(indicators, mask)
    if (counts == 0).any():
        empty = [n + 1 for n in range(counts.numel()) if counts[n] == 0]
        raise ValueError(f"No valid position for Brier-n with n in {empty}: every entry is masked out.")
    return sums / counts


def brier_lm(brier_scores: torch.Tensor | Sequence[float]) -> float:
    """BrierLM = 100 * geometric mean of the mean Brier-n scores (the paper uses n = 1..4).

    A Brier-n mean can be <= 0 (a model whose samples collide more often than they hit the target, e.g. a
    near-deterministic wrong model, or sampling noise on a weak model), and a geometric mean of non-positive
    values is undefined. Rule: each mean is clamped at 0 from below first, so any Brier-n <= 0 gives BrierLM = 0.
    NaN inputs give NaN.

    Args:
        brier_scores (`torch.Tensor` of shape `[max_n]` or a sequence of floats): mean Brier-1..max_n, e.g. from
            `brier_scores` or `BrierAccumulator`.

    Returns:
        `float`: BrierLM in percent. The exact Brier score is at most 1 (eq. 1 with P(y) = 1), so the expected
        value lies in [0, 100]; a mean of few noisy estimates can exceed 100.
    """
    values = torch.as_tensor(brier_scores, dtype=torch.float64).flatten().cpu()
    if values.numel() < 1:
        raise ValueError("brier_scores must hold at least one Brier-n mean, got an empty sequence.")
    if torch.isnan(values).any():
        return float("nan")
    clamped = values.clamp(min=0.0)
    if (clamped == 0).any():
        return 0.0
    # Geometric mean in log space: the product of four numbers ~1e-2 is fine in float64, but this never underflows.
    return BRIER_LM_SCALE * math.exp(float(clamped.log().mean()))


class BrierAccumulator:
    """Accumulates Brier-1..max_n sums and counts across batches (and seeds) and reports means and BrierLM.

    Example:
        acc = BrierAccumulator(max_n=4)
        for batch in batches:
            per_position, mask = score(batch)     # [B, U, 4], [B, U]
            acc.update(per_position, mask)
        acc.compute()  # {"brier_1": ..., ..., "brier_4": ..., "brier_lm": ..., "num_positions": ...}
    """

    def __init__(self, max_n: int = BRIER_LM_MAX_N):
        check_max_n(max_n)
        self.max_n = max_n
        self.reset()

    def reset(self) -> None:
        # float64 on the CPU: exact for integer-valued sums up to 2^53.
        self.sums = torch.zeros(self.max_n, dtype=torch.float64)
        self.counts = torch.zeros(self.max_n, dtype=torch.float64)

    def update(self, indicators: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adds per-position estimates `indicators` [..., max_n] where `mask` ([...] or [..., max_n]) is non-zero."""
        if not isinstance(indicators, torch.Tensor) or indicators.dim() < 1 or indicators.shape[-1] != self.max_n:
            shape = tuple(indicators.shape) if isinstance(indicators, torch.Tensor) else type(indicators).__name__
            raise ValueError(f"indicators must have shape [..., max_n={self.max_n}], got {shape}.")
        sums, counts = brier_sums(indicators, mask)
        self.sums += sums
        self.counts += counts

    def merge(self, other: BrierAccumulator) -> BrierAccumulator:
        """Adds another accumulator's sums and counts (e.g. from another process or seed); returns self."""
        if not isinstance(other, BrierAccumulator) or other.max_n != self.max_n:
            raise ValueError(f"Can only merge a BrierAccumulator with the same max_n={self.max_n}.")
        self.sums += other.sums
        self.counts += other.counts
        return self

    @property
    def num_positions(self) -> int:
        """Number of positions counted for Brier-1 (the largest count when masks differ per n)."""
        return int(self.counts[0].item())

    def scores(self) -> torch.Tensor:
        """Mean Brier-1..max_n, float64 [max_n]; ValueError if some n has no valid position yet."""
        if (self.counts == 0).any():
            empty = [n + 1 for n in range(self.max_n) if self.counts[n] == 0]
            raise ValueError(f"No valid position accumulated for Brier-n with n in {empty}; call update() first.")
        return self.sums / self.counts

    def compute(self) -> dict[str, float | int]:
        """Returns {"brier_1": ..., "brier_{max_n}": ..., "brier_lm": ..., "num_positions": ...}.

        `brier_lm` is the geometric mean of all accumulated orders 1..max_n (the paper's BrierLM when max_n = 4),
        with the clamp-at-0 rule of `brier_lm`.
        """
        means = self.scores()
        result: dict[str, float | int] = {f"brier_{n + 1}": float(means[n]) for n in range(self.max_n)}
        result["brier_lm"] = brier_lm(means)
        result["num_positions"] = self.num_positions
        return result


# --------------------------------------------------------------------------------------------------------------
# Pieces both samplers share (this CALM sampler and evaluation_calm's causal-LM sampler)


def check_maskable_attention(config, sampler: str, fallback: str) -> None:
    """Raise unless `config`'s attention implementation takes the 4-D additive mask of
    `continuation_attention_mask` (`MASKABLE_ATTENTION`); `sampler` and `fallback` name the caller and its
    reference path in the message."""
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None and impl not in MASKABLE_ATTENTION:
        raise ValueError(
            f"{sampler} continues samples under a custom 4-D attention mask, which needs attention implementation "
            f"{' or '.join(MASKABLE_ATTENTION)}; got {impl!r}. Call model.set_attn_implementation('sdpa') first, "
            f"or use {fallback}."
        )


def continuation_attention_mask(prefix: torch.Tensor, step: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask "prefix + own continuation" of continuation step `step` (>= 1).

    Row r of `prefix` `[..., rows, L]` (bool) says which of the L cached prefix entries the row sees; the cache
    then holds `step` appended groups of `rows` entries (one per row, the last one this step's input), and each row
    sees only its own entry of every group. Returns `[..., rows, L + rows * step]` in `dtype`: 0 where visible, the
    dtype's minimum elsewhere.
    """
    rows = prefix.shape[-2]
    own = torch.eye(rows, dtype=torch.bool, device=prefix.device).expand(*prefix.shape[:-2], rows, rows)
    visible = torch.cat([prefix] + [own] * step, dim=-1)
    return torch.zeros(visible.shape, dtype=dtype, device=prefix.device).masked_fill_(~visible, torch.finfo(dtype).min)


def gather_targets(labels: torch.Tensor, starts: torch.Tensor, max_n: int) -> torch.Tensor:
    """The true next max_n tokens from each start: `labels [B, T]`, `starts [U]` -> `[B, U, max_n]`, with
    `IGNORE_INDEX` past the block end (labels already mark the other non-targets with it)."""
    y = labels.long()
    padded = torch.cat([y, y.new_full((y.shape[0], max_n), IGNORE_INDEX)], dim=1)  # [B, T + max_n]
    index = starts[:, None] + torch.arange(max_n, device=y.device)[None, :]  # [U, max_n], all < T + max_n
    return padded[:, index]


# --------------------------------------------------------------------------------------------------------------
# The CALM sampler


def brier_num_steps(patch_size: int, max_n: int = BRIER_LM_MAX_N) -> int:
    """R = ceil(max_n / K): head steps per sample to produce at least max_n tokens."""
    return math.ceil(max_n / patch_size)


def brier_num_positions(num_tokens: int, patch_size: int, max_n: int = BRIER_LM_MAX_N) -> int:
    """Chunk boundaries of a block of `num_tokens` tokens whose max_n targets lie inside it: i with
    (i + 1) K + max_n <= T, i.e. floor((T - max_n) / K) (0 for blocks too short)."""
    return max(num_tokens - max_n, 0) // patch_size


def _check_inputs(
    model, input_ids: torch.Tensor, labels: torch.Tensor | None, max_n: int, attention_mask: torch.Tensor | None = None
) -> int:
    check_max_n(max_n)
    k = model.config.patch_size
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        desc = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of shape [B, T], got {desc}.")
    if input_ids.shape[1] == 0 or input_ids.shape[1] % k:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens per block; a CALM is scored at chunk boundaries, so the "
            f"block size must be a positive multiple of patch_size K={k}."
        )
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}.")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"attention_mask must be a token mask of the shape of input_ids {tuple(input_ids.shape)}, got {shape}."
        )
    return k


def brier_chunk_masks(attention_mask: torch.Tensor | None, patch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Which chunks a CALM sees and at which boundaries its context is clean, from a token mask `[B, T]`.

    Returns None without a mask, else `(seen [B, L], clean [B, L])` bools: `seen` marks chunks with at least one
    real token (whole padding chunks are masked out of attention, as in the forward); `clean[b, i]` is True iff
    chunk i is all real and no chunk 0..i is part padding (the model reads a chunk whole, so a partly padded
    chunk in the context would be read as text, unlike a token LM, which masks each padding token).
    """
    if attention_mask is None:
        return None
    real = (attention_mask != 0).reshape(attention_mask.shape[0], -1, patch_size)  # [B, L, K]
    seen, full = real.any(-1), real.all(-1)
    partial = seen & ~full
    clean = full & (partial.long().cumsum(-1) == 0)
    return seen, clean


def draw_brier_noise(
    model, batch: int, num_chunks: int, max_n: int = BRIER_LM_MAX_N, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Head noise of every (block, boundary, sample, step), drawn in that order on the generator's device.

    Returns:
        `torch.FloatTensor` of shape `[B, L, 2, R, E]` (E = `noise_size` for the energy head, uniform in
        [-0.5, 0.5); Z for the flow head, standard normal), on the generator's device (the CPU by default).
    """
    shape = (batch, num_chunks, NUM_BRIER_SAMPLES, brier_num_steps(model.config.patch_size, max_n))
    device = generator.device if generator is not None else torch.device("cpu")
    return model.head.draw_noise(shape, device=device, generator=generator)


def _prepare_noise(model, input_ids, max_n, noise, generator) -> torch.Tensor:
    batch, length = input_ids.shape
    num_chunks = length // model.config.patch_size
    if noise is None:
        noise = draw_brier_noise(model, batch, num_chunks, max_n, generator)
    else:
        expected = (batch, num_chunks, NUM_BRIER_SAMPLES, brier_num_steps(model.config.patch_size, max_n))
        if tuple(noise.shape[:-1]) != expected:
            raise ValueError(
                f"noise must have shape [B, L, 2, R, E] with leading {expected}, got {tuple(noise.shape)}."
            )
    return noise.to(input_ids.device)


class _BrierPrefix:
    """What the backbone forward over the blocks gives every sampling pass (one per generator): the hidden
    states h_0..h_{U-1}, the KV cache of the L chunks (only while K < max_n) and the continuation layout."""

    def __init__(self, model, input_ids: torch.Tensor, max_n: int, attention_mask: torch.Tensor | None):
        k = model.config.patch_size
        chunk_masks = brier_chunk_masks(attention_mask, k)
        self.batch, length = input_ids.shape
        self.k, self.max_n = k, max_n
        self.num_chunks, self.steps = length // k, brier_num_steps(k, max_n)
        self.positions = brier_num_positions(length, k, max_n)  # U boundaries with room for max_n targets
        self.device = input_ids.device
        self.seen = None if chunk_masks is None else chunk_masks[0]  # [B, L]
        self.hidden = self.cache = None
        if self.positions == 0:
            return
        if self.steps > 1:
            check_maskable_attention(
                model.model.config, f"The fast CALM Brier sampler (K={k} < max_n={max_n})", "score_brier_ref"
            )
        seen = self.seen
        out = model(input_ids=input_ids, attention_mask=None if seen is None else seen.long(), use_cache=self.steps > 1)
        self.hidden = out.last_hidden_state[:, : self.positions]  # [B, U, D]: h_i after chunks 0..i
        self.dtype = out.last_hidden_state.dtype
        if self.steps == 1:
            return
        self.cache = output_cache(out)
        if self.cache is None:
            raise ValueError("The backbone returned no KV cache; the fast CALM Brier sampler needs a KV cache.")
        device, positions, num_chunks = self.device, self.positions, self.num_chunks
        # Prefix visibility [B, 2U, L]: row (i, s) sees chunks 0..i of the block (already in the cache).
        causal = torch.arange(num_chunks, device=device)[None, :] <= torch.arange(positions, device=device)[:, None]
        prefix = causal.repeat_interleave(NUM_BRIER_SAMPLES, dim=0)[None].expand(self.batch, -1, -1)
        if seen is None:
            chunk_positions = torch.arange(num_chunks, device=device)[None].expand(self.batch, -1)  # [B, L]
        else:
            prefix = prefix & seen[:, None, :]  # padding chunks are never seen
            chunk_positions = (seen.long().cumsum(-1) - 1).clamp(min=0)  # as the forward counts them
        self.prefix = prefix
        self.row_positions = chunk_positions[:, :positions].repeat_interleave(NUM_BRIER_SAMPLES, dim=1)  # [B, 2U]

    def sample(self, model, noise: torch.Tensor, decode, keep_cache: bool) -> torch.Tensor:
        """One sampling pass: `noise [B, L, 2, R, E]` -> samples `[B, L, 2, R*K]` (see `sample_brier_continuations`).

        `decode(step, latents [B, U, 2, Z]) -> tokens [B, U, 2, K]` turns the head's latents of continuation step
        `step` into tokens (PAD_SAMPLE where it decodes none). With `keep_cache`, the continuation appends to a copy
        of the prefix cache, so that another pass can start from the same prefix.
        """
        batch, k, positions = self.batch, self.k, self.positions
        samples = torch.full(
            (batch, self.num_chunks, NUM_BRIER_SAMPLES, self.steps * k), PAD_SAMPLE, dtype=torch.long,
            device=self.device,
        )
        if positions == 0:
            return samples
        hidden = self.hidden[:, :, None].expand(-1, -1, NUM_BRIER_SAMPLES, -1)  # [B, U, 2, D]
        latents = model.head.sample(hidden, noise=noise[:, :positions, :, 0].to(hidden.device))  # [B, U, 2, Z]
        tokens = decode(0, latents)  # [B, U, 2, K]
        samples[:, :positions, :, :k] = tokens
        if self.steps == 1:
            return _blank_padding(samples, self.seen)

        cache = copy.deepcopy(self.cache) if keep_cache else self.cache
        rows = NUM_BRIER_SAMPLES * positions  # continuation rows per block, row r = 2 i + s
        for step in range(1, self.steps):
            # Keys: L prefix chunks, then `step` appended groups (the last is this step's input).
            additive = continuation_attention_mask(self.prefix, step, self.dtype)  # [B, 2U, L + 2U * step]
            # Previous chunk of each row -> [B, 2U, D]; a token the decoder skipped (its row can no longer change any
            # estimate) is read as token 0.
            embeds = model.embed_chunks(tokens.clamp(min=0).reshape(batch, rows * k))
            out = model.model(
                inputs_embeds=embeds,
                attention_mask=additive[:, None],  # [B, 1, 2U, L + 2U * step]
                position_ids=self.row_positions + step,  # continuation chunk of row (i, s) at i + step
                use_cache=True,
                **{model._cache_kwarg: cache},
            )
            cache = output_cache(out)
            hidden = out.last_hidden_state.view(batch, positions, NUM_BRIER_SAMPLES, -1)  # [B, U, 2, D]
            latents = model.head.sample(hidden, noise=noise[:, :positions, :, step].to(hidden.device))
            tokens = decode(step, latents)  # [B, U, 2, K]
            samples[:, :positions, :, step * k : (step + 1) * k] = tokens
        return _blank_padding(samples, self.seen)


def _full_decoder(model, num_tokens: int | None = None):
    """`decode` of `_BrierPrefix.sample` that decodes every latent to its K tokens, or (with `num_tokens`) only
    the first `num_tokens` tokens of each continuation, PAD_SAMPLE after them."""
    k = model.config.patch_size
    trims = hasattr(model.autoencoder, "decoder_states")  # an autoencoder with only decode_tokens decodes in full

    def decode(step: int, latents: torch.Tensor) -> torch.Tensor:
        keep = k if num_tokens is None else min(k, num_tokens - step * k)
        if keep >= k or not trims:
            return model.autoencoder.decode_tokens(latents.unsqueeze(-2))  # [..., 1, Z] -> [..., K]
        tokens = model.autoencoder.decode_tokens(latents.unsqueeze(-2), num_tokens=keep)  # [..., keep]
        return F.pad(tokens, (0, k - keep), value=PAD_SAMPLE)

    return decode


class _LazyDecoder:
    """`decode` of `_BrierPrefix.sample` that projects onto the vocabulary only the tokens that can still change
    an estimate.

    Token t of sample s at a boundary enters Brier-n (n > t) only through the prefix products of
    `brier_indicators`: 1{x_s[:n] = y[:n]} and 1{x_1[:n] = x_2[:n]}. Once x_s[:t] differs from y[:t] and x_1[:t]
    from x_2[:t], both are 0 whatever comes next, so token t of sample s is decoded iff its hit chain or the
    collision chain is still alive (and the boundary counts at all). The estimates are those of the full decode;
    the skipped entries hold PAD_SAMPLE. Only the vocabulary projection (most of a CALM's scoring FLOPs with a
    large vocabulary) is skipped: the head and the decoder run on every row.
    """

    def __init__(self, model, targets: torch.Tensor, valid: torch.Tensor):
        self.autoencoder = model.autoencoder
        self.k = model.config.patch_size
        self.targets = targets  # [B, U, max_n]
        alive = valid[..., None].expand(*valid.shape, NUM_BRIER_SAMPLES).clone()  # [B, U, 2] hit chains
        self.hits, self.collide = alive, valid.clone()  # [B, U, 2], [B, U]

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        lead = latents.shape[:-1]  # [B, U, 2]
        states = self.autoencoder.decoder_states(latents.unsqueeze(-2))  # [B*U*2, K, H]
        tokens = torch.full((*lead, self.k), PAD_SAMPLE, dtype=torch.long, device=latents.device)
        for j in range(min(self.k, self.targets.shape[-1] - step * self.k)):
            y = self.targets[..., step * self.k + j]  # [B, U]
            need = (self.hits | self.collide[..., None]).flatten()  # [B*U*2] rows of `states`
            rows = need.nonzero().squeeze(-1)  # the step's one host sync
            column = torch.full_like(need, PAD_SAMPLE, dtype=torch.long)
            if rows.numel():
                column.index_copy_(0, rows, self.autoencoder.argmax_tokens(states[:, j].index_select(0, rows)))
            tokens[..., j] = column.view(lead)
            self.hits &= tokens[..., j] == y[..., None]
            self.collide &= tokens[..., 0, j] == tokens[..., 1, j]
        return tokens


@torch.no_grad()
def sample_brier_continuations(
    model,
    input_ids: torch.Tensor,
    max_n: int = BRIER_LM_MAX_N,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two independent continuations of at least max_n tokens at every chunk boundary (fast, batched path).

    Args:
        model: a `CalmForCausalLM`.
        input_ids (`torch.LongTensor` of shape `[B, T]`): the blocks, T a multiple of K.
        max_n (`int`, *optional*, defaults to 4): tokens needed per continuation.
        noise (`torch.FloatTensor` of shape `[B, L, 2, R, E]`, *optional*): head noise (see `draw_brier_noise`);
            drawn from `generator` when None.
        generator (`torch.Generator`, *optional*): source of `noise`.
        attention_mask (`torch.Tensor` of shape `[B, T]`, *optional*): token mask; whole padding chunks are masked
            out of attention and positions count real chunks only (see `brier_chunk_masks`).

    Returns:
        `torch.LongTensor` of shape `[B, L, 2, R*K]`: `samples[b, i, s]` continues tokens 0..(i+1)K-1 of block
        b. Boundaries whose max_n targets run past the block end, or that are padding chunks, hold -1.
    """
    _check_inputs(model, input_ids, None, max_n, attention_mask)
    noise = _prepare_noise(model, input_ids, max_n, noise, generator)
    prefix = _BrierPrefix(model, input_ids, max_n, attention_mask)
    return prefix.sample(model, noise, _full_decoder(model), keep_cache=False)


def _blank_padding(samples: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """PAD_SAMPLE at the boundaries that are padding chunks (`seen` False): they are never scored."""
    if seen is None:
        return samples
    return samples.masked_fill(~seen.to(samples.device)[:, :, None, None], PAD_SAMPLE)


@torch.no_grad()
def sample_brier_continuations_ref(
    model,
    input_ids: torch.Tensor,
    max_n: int = BRIER_LM_MAX_N,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slow, obviously correct reference for `sample_brier_continuations` (same arguments, same output).

    For every block, boundary and sample, the context grows one decoded chunk at a time and each step is a plain
    cache-free forward over the context; the head samples on the last hidden state with the same noise entry as
    the fast path. With an `attention_mask`, the context holds only the chunks that are not all padding (which is
    what masking them out and counting positions over real chunks means). Cost: B * U * 2 * R forwards.
    """
    k = _check_inputs(model, input_ids, None, max_n, attention_mask)
    chunk_masks = brier_chunk_masks(attention_mask, k)
    noise = _prepare_noise(model, input_ids, max_n, noise, generator)
    batch, length = input_ids.shape
    steps = brier_num_steps(k, max_n)
    samples = torch.full((batch, length // k, NUM_BRIER_SAMPLES, steps * k), PAD_SAMPLE, dtype=torch.long)
    for b in range(batch):
        for i in range(brier_num_positions(length, k, max_n)):
            if chunk_masks is not None and not bool(chunk_masks[0][b, i]):
                continue  # a padding chunk: never scored
            for s in range(NUM_BRIER_SAMPLES):
                context = input_ids[b, : (i + 1) * k]  # chunks 0..i
                if chunk_masks is not None:
                    context = context.view(-1, k)[chunk_masks[0][b, : i + 1]].flatten()  # real chunks only
                for step in range(steps):
                    hidden = model(input_ids=context[None]).last_hidden_state[0, -1]  # [D]
                    latent = model.head.sample(hidden, noise=noise[b, i, s, step])  # [Z]
                    chunk = model.autoencoder.decode_tokens(latent[None])  # [K]
                    samples[b, i, s, step * k : (step + 1) * k] = chunk.cpu()
                    context = torch.cat([context, chunk])
    return samples.to(input_ids.device)


def brier_targets(
    input_ids: torch.Tensor, labels: torch.Tensor | None, patch_size: int, max_n: int = BRIER_LM_MAX_N
) -> tuple[torch.Tensor, torch.Tensor]:
    """True next max_n tokens of every chunk boundary and which boundaries count.

    Returns:
        `targets` LongTensor [B, L, max_n] (`targets[b, i] = labels[b, (i+1)K : (i+1)K + max_n]`, -100 past the
        block end; labels default to input_ids) and `valid` bool [B, L]: True iff all max_n targets lie inside
        the block and none is -100.
    """
    y = input_ids if labels is None else labels
    starts = (torch.arange(y.shape[1] // patch_size, device=y.device) + 1) * patch_size  # first target of boundary i
    targets = gather_targets(y, starts, max_n)  # [B, L, max_n]
    return targets, (targets != IGNORE_INDEX).all(dim=-1)


def _brier_targets_and_mask(model, input_ids, labels, max_n, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, L, max_n] and the boundaries that count [B, L] (see `score_calm_brier`)."""
    k = model.config.patch_size
    if attention_mask is not None:  # padding is never a target
        labels = (input_ids if labels is None else labels).masked_fill(attention_mask == 0, IGNORE_INDEX)
    targets, valid = brier_targets(input_ids, labels, k, max_n)
    chunk_masks = brier_chunk_masks(attention_mask, k)
    if chunk_masks is not None:
        valid &= chunk_masks[1].to(valid.device)
    return targets, valid


def score_calm_brier(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    max_n: int = BRIER_LM_MAX_N,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reference: bool = False,
    attention_mask: torch.Tensor | None = None,
    lazy_decoding: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-boundary Brier-1..max_n estimates of a CALM (the `score_brier` protocol of `evaluation_calm`).

    Args:
        model: a `CalmForCausalLM`.
        input_ids (`torch.LongTensor` of shape `[B, T]`): right-padded blocks, T a multiple of K.
        labels (`torch.LongTensor` of shape `[B, T]`, *optional*): targets aligned with input_ids; -100 marks
            tokens that are not targets (padding included). Defaults to input_ids.
        max_n (`int`, *optional*, defaults to 4): largest n-gram order.
        generator (`torch.Generator`, *optional*): the only source of randomness (see the module docstring).
        noise (`torch.FloatTensor` of shape `[B, L, 2, R, E]`, *optional*): explicit head noise (tests).
        reference (`bool`, *optional*): use the slow reference sampler.
        attention_mask (`torch.Tensor` of shape `[B, T]`, *optional*): 1 on real tokens, 0 on padding (left or
            right). Padding is never a target and never scored; whole padding chunks are masked out of attention.
        lazy_decoding (`bool`, *optional*, defaults to True): fast path only: project a sampled token onto the
            vocabulary only while it can still change an estimate (see `score_calm_brier_seeds`); False decodes
            the first max_n tokens of every continuation. Both give the same estimates.

    Returns:
        `(brier, mask)`: float32 [B, L, max_n] per-boundary estimates (0 where masked) and bool [B, L], True at
        the boundaries that count: all max_n targets inside the block, real and not -100, and (with a mask) a
        context of whole real chunks ending in a real chunk (`brier_chunk_masks`). Boundary i is the token LM's
        position t = (i+1)K - 1, so on right-padded or whole-chunk-padded text both kinds score the same tokens.
    """
    if not reference:
        noises = None if noise is None else [noise]
        return score_calm_brier_seeds(
            model, input_ids, labels=labels, max_n=max_n, generators=[generator], attention_mask=attention_mask,
            lazy_decoding=lazy_decoding, noises=noises,
        )[0]
    _check_inputs(model, input_ids, labels, max_n, attention_mask)
    samples = sample_brier_continuations_ref(  # [B, L, 2, R*K]
        model, input_ids, max_n=max_n, noise=noise, generator=generator, attention_mask=attention_mask
    )
    targets, valid = _brier_targets_and_mask(model, input_ids, labels, max_n, attention_mask)
    targets, valid = targets.to(samples.device), valid.to(samples.device)
    brier = brier_indicators(samples[:, :, 0, :max_n], samples[:, :, 1, :max_n], targets, max_n=max_n, mask=valid)
    return brier, valid


@torch.no_grad()
def score_calm_brier_seeds(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    max_n: int = BRIER_LM_MAX_N,
    generators: Sequence[torch.Generator | None] = (None,),
    attention_mask: torch.Tensor | None = None,
    lazy_decoding: bool = True,
    noises: Sequence[torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`score_calm_brier` once per generator, sharing the backbone forward over the blocks (the fast path).

    Entry g is what `score_calm_brier(model, input_ids, labels, max_n, generators[g], ...)` returns: the head
    noise of pass g is drawn from `generators[g]` exactly as there. The hidden states (and, while K < max_n,
    the KV cache) of the L chunks do not depend on the noise, so the backbone reads the blocks once; each pass
    then samples and continues on its own (on a copy of the cache for every pass but the last). This is how
    `evaluate_brier` scores one batch for all its seeds.

    Decoding: only the first max_n tokens of a continuation are compared with the targets, so later ones are not
    projected onto the vocabulary. With `lazy_decoding` (default), token t of a sample is projected only while it
    can still change an estimate: while the sample agrees with the targets on tokens < t or with the other sample
    (the prefix products of `brier_indicators`), at boundaries that count. The estimates are those of the full
    decode, up to float rounding at argmax near-ties (the vocabulary projection runs on fewer rows); the saving
    grows as the samples miss: on a model whose first tokens rarely hit or collide, ~(max_n - 1) / max_n of the
    projections.

    Args:
        generators (sequence of `torch.Generator` or None): one sampling pass per entry.
        noises (sequence of `torch.FloatTensor` `[B, L, 2, R, E]`, *optional*): explicit head noise per pass
            instead of `generators` (tests).
        Others: see `score_calm_brier`.

    Returns:
        A list of `(brier [B, L, max_n] float32, mask [B, L] bool)`, one per generator (or noise).
    """
    _check_inputs(model, input_ids, labels, max_n, attention_mask)
    if noises is None:
        generators = list(generators)
        if not generators:
            raise ValueError("generators must hold at least one torch.Generator (or None): one pass each.")
        noises = [_prepare_noise(model, input_ids, max_n, None, generator) for generator in generators]
    else:
        noises = [_prepare_noise(model, input_ids, max_n, noise, None) for noise in noises]
        if not noises:
            raise ValueError("noises must hold at least one noise tensor [B, L, 2, R, E]: one pass each.")
    targets, valid = _brier_targets_and_mask(model, input_ids, labels, max_n, attention_mask)
    prefix = _BrierPrefix(model, input_ids, max_n, attention_mask)
    targets, valid = targets.to(prefix.device), valid.to(prefix.device)
    # An autoencoder with only decode_tokens (a test double) is decoded in full.
    lazy = lazy_decoding and hasattr(model.autoencoder, "decoder_states")
    results = []
    for index, noise in enumerate(noises):
        positions = prefix.positions
        if lazy:
            decode = _LazyDecoder(model, targets[:, :positions], valid[:, :positions])
        else:
            decode = _full_decoder(model, num_tokens=max_n)
        samples = prefix.sample(model, noise, decode, keep_cache=index < len(noises) - 1)  # [B, L, 2, R*K]
        brier = brier_indicators(samples[:, :, 0, :max_n], samples[:, :, 1, :max_n], targets, max_n=max_n, mask=valid)
        results.append((brier, valid.clone()))
    return results
