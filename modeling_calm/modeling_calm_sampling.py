"""Likelihood-free temperature sampling for CALM (arXiv 2510.27688, section "Likelihood-Free Temperature
Sampling", Algorithms 1 and 2).

CALM's generative head gives samples of the next chunk of K tokens but no probabilities, so temperature sampling
must draw a chunk x with probability P_T(x) = P(x)^(1/T) / Z_T, T in (0, 1] (eq. 1), from a sampler of P alone.
The samplers reach the model through one callable, `draw(n) -> LongTensor [B, n, K]` (n independent chunks per
row); the lower-level functions work on a batch of already-decoded candidates.

- `temperature_sample(draw, temperature, *, method, ...)`: the entry point, either method.
- `exact_temperature_sample(draw, temperature, ...)`: Algorithm 1, exact, a correctness reference.
- `select_by_temperature(candidates, temperature, *, generator)`: Algorithm 2 on given candidates.
- `selection_probabilities`, `chunk_multiplicities`, `pick_by_uniform`: its building blocks (generate uses them
  directly, with uniforms drawn ahead of the step).
- `check_temperature`, `check_positive_int`: the checks every CALM entry point shares.
- `CalmRandom`: the random source of `generate` (global RNG, a generator, or one generator per row).

Why Algorithm 1 is exact (the Bernoulli factory, eq. 2), how Algorithm 2 is generalised to any T with the
generalised binomial coefficient (eq. 3) and why that rule is consistent, continuous in T and as close to unbiased
as any finite-N rule can be: docs/temperature.md. Equation numbers below refer to that page.

Shape letters (besides those of `modeling_calm`): B rows (independent sampling problems), N candidates per row,
W draws per row per round of the exact sampler. Two chunks are equal only if all K tokens are equal.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "CalmRandom",
    "DEFAULT_DRAWS_PER_ROUND",
    "DEFAULT_MAX_ROUNDS",
    "DEFAULT_NUM_CANDIDATES",
    "check_positive_int",
    "check_temperature",
    "chunk_multiplicities",
    "exact_temperature_sample",
    "pick_by_uniform",
    "select_by_temperature",
    "selection_levels",
    "selection_probabilities",
    "temperature_sample",
]

# The reference implementation's N; the paper needs N ~ 200 to match a Transformer at softmax temperature 0.5.
DEFAULT_NUM_CANDIDATES = 200
# Cap on rounds of the exact sampler. With alpha = 0, R rounds of W draws hold at least floor(R W / n) complete
# attempts (an attempt uses at most n draws), so a row is left unfinished with probability at most
# (1 - Z_T)^floor(R W / n): at T = 1/2 with the defaults, below 4e-4 whenever Z_T >= 1e-3.
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


def check_temperature(temperature: float) -> float:
    """Checks T in (0, 1] (likelihood-free temperature can only sharpen P) and returns it as a float."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number in (0, 1], got {temperature!r}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or not 0.0 < temperature <= 1.0:
        raise ValueError(
            f"temperature must be a finite number in (0, 1], got {temperature!r} (likelihood-free temperature can "
            "only sharpen the model's distribution)"
        )
    return temperature


def _inverse_temperature(temperature: float) -> float:
    """Checks T in (0, 1] and returns a = 1/T, snapped to an integer when within `_INTEGER_TOLERANCE` of one."""
    inv_t = 1.0 / check_temperature(temperature)
    if abs(inv_t - round(inv_t)) <= _INTEGER_TOLERANCE * inv_t:
        inv_t = float(round(inv_t))
    return inv_t


def check_positive_int(name: str, value: int) -> None:
    """Raises unless `value` is an integer >= 1 (bool excluded); `name` names it in the message."""
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


