"""Likelihood-free temperature sampling for CALM (CALM.md, section 4).

CALM's generative head gives samples of the next chunk of K tokens but no probabilities. Temperature sampling
must therefore draw a chunk x with probability

    P_T(x) = P(x)^(1/T) / Z_T,    Z_T = sum_x P(x)^(1/T),    T in (0, 1]                              (1)

using nothing but a sampler of P. The samplers reach the model through one callable,
`draw(n) -> LongTensor [B, n, K]`, which returns n independent chunks per row; the lower-level functions work
directly on a batch of already-decoded candidates.

Public functions:
- `temperature_sample(draw, temperature, *, method, ...)`: the entry point, either method.
- `exact_temperature_sample(draw, temperature, ...)`: Algorithm 1, exact, a correctness reference.
- `select_by_temperature(candidates, temperature, *, generator)`: Algorithm 2 on given candidates, for `generate`.
- `selection_probabilities(candidates, temperature)` and `chunk_multiplicities(candidates)`: its building blocks.

Shape letters: B rows (independent sampling problems), N candidates per row, S draws per row per round of the
exact sampler, K tokens per chunk. Two chunks are equal only if all K tokens are equal.

Exact method (Algorithm 1)
--------------------------
Write 1/T = n + alpha with n = floor(1/T) and alpha in [0, 1).
- Stage 1: draw n chunks; they are all equal to some x* with probability P(x*)^n.
- Stage 2, only if alpha > 0, is a Bernoulli factory that accepts x* with probability p^alpha, p = P(x*), using
  more draws: at step i = 1, 2, ... draw x; accept if x == x*; otherwise restart from stage 1 with probability
  alpha / i, else go on to step i + 1. With q = 1 - p, accepting at step k + 1 has probability
  p * q^k * prod_{j=1..k} (1 - alpha / j), and summing over k gives

      p * sum_k q^k (1 - alpha)_k / k! = p * (1 - q)^-(1 - alpha) = p^alpha,                           (2)

  where (a)_k is the rising factorial and the middle step is the binomial series.
One attempt therefore returns x with probability P(x)^n * P(x)^alpha = P(x)^(1/T); attempts that fail start
over with fresh draws, so the accepted chunk follows (1). The expected number of draws grows like 1 / Z_T, which
is why this is a correctness reference, not a fast path.

Vectorisation: every row runs its own copy of the algorithm as a small state machine (stage, run length of
stage 1, x*, factory step i). Each round calls `draw(S)` once for all rows, then feeds the S draws one at a time
to all rows at once with tensor ops; finished rows ignore their draws. Stage 1 stops at the first draw that
differs from x* and throws that draw away: an attempt fails exactly when some of its n draws differ, and the next
attempt starts from untouched draws, so the stopping is only a saving. Reusing the mismatching draw would bias
the next attempt and is not done.

Approximate method (Algorithm 2, generalised to any T)
------------------------------------------------------
Draw N candidates and let c_x be the number of candidates equal to x. For an integer a, C(c_x, a) counts the
a-subsets of the N draws that are all equal to x, so E[C(c_x, a)] = C(N, a) P(x)^a: C(c_x, a) / C(N, a) is an
unbiased estimator of P(x)^a. The paper picks a distinct chunk with probability proportional to C(c_x, n) for
T = 1/n, and when no chunk appears n times it falls back to n - 1, n - 2, ..., 1 (level 1 is plain multiplicity:
a uniform pick among the N candidates, that is, a draw from the empirical distribution).

For any T, let a = 1/T. This module uses the generalised binomial coefficient at levels m = a, a - 1, ..., a - n + 1:

    C(c, m) = Gamma(c + 1) / (Gamma(m + 1) Gamma(c - m + 1)),                                           (3)

and picks from the highest level at which some chunk has C(c_x, m) > 0, with weights C(c_x, m). The coefficient
is positive exactly when c > m - 1, because 1 / Gamma(c - m + 1) vanishes at c - m + 1 = 0, -1, ... and is
negative just below 0. This rule has four properties:
- It is the paper's rule at T = 1/n: at an integer m, the condition c > m - 1 means c >= m.
- It is consistent. Chunks come from a finite set (V^K), so every c_x with P(x) > 0 grows without bound as
  N grows, and Gamma(c + 1) / Gamma(c - m + 1) = c^m (1 + O(1/c)). Hence C(c_x, a) / C(N, a) -> P(x)^a almost
  surely, and the selection probabilities converge to (1).
- It is biased for finite N, and no estimator could avoid that. Whatever f is, E[f(c_x)] with
  c_x ~ Binomial(N, p) is a polynomial in p of degree at most N, while p^a is not a polynomial when a is not an
  integer. Exact sampling needs a random number of draws, which is what stage 2 of Algorithm 1 does.
- It is continuous in T, while a hard threshold c >= m would not be. As a rises to an integer k (T falls to
  1/k), a level m in (k - 1, k) accepts chunks with c = k - 1 as well, but their weight C(k - 1, m) goes to 0.
  When they are the only chunks it accepts, their weights are equal, so the pick is uniform over them, just as
  the fallback to level k - 1 makes it at a = k. A threshold c >= m would instead make T = 0.99 drop every
  singleton as soon as one chunk repeats, a jump away from the uniform pick of T = 1.
The lowest level, 1 + alpha (or 1), accepts every candidate (c >= 1), so no row is left without a choice. The
alternative weights c^a are biased even at integer a (E[c^2] = N^2 p^2 + N p (1 - p)) and do not reduce to the
paper's rule.
A chunk seen c times is represented by its c candidates, each with weight C(c, m) / c. The chunk's total weight
is then C(c, m), and the returned index points at one of its copies, chosen uniformly. The caller can use that
index to recover the latent vector of the chosen candidate.
"""

