"""BrierLM: likelihood-free evaluation of language models (CALM paper, section "BrierLM"; CALM.md section 3).

Ships to the Hub beside the CALM modeling files, so it imports only the standard library and torch.

The Brier score of a predictive distribution P for the observed outcome y is

    Brier(P, y) = 2 P(y) - sum_x P(x)^2                                                        (eq. 1)

(the negated quadratic loss up to the constant 1; strictly proper). It needs likelihoods, but it has an unbiased
estimator that needs only two independent samples x1, x2 ~ P:

    E[ 1{x1 = y} + 1{x2 = y} - 1{x1 = x2} ] = P(y) + P(y) - sum_x P(x)^2 = Brier(P, y)         (eq. 2)

Brier-n applies eq. 2 to the next n tokens seen as one outcome: two n-grams are equal only if all n tokens are.
BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4)^(1/4), the geometric mean of the per-n means over
every scored position of the evaluation text.

Shape letters: `...` any leading batch dimensions (e.g. B blocks x P positions), n_tokens the length of each
continuation (>= max_n; only the first max_n tokens are used), max_n the largest n-gram order (4 for BrierLM).

Per-position estimates lie in {-1, 0, 1, 2}; single estimates are very noisy, only means over many positions
(and seeds) are meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


# The paper's BrierLM is the geometric mean of Brier-1..4.
BRIER_LM_MAX_N = 4
# BrierLM is reported in percent.
BRIER_LM_SCALE = 100.0


def _check_max_n(max_n: int) -> None:
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}.")


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
        1{x1[:n] = y[:n]} + 1{x2[:n] = y[:n]} - 1{x1[:n] = x2[:n]}, in {-1, 0, 1, 2}.
    """
    _check_max_n(max_n)
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
    _check_max_n(max_n)
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
            per_position, mask = score(batch)     # [B, P, 4], [B, P]
            acc.update(per_position, mask)
        acc.compute()  # {"brier_1": ..., ..., "brier_4": ..., "brier_lm": ..., "num_positions": ...}
    """

    def __init__(self, max_n: int = BRIER_LM_MAX_N):
        _check_max_n(max_n)
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