def selection_levels(inv_t: float, num_candidates: int) -> range:
    """The offsets j (level m = a - j, a = 1/T) that `selection_probabilities` must visit: O(N), not O(1/T).

    Why the other levels never select: a candidate is eligible at level m iff C(c, m) > 0, i.e. c > m - 1, and
    its multiplicity c counts agreeing candidates among the N of its row, so c <= N. A level m >= N + 1 thus has no
    eligible candidate in any row, and the rule "the highest level with an eligible chunk decides" never stops
    there: only the levels m < N + 1 can matter. They are j > a - N - 1, at most N + 1 of them, and the lowest
    level a - n + 1 (j = n - 1, n = floor(a)) is always among them since N >= 1. Without this cap the loop ran over
    floor(1/T) levels per step (about 10^7 at T = 1e-7, which never returned).
    """
    num_levels = int(inv_t)
    first = max(0, math.floor(inv_t - num_candidates - 1) + 1)
    return range(min(first, num_levels - 1), num_levels)


def selection_probabilities(candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probability with which the approximate method picks each candidate (see the module docstring).

    Levels m = a, a - 1, ..., a - n + 1 with a = 1/T, n = floor(a); the highest level at which some chunk has
    c > m - 1 gives each candidate the weight C(c, m) / c of eq. (3), so that a distinct chunk x gets total
    weight C(c_x, m). The loop runs over levels, never over rows or candidates, and only over the levels below
    N + 1 (`selection_levels`: higher ones cannot hold an eligible chunk), so a step costs O(N) levels at any T.

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
    log_weights = None
    # Lowest level first, so that each higher level overwrites the rows where it has an eligible chunk. The
    # lowest level, a - n + 1 in [1, 2), accepts every candidate (c >= 1 > m - 1), so each row ends with a choice.
    for j in reversed(selection_levels(inv_t, candidates.shape[1])):
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


def pick_by_uniform(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Algorithm 2's pick by inverse CDF: `probs [B, N]` (rows sum to 1), `uniforms [B]` in [0, 1) -> index `[B]`.

    Index j is returned iff cdf[j-1] <= u * cdf[N-1] < cdf[j], i.e. with probability probs[j]; a zero-probability
    candidate has an empty interval and is never picked. Taking the uniforms as input lets `generate` draw them
    ahead of a compiled step, and makes the pick a plain function of its inputs.
    """
    cdf = probs.double().cumsum(-1)  # [B, N]
    index = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1])[:, None], right=True)[:, 0]
    # Rounding can put u*total at the very end: fall back to the last candidate with positive mass.
    last_positive = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(index, last_positive)


def select_by_temperature(
    candidates: torch.Tensor, temperature: float, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate temperature sampling among already drawn candidates (Algorithm 2, generalised to any T).

    Decode the N candidates once, then select. At T = 1 it is a uniform pick,
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
    uniforms = torch.rand(probs.shape[0], generator=generator, device=candidates.device)  # [B]
    index = pick_by_uniform(probs, uniforms)  # [B]
    chosen = candidates.gather(1, index[:, None, None].expand(-1, 1, candidates.shape[2])).squeeze(1)  # [B, K]
    return chosen, index


# ----------------------------------------------------------------------------------------------------------------
# Exact method (Algorithm 1)


@dataclass
class _ExactSamplerState:
    """Algorithm 1 as a state machine per row (module docstring): all rows advance together, one draw at a time."""

    done: torch.Tensor  # [B] bool, the row has its answer
    in_stage2: torch.Tensor  # [B] bool
    run: torch.Tensor  # [B] long, stage-1 copies of x* so far
    step: torch.Tensor  # [B] long, i of stage 2
    candidate: torch.Tensor  # [B, K] x* (the answer once done)

    @classmethod
    def start(cls, first: torch.Tensor) -> _ExactSamplerState:
        done = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
        run = torch.zeros(first.shape[0], dtype=torch.long, device=first.device)
        return cls(done, torch.zeros_like(done), run, torch.ones_like(run), first.clone())

    def feed(self, x: torch.Tensor, coin: torch.Tensor, run_len: int, alpha: float) -> None:
        """One draw `x [B, K]` for every row (finished rows ignore it) and its stage-2 coin `[B]`."""
        same = (x == self.candidate).all(-1)  # [B]
        stage1 = ~self.done & ~self.in_stage2
        stage2 = ~self.done & self.in_stage2
        # Stage 1: the first draw of an attempt becomes x*; a copy extends the run; a different chunk ends the
        # attempt and is itself discarded (run back to 0).
        starting = stage1 & (self.run == 0)
        self.candidate = torch.where(starting[:, None], x, self.candidate)
        self.run = torch.where(stage1, torch.where(starting | same, self.run + 1, 0), self.run)
        complete = stage1 & (self.run == run_len)
        if alpha == 0.0:
            self.done = self.done | complete
        else:
            self.in_stage2 = self.in_stage2 | complete
            self.step = torch.where(complete, 1, self.step)
        # Stage 2 (rows that entered it with this very draw wait for the next one).
        accept = stage2 & same
        restart = stage2 & ~same & (coin < alpha / self.step)
        self.done = self.done | accept
        self.in_stage2 = self.in_stage2 & ~restart
        self.run = torch.where(restart, 0, self.run)
        self.step = torch.where(stage2 & ~accept & ~restart, self.step + 1, self.step)


def _fall_back_or_raise(message: str, on_max_rounds: str, who: str, num_candidates: int, log) -> None:
    """The exact method could not finish within max_rounds: raise (`on_max_rounds="raise"`) or log the fallback."""
    if on_max_rounds == "raise":
        raise RuntimeError(message + "; raise max_rounds or use on_max_rounds='approximate'")
    log(message + f"; {who} to the approximate method with {num_candidates} candidates")


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
    are handled as `on_max_rounds` says (when 1/T needs more identical draws than the cap allows, e.g. T = 1e-7,
    no row can finish and every row is handled so at once, without drawing in vain):
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
        draws_per_round (`int`): W, chunks requested per row per call.
        on_max_rounds (`str`): `"approximate"` or `"raise"`, see above.
        num_candidates (`int`): N for the approximate fallback.

    Returns:
        `torch.LongTensor` of shape `[B, K]`, one chunk per row.
    """
    inv_t = _inverse_temperature(temperature)
    check_positive_int("max_rounds", max_rounds)
    check_positive_int("draws_per_round", draws_per_round)
    check_positive_int("num_candidates", num_candidates)
    if on_max_rounds not in _ON_MAX_ROUNDS:
        raise ValueError(f"on_max_rounds must be one of {_ON_MAX_ROUNDS}, got {on_max_rounds!r}")
    if inv_t == 1.0:
        return _call_draw(draw, 1, None)[:, 0]

    run_len = int(inv_t)  # n: identical draws needed in stage 1
    alpha = inv_t - run_len  # fractional part, handled by the Bernoulli factory of stage 2, eq. (2)
    if run_len > max_rounds * draws_per_round:
        # Stage 1 needs n identical draws in a row, more than the cap allows: no row can finish, so drawing is
        # wasted (at T = 1e-7 it was 1000 rounds per step). Go to the documented fallback at once.
        message = (
            f"exact temperature sampling (T={temperature}) needs {run_len} identical draws in a row, more than "
            f"max_rounds={max_rounds} rounds of {draws_per_round} draws allow"
        )
        _fall_back_or_raise(message, on_max_rounds, "every row falls back", num_candidates, logger.warning_once)
        fallback_candidates = _call_draw(draw, num_candidates, None)  # [B, N, K]
        _check_generator(generator, fallback_candidates.device)
        return select_by_temperature(fallback_candidates, temperature, generator=generator)[0]
    shape = state = None
    for _ in range(max_rounds):
        samples = _call_draw(draw, draws_per_round, shape)  # [B, W, K]
        if shape is None:
            shape = (samples.shape[0], samples.shape[2])
            _check_generator(generator, samples.device)
            state = _ExactSamplerState.start(samples[:, 0])
        # One uniform per draw for the stage-2 coin "restart with probability alpha / i".
        coins = torch.rand(samples.shape[:2], generator=generator, device=samples.device)  # [B, W]
        for j in range(draws_per_round):
            state.feed(samples[:, j], coins[:, j], run_len, alpha)
        if bool(state.done.all()):
            return state.candidate

    done, candidate = state.done, state.candidate
    unfinished = ~done
    num_unfinished = int(unfinished.sum())
    message = (
        f"exact temperature sampling (T={temperature}) left {num_unfinished} of {shape[0]} rows unfinished after "
        f"max_rounds={max_rounds} rounds of {draws_per_round} draws"
    )
    _fall_back_or_raise(message, on_max_rounds, "those rows fall back", num_candidates, logger.warning)
    fallback_candidates = _call_draw(draw, num_candidates, shape)  # [B, N, K]
    fallback, _ = select_by_temperature(fallback_candidates[unfinished], temperature, generator=generator)
    candidate[unfinished] = fallback
    return candidate


# ----------------------------------------------------------------------------------------------------------------
# Random sources


class CalmRandom:
    """Where `generate` draws its random numbers: the global RNG, one generator, or one generator per row (each row
    then draws its own numbers, so a row gives the same result alone or in any batch). Draws come out on `device`."""

    def __init__(self, device: torch.device, generator=None, seed: int | None = None, batch_size: int = 1):
        self.device = device
        self.per_row = None
        self.generator = None
        if seed is not None:
            if generator is not None:
                raise ValueError("Pass at most one of `seed` and `generator`.")
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"`seed` must be an int, got {seed!r}.")
            self.generator = torch.Generator(device=device).manual_seed(seed)
        elif isinstance(generator, (list, tuple)):
            if len(generator) != batch_size or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"`generator` as a list must hold one torch.Generator per row ({batch_size}), got {len(generator)}."
                )
            self.per_row = list(generator)
        elif generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"`generator` must be a torch.Generator or a list of them, got {type(generator)}.")
            self.generator = generator

    def _draw(self, fn, steps: int, batch: int, rest: tuple) -> torch.Tensor:
        # fn(shape, device=, generator=) -> [steps, batch, *rest(, E)] on self.device
        if self.per_row is not None:
            rows = [fn((steps, *rest), device=g.device, generator=g) for g in self.per_row]
            return torch.stack(rows, dim=1).to(self.device)
        if self.generator is not None:
            g = self.generator
            return fn((steps, batch, *rest), device=g.device, generator=g).to(self.device)
        return fn((steps, batch, *rest), device=self.device, generator=None)

    def uniform(self, steps: int, batch: int, *rest: int) -> torch.Tensor:
        return self._draw(torch.rand, steps, batch, rest)

    def head_noise(self, head, steps: int, batch: int, *rest: int) -> torch.Tensor:
        """The head's own noise (`head.draw_noise`) `[steps, batch, *rest, E]`."""
        return self._draw(head.draw_noise, steps, batch, rest)

    def device_generator(self) -> torch.Generator | None:
        """A generator on the model's device for the exact sampler's own draws, derived from ours."""
        if self.per_row is not None:
            raise ValueError("Per-row generators are supported at T = 1 and by the approximate method, not 'exact'.")
        if self.generator is None:
            return None
        if self.generator.device.type == self.device.type:
            return self.generator
        seed = int(torch.randint(0, 2**62, (), generator=self.generator, device=self.generator.device))
        return torch.Generator(device=self.device).manual_seed(seed)

    def get_state(self):
        if self.per_row is not None:
            return [g.get_state() for g in self.per_row]
        if self.generator is not None:
            return self.generator.get_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def set_state(self, state) -> None:
        if self.per_row is not None:
            for g, s in zip(self.per_row, state):
                g.set_state(s)
        elif self.generator is not None:
            self.generator.set_state(state)
        else:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], self.device)


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
    check_positive_int("num_candidates", num_candidates)
    # Checked for both methods, so that a bad setting fails before a switch of method exposes it.
    check_positive_int("max_rounds", max_rounds)
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