import math
import numbers
from collections.abc import Callable

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The reference implementation's N; the paper needs N ~ 200 to match a Transformer at softmax temperature 0.5.
DEFAULT_NUM_CANDIDATES = 200
# Cap on rounds of the exact sampler. With alpha = 0, R rounds of S draws hold at least floor(R S / n) complete
# attempts (an attempt uses at most n draws), so a row is left unfinished with probability at most
# (1 - Z_T)^floor(R S / n): at T = 1/2 with the defaults, below 4e-4 whenever Z_T >= 1e-3.
DEFAULT_MAX_ROUNDS = 1000
# Draws per row per round of the exact sampler: one call to `draw` feeds this many state-machine steps. More
# draws per call means fewer calls (each a model forward) at the price of draws wasted by rows that finish early.
DEFAULT_DRAWS_PER_ROUND = 16
# 1/T closer than this to an integer is treated as that integer: 1/(1/3) may be 2.9999999999999996 in floating
# point, which would otherwise run the (slower) exact stage 2 with alpha ~ 1 instead of stage 1 with n = 3.
_INTEGER_TOLERANCE = 1e-9
_METHODS = ("exact", "approximate")
_ON_MAX_ROUNDS = ("approximate", "raise")

DrawFn = Callable[[int], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers


def _inverse_temperature(temperature: float) -> float:
    """Checks T in (0, 1] and returns a = 1/T, snapped to an integer when within `_INTEGER_TOLERANCE` of one."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number in (0, 1], got {temperature!r}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be a finite number in (0, 1], got {temperature!r}")
    inv_t = 1.0 / temperature
    if abs(inv_t - round(inv_t)) <= _INTEGER_TOLERANCE * inv_t:
        inv_t = float(round(inv_t))
    return inv_t


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_candidates(candidates: torch.Tensor) -> None:
    if not isinstance(candidates, torch.Tensor):
        raise ValueError(f"candidates must be a torch.Tensor [B, N, K], got {type(candidates).__name__}")
    if candidates.dtype != torch.long:
        raise ValueError(f"candidates must be a LongTensor of token ids, got dtype {candidates.dtype}")
    if candidates.dim() != 3 or candidates.shape[1] < 1 or candidates.shape[2] < 1:
        raise ValueError(
            f"candidates must have shape [B, N, K] with N >= 1 and K >= 1, got {tuple(candidates.shape)}"
        )


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on device {generator.device} but the samples are on {device}; "
            "the generator must be on the samples' device"
        )


def _call_draw(draw: DrawFn, n: int, expected: tuple[int, int] | None) -> torch.Tensor:
    """Calls `draw(n)` and checks that it returned a LongTensor [B, n, K] with the (B, K) of earlier calls."""
    samples = draw(n)
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"draw({n}) must return a torch.Tensor [B, {n}, K], got {type(samples).__name__}")
    if samples.dtype != torch.long:
        raise ValueError(f"draw({n}) must return a LongTensor of token ids, got dtype {samples.dtype}")
    if samples.dim() != 3 or samples.shape[1] != n or samples.shape[2] < 1:
        raise ValueError(f"draw({n}) must return shape [B, {n}, K] with K >= 1, got {tuple(samples.shape)}")
    if expected is not None and (samples.shape[0], samples.shape[2]) != expected:
        raise ValueError(
            f"draw({n}) returned shape {tuple(samples.shape)}, but earlier calls fixed B = {expected[0]} "
            f"and K = {expected[1]}: every call must return [B, n, K] with the same B and K"
        )
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Approximate method (Algorithm 2, generalised)


def chunk_multiplicities(candidates: torch.Tensor) -> torch.Tensor:
    """Counts, for every candidate, how many candidates of its row are the same chunk.

    Equal chunks are brought together by sorting each row lexicographically (a stable sort per token, last token
    first), so the cost is O(B K N log N) time and O(B N K) memory, with no hashing and hence no collisions.

    Args:
        candidates (`torch.LongTensor` of shape `[B, N, K]`): N candidate chunks of K tokens per row.

    Returns:
        `torch.LongTensor` of shape `[B, N]`: entry [b, j] is c_x for x = candidates[b, j], a number in [1, N].
    """
    _check_candidates(candidates)
    batch_size, num_candidates, chunk_len = candidates.shape
    # order[b] is a permutation of the N candidates; after the loop it lists them in lexicographic order
    order = torch.arange(num_candidates, device=candidates.device).expand(batch_size, num_candidates)
    for k in reversed(range(chunk_len)):
        key = candidates[:, :, k].gather(1, order)  # [B, N], token k in the current order
        order = order.gather(1, torch.sort(key, dim=1, stable=True).indices)
    ranked = candidates.gather(1, order.unsqueeze(-1).expand(-1, -1, chunk_len))  # [B, N, K], sorted rows
    starts = torch.ones(batch_size, num_candidates, dtype=torch.bool, device=candidates.device)
    starts[:, 1:] = (ranked[:, 1:] != ranked[:, :-1]).any(-1)  # [B, N], True where a new chunk begins
    group = starts.long().cumsum(1) - 1  # [B, N], index of the distinct chunk in sorted order
    sizes = torch.zeros_like(group).scatter_add_(1, group, torch.ones_like(group))  # [B, N], c per group id
    # Back from sorted order to the candidates' own order.
    return torch.empty_like(group).scatter_(1, order, sizes.gather(1, group))


def selection_probabilities(candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probability with which the approximate method picks each candidate (see the module docstring).

    Levels m = a, a - 1, ..., a - n + 1 with a = 1/T, n = floor(a); the highest level at which some chunk has
    c > m - 1 gives each candidate the weight C(c, m) / c of eq. (3), so that a distinct chunk x gets total
    weight C(c_x, m). The loop runs over levels (n of them), never over rows or candidates.

    Args:
        candidates (`torch.LongTensor` of shape `[B, N, K]`): N candidate chunks of K tokens per row.
        temperature (`float`): T in (0, 1].

    Returns:
        `torch.FloatTensor` of shape `[B, N]`, float32 on the candidates' device, each row summing to 1
        (computed in float64, so the device must support it: CPU and CUDA do).
    """
    inv_t = _inverse_temperature(temperature)
    # float64: with 1/T snapped only within `_INTEGER_TOLERANCE` of an integer, the lowest level can sit 1e-9
    # below 2, and float32 would round c - m + 1 = 2 - m to 0 and drop singletons that must stay eligible.
    counts = chunk_multiplicities(candidates).to(torch.float64)  # [B, N], c_x of each candidate's chunk
    num_levels = int(inv_t)
    log_weights = None
    # Lowest level first, so that each higher level overwrites the rows where it has an eligible chunk. The
    # lowest level, a - n + 1 in [1, 2), accepts every candidate (c >= 1 > m - 1), so each row ends with a choice.
    for j in reversed(range(num_levels)):
        level = inv_t - j
        # Eligible means C(c, level) > 0, i.e. c - level + 1 > 0; that argument may lie in (0, 1), where
        # Gamma is large and the weight small. Ineligible entries get the dummy argument 1 (away from
        # lgamma's poles) and are masked to -inf.
        gamma_arg = counts - level + 1  # [B, N]
        eligible = gamma_arg > 0
        # log(C(c, m) / c) without the constant -lgamma(m + 1), which cancels in the normalisation below.
        level_log_weights = (
            torch.lgamma(counts + 1) - torch.lgamma(torch.where(eligible, gamma_arg, 1.0)) - counts.log()
        ).masked_fill(~eligible, -math.inf)
        if log_weights is None:
            log_weights = level_log_weights
        else:
            log_weights = torch.where(eligible.any(1, keepdim=True), level_log_weights, log_weights)
    return torch.softmax(log_weights, dim=1).float()


def select_by_temperature(
    candidates: torch.Tensor, temperature: float, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate temperature sampling among already drawn candidates (Algorithm 2, generalised to any T).

    This is the function for `generate`: decode the N candidates once, then select. At T = 1 it is a uniform pick,
    that is, a plain draw from P.

    Args:
        candidates (`torch.LongTensor` of shape `[B, N, K]`): N independent draws from P per row.
        temperature (`float`): T in (0, 1].
        generator (`torch.Generator`, *optional*): source of the pick's randomness, on the candidates' device.

    Returns:
        `tuple(torch.LongTensor, torch.LongTensor)`: the chosen chunks, shape `[B, K]`, and their indices into the
        N candidates, shape `[B]`, so that `chosen[b] == candidates[b, index[b]]`.
    """
    probs = selection_probabilities(candidates, temperature)  # [B, N]
    _check_generator(generator, candidates.device)
    index = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B]
    chosen = candidates.gather(1, index[:, None, None].expand(-1, 1, candidates.shape[2])).squeeze(1)  # [B, K]
    return chosen, index


# ----------------------------------------------------------------------------------------------------------------
# Exact method (Algorithm 1)


def exact_temperature_sample(
    draw: DrawFn,
    temperature: float,
    *,
    generator: torch.Generator | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    draws_per_round: int = DEFAULT_DRAWS_PER_ROUND,
    on_max_rounds: str = "approximate",
    num_candidates: int = DEFAULT_NUM_CANDIDATES,
) -> torch.Tensor:
    """Exact likelihood-free temperature sampling (Algorithm 1), all rows in parallel.

    Each round calls `draw(draws_per_round)` once and advances every unfinished row by that many draws, as
    described in the module docstring. At T = 1 this returns `draw(1)[:, 0]`.

    Cap: at most `max_rounds` rounds (`max_rounds * draws_per_round` draws per row). Rows still unfinished then
    are handled as `on_max_rounds` says:
    - `"approximate"` (default): log a warning with the number of such rows, call `draw(num_candidates)` once
      more and pick for those rows with `select_by_temperature`. The draws made so far are not reused: they are
      conditioned on the exact sampler having failed (they tend to be all different), while fresh draws are
      independent of that event, so those rows follow the approximate method's distribution exactly.
    - `"raise"`: raise a `RuntimeError`, for callers that need exact samples or nothing.

    Args:
        draw (`Callable[[int], torch.LongTensor]`): `draw(n)` returns n independent chunks per row, shape
            `[B, n, K]`; B and K are read from the first call and must not change.
        temperature (`float`): T in (0, 1].
        generator (`torch.Generator`, *optional*): source of the algorithm's own randomness (stage-2 coins and the
            fallback pick), on the draws' device. With a seeded `draw`, the result is reproducible.
        max_rounds (`int`): cap on the number of calls to `draw` before the fallback.
        draws_per_round (`int`): S, chunks requested per row per call.
        on_max_rounds (`str`): `"approximate"` or `"raise"`, see above.
        num_candidates (`int`): N for the approximate fallback.

    Returns:
        `torch.LongTensor` of shape `[B, K]`, one chunk per row.
    """
    inv_t = _inverse_temperature(temperature)
    _check_positive_int("max_rounds", max_rounds)
    _check_positive_int("draws_per_round", draws_per_round)
    _check_positive_int("num_candidates", num_candidates)
    if on_max_rounds not in _ON_MAX_ROUNDS:
        raise ValueError(f"on_max_rounds must be one of {_ON_MAX_ROUNDS}, got {on_max_rounds!r}")
    if inv_t == 1.0:
        return _call_draw(draw, 1, None)[:, 0]

    run_len = int(inv_t)  # n: identical draws needed in stage 1
    alpha = inv_t - run_len  # fractional part, handled by the Bernoulli factory of stage 2, eq. (2)
    shape = None
    for _ in range(max_rounds):
        samples = _call_draw(draw, draws_per_round, shape)  # [B, S, K]
        if shape is None:
            shape = (samples.shape[0], samples.shape[2])
            device = samples.device
            _check_generator(generator, device)
            done = torch.zeros(shape[0], dtype=torch.bool, device=device)  # [B]
            in_stage2 = torch.zeros_like(done)  # [B]
            run = torch.zeros(shape[0], dtype=torch.long, device=device)  # [B], stage-1 copies of x* so far
            step = torch.ones_like(run)  # [B], i of stage 2
            candidate = samples[:, 0].clone()  # [B, K], x* (the answer once done)
        # One uniform per draw for the stage-2 coin "restart with probability alpha / i".
        coins = torch.rand(samples.shape[:2], generator=generator, device=device)  # [B, S]
        for j in range(draws_per_round):
            x = samples[:, j]  # [B, K]
            same = (x == candidate).all(-1)  # [B]
            stage1 = ~done & ~in_stage2
            stage2 = ~done & in_stage2
            # Stage 1: the first draw of an attempt becomes x*; a copy extends the run; a different chunk ends
            # the attempt and is itself discarded (run back to 0).
            starting = stage1 & (run == 0)
            candidate = torch.where(starting[:, None], x, candidate)
            run = torch.where(stage1, torch.where(starting | same, run + 1, 0), run)
            complete = stage1 & (run == run_len)
            if alpha == 0.0:
                done = done | complete
            else:
                in_stage2 = in_stage2 | complete
                step = torch.where(complete, 1, step)
            # Stage 2 (rows that entered it with this very draw wait for the next one).
            accept = stage2 & same
            restart = stage2 & ~same & (coins[:, j] < alpha / step)
            done = done | accept
            in_stage2 = in_stage2 & ~restart
            run = torch.where(restart, 0, run)
            step = torch.where(stage2 & ~accept & ~restart, step + 1, step)
        if bool(done.all()):
            return candidate

    unfinished = ~done
    num_unfinished = int(unfinished.sum())
    message = (
        f"exact temperature sampling (T={temperature}) left {num_unfinished} of {shape[0]} rows unfinished after "
        f"max_rounds={max_rounds} rounds of {draws_per_round} draws"
    )
    if on_max_rounds == "raise":
        raise RuntimeError(message + "; raise max_rounds or use on_max_rounds='approximate'")
    logger.warning(message + f"; those rows fall back to the approximate method with {num_candidates} candidates")
    fallback_candidates = _call_draw(draw, num_candidates, shape)  # [B, N, K]
    fallback, _ = select_by_temperature(fallback_candidates[unfinished], temperature, generator=generator)
    candidate[unfinished] = fallback
    return candidate


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def temperature_sample(
    draw: DrawFn,
    temperature: float,
    *,
    method: str = "approximate",
    num_candidates: int = DEFAULT_NUM_CANDIDATES,
    generator: torch.Generator | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    on_max_rounds: str = "approximate",
) -> torch.Tensor:
    """Samples one chunk per row from P(x)^(1/T) / Z_T, given only a sampler `draw` of P.

    Args:
        draw (`Callable[[int], torch.LongTensor]`): `draw(n)` returns n independent chunks per row, shape
            `[B, n, K]`; B and K are read from the first call.
        temperature (`float`): T in (0, 1]. At T = 1 both methods return `draw(1)[:, 0]`.
        method (`str`): `"approximate"` (one call `draw(num_candidates)`, then `select_by_temperature`; biased
            for finite N, consistent as N grows) or `"exact"` (`exact_temperature_sample`; exact, with a number of
            draws that grows like 1 / Z_T).
        num_candidates (`int`): N for the approximate method and for the exact method's fallback.
        generator (`torch.Generator`, *optional*): source of the algorithm's own randomness, on the draws' device.
        max_rounds (`int`): cap on the rounds of the exact method.
        on_max_rounds (`str`): what the exact method does at the cap: `"approximate"` (fallback with a warning)
            or `"raise"` (`RuntimeError`).

    Returns:
        `torch.LongTensor` of shape `[B, K]`.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    inv_t = _inverse_temperature(temperature)
    _check_positive_int("num_candidates", num_candidates)
    # Checked for both methods, so that a bad setting fails before a switch of method exposes it.
    _check_positive_int("max_rounds", max_rounds)
    if on_max_rounds not in _ON_MAX_ROUNDS:
        raise ValueError(f"on_max_rounds must be one of {_ON_MAX_ROUNDS}, got {on_max_rounds!r}")
    if method == "exact":
        return exact_temperature_sample(
            draw,
            temperature,
            generator=generator,
            max_rounds=max_rounds,
            on_max_rounds=on_max_rounds,
            num_candidates=num_candidates,
        )
    if inv_t == 1.0:
        return _call_draw(draw, 1, None)[:, 0]
    candidates = _call_draw(draw, num_candidates, None)  # [B, N, K]
    return select_by_temperature(candidates, temperature, generator=generator)[0]
