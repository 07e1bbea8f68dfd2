"""Tests for the likelihood-free temperature samplers in modeling_calm/modeling_calm_sampling.py.

The statistical tests sample a known categorical distribution over 5 chunks of K = 3 tokens, using a seeded
generator inside `draw`. Each row of a batch is an independent experiment. Chi-square goodness-of-fit tests use
significance 0.001, with critical values hard-coded below because scipy is not a dependency. Every seed is fixed,
so the outcome is deterministic: a correct sampler fails a given test for at most 0.1 % of seeds.
"""

import logging
import math
from collections import Counter

import pytest
import torch

from modeling_calm.modeling_calm_sampling import (
    chunk_multiplicities,
    exact_temperature_sample,
    select_by_temperature,
    selection_probabilities,
    temperature_sample,
)


# Two chunks share the prefix (1, 2), so chunks are equal only when all K tokens are.
CHUNKS = torch.tensor([[1, 2, 3], [1, 2, 4], [3, 2, 1], [0, 0, 0], [4, 1, 1]])
PROBS = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
# Upper 0.001 quantiles of the chi-square distribution, indexed by degrees of freedom (checked against the
# regularised incomplete gamma function: survival 1.000e-3 at each value).
CHI2_CRITICAL_0001 = {4: 18.467, 7: 24.322}
NUM_ROWS = 20_000  # rows per exact-sampling experiment: the smallest target mass (T = 1/3) still expects ~120
LOGGER_NAME = "modeling_calm.modeling_calm_sampling"


def make_draw(num_rows: int, seed: int, calls: list | None = None):
    """draw(n) -> [num_rows, n, 3]: i.i.d. chunks from PROBS, using its own seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        if calls is not None:
            calls.append(n)
        ids = torch.multinomial(PROBS.float(), num_rows * n, replacement=True, generator=gen)
        return CHUNKS[ids.view(num_rows, n)]

    return draw


def chunk_ids(chunks: torch.Tensor) -> torch.Tensor:
    """[B, K] chunks -> [B] indices into CHUNKS; fails if some chunk is not one of CHUNKS."""
    match = (chunks[:, None, :] == CHUNKS[None]).all(-1)  # [B, 5]
    assert bool(match.any(1).all()), "sampler returned a chunk outside the support"
    return match.long().argmax(1)


def target(temperature: float) -> torch.Tensor:
    weights = PROBS ** (1.0 / temperature)
    return weights / weights.sum()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    return float(((observed.double() - expected) ** 2 / expected).sum())


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def method_distribution(temperature: float, num_candidates: int, num_rows: int, seed: int) -> torch.Tensor:
    """Output distribution of the approximate method, estimated without sampling noise from the pick itself:
    the mean over candidate sets of the selection probabilities, summed per chunk."""
    ids = torch.multinomial(
        PROBS.float(), num_rows * num_candidates, replacement=True, generator=torch.Generator().manual_seed(seed)
    ).view(num_rows, num_candidates)
    probs = selection_probabilities(CHUNKS[ids], temperature).double()  # [rows, N]
    return torch.zeros(num_rows, len(CHUNKS), dtype=torch.float64).scatter_add_(1, ids, probs).mean(0)


# --------------------------------------------------------------------------------------------------------------
# Exact method


@pytest.mark.parametrize("temperature", [1.0, 1 / 2, 1 / 3, 0.7, 0.45])
def test_exact_matches_target(temperature):
    out = exact_temperature_sample(
        make_draw(NUM_ROWS, seed=1), temperature, generator=torch.Generator().manual_seed(2)
    )
    assert out.shape == (NUM_ROWS, 3) and out.dtype == torch.long
    counts = torch.bincount(chunk_ids(out), minlength=len(CHUNKS))
    assert chi_square(counts, target(temperature)) < CHI2_CRITICAL_0001[len(CHUNKS) - 1]


def test_exact_chi_square_detects_wrong_temperature():
    # Power check of the test above: samples at T = 0.45 must be rejected as samples of T = 0.5 and of T = 0.4.
    out = exact_temperature_sample(make_draw(NUM_ROWS, seed=3), 0.45, generator=torch.Generator().manual_seed(4))
    counts = torch.bincount(chunk_ids(out), minlength=len(CHUNKS))
    for wrong in (0.5, 0.4):
        assert chi_square(counts, target(wrong)) > CHI2_CRITICAL_0001[len(CHUNKS) - 1]


@pytest.mark.parametrize("method", ["exact", "approximate"])
def test_temperature_one_is_a_single_draw(method):
    calls = []
    draw = make_draw(NUM_ROWS, seed=5, calls=calls)
    out = temperature_sample(draw, 1.0, method=method, generator=torch.Generator().manual_seed(6))
    assert calls == [1]
    # Same seed, same single draw.
    assert torch.equal(out, make_draw(NUM_ROWS, seed=5)(1)[:, 0])
    counts = torch.bincount(chunk_ids(out), minlength=len(CHUNKS))
    assert chi_square(counts, PROBS) < CHI2_CRITICAL_0001[len(CHUNKS) - 1]


def unique_draw(num_rows: int, calls: list, fallback_chunk: list[int], num_candidates: int):
    """A sampler under which the exact method can never finish: every chunk it returns is new (a counter), so
    stage 1 never sees n equal draws (n >= 2) and stage 2 never sees x* again (n = 1). The fallback's single
    call, recognised by n == num_candidates, returns copies of `fallback_chunk`."""

    def draw(n):
        calls.append(n)
        if n == num_candidates:
            return torch.tensor(fallback_chunk).expand(num_rows, n, 3).clone()
        start = 1000 * len(calls)
        ids = torch.arange(start, start + num_rows * n).view(num_rows, n, 1)
        return torch.cat([ids, ids % 7, torch.zeros_like(ids)], dim=-1)

    return draw


@pytest.mark.parametrize("temperature", [0.5, 0.7])
def test_exact_cap_raises_when_asked(temperature):
    calls = []
    draw = unique_draw(8, calls, [9, 9, 9], num_candidates=50)
    with pytest.raises(RuntimeError, match=r"8 of 8 rows unfinished after max_rounds=3"):
        exact_temperature_sample(
            draw, temperature, max_rounds=3, on_max_rounds="raise", num_candidates=50,
            generator=torch.Generator().manual_seed(0),
        )
    assert calls == [16, 16, 16]


@pytest.mark.parametrize("temperature", [0.5, 0.7])
def test_exact_cap_falls_back_to_approximate(temperature, caplog):
    num_rows, num_candidates = 6, 50
    calls = []
    never = unique_draw(num_rows, calls, [9, 9, 9], num_candidates)
    constant = torch.tensor([5, 5, 5])

    def draw(n):
        # Rows 0 and 1 always see the same chunk, so they finish in the first round (stage 1 completes, and
        # stage 2 accepts at once); the other rows can never finish.
        samples = never(n)
        if n != num_candidates:
            samples[:2] = constant
        return samples

    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        out = temperature_sample(
            draw, temperature, method="exact", max_rounds=4, num_candidates=num_candidates,
            generator=torch.Generator().manual_seed(0),
        )
    assert calls == [16, 16, 16, 16, num_candidates]  # max_rounds rounds, then one fallback call
    assert torch.equal(out[:2], constant.expand(2, 3))  # finished rows keep their exact sample
    assert torch.equal(out[2:], torch.tensor([9, 9, 9]).expand(num_rows - 2, 3))  # the others: fallback pick
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "4 of 6 rows unfinished after max_rounds=4" in warnings[0]


def test_exact_finishes_without_fallback_when_cap_is_not_hit(caplog):
    calls = []
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        exact_temperature_sample(make_draw(100, seed=7, calls=calls), 0.45, generator=torch.Generator().manual_seed(8))
    assert 1 <= len(calls) < 1000 and set(calls) == {16}  # no num_candidates call
    assert not caplog.records


# --------------------------------------------------------------------------------------------------------------
# Approximate method


@pytest.mark.parametrize("temperature", [1 / 2, 0.7, 0.45])
def test_approximate_converges_as_num_candidates_grows(temperature):
    distances = [
        total_variation(method_distribution(temperature, n, num_rows=4000, seed=10 + n), target(temperature))
        for n in (4, 32, 256)
    ]
    # Measured with these seeds: ~0.09-0.15, ~0.007-0.028, <= 0.005. The estimate's own noise is ~0.002.
    assert distances[0] > distances[1] > distances[2]
    assert distances[0] > 0.05  # small N is visibly biased, so the comparison has something to detect
    assert distances[2] < 0.01


def test_approximate_sampling_close_to_target_at_large_n():
    # Through the public entry point and the multinomial pick. With 10k rows the empirical TV has noise ~0.006.
    calls = []
    out = temperature_sample(
        make_draw(10_000, seed=11, calls=calls), 0.45, num_candidates=256, generator=torch.Generator().manual_seed(12)
    )
    assert calls == [256]
    empirical = torch.bincount(chunk_ids(out), minlength=len(CHUNKS)).double() / 10_000
    assert total_variation(empirical, target(0.45)) < 0.02
    assert total_variation(empirical, PROBS) > 0.2  # and far from the untempered distribution


def reference_selection_probabilities(candidates: torch.Tensor, temperature: float) -> list[list[float]]:
    """The selection rule written out one row and one distinct chunk at a time. For T = 1/n it is the paper's
    wording (keep c >= m, weight binomial(c, m) with integers); otherwise the generalised rule (keep
    C(c, m) > 0, i.e. c > m - 1, with the Gamma-function coefficient)."""
    inv_t = 1.0 / temperature
    integer = abs(inv_t - round(inv_t)) < 1e-9
    rows = []
    for row in candidates.tolist():
        chunks = [tuple(chunk) for chunk in row]
        counts = Counter(chunks)
        level = round(inv_t) if integer else inv_t
        while True:
            if integer:
                weights = {x: math.comb(c, level) for x, c in counts.items() if c >= level}
            else:
                weights = {
                    x: math.gamma(c + 1) / (math.gamma(level + 1) * math.gamma(c - level + 1))
                    for x, c in counts.items()
                    if c > level - 1
                }
            if weights:
                break
            level -= 1
        total = sum(weights.values())
        rows.append([weights.get(x, 0.0) / total / counts[x] for x in chunks])
    return rows


@pytest.mark.parametrize("temperature", [1.0, 1 / 2, 1 / 3, 1 / 4, 0.7, 0.45, 0.3])
def test_selection_probabilities_match_reference(temperature):
    gen = torch.Generator().manual_seed(13)
    # Vocabularies of 2, 3 and 6 tokens over K = 2 give many repeats, some, and often none among N = 12.
    candidates = torch.cat([torch.randint(0, v, (100, 12, 2), generator=gen) for v in (2, 3, 6)])
    probs = selection_probabilities(candidates, temperature)
    assert probs.shape == (300, 12) and probs.dtype == torch.float32
    expected = torch.tensor(reference_selection_probabilities(candidates, temperature))
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)


def test_selection_probabilities_are_continuous_in_temperature():
    gen = torch.Generator().manual_seed(14)
    candidates = torch.cat([torch.randint(0, v, (100, 12, 2), generator=gen) for v in (2, 3, 6)])
    for inv_t in (1.0, 2.0, 3.0):
        at = selection_probabilities(candidates, 1 / inv_t)
        above = selection_probabilities(candidates, 1 / (inv_t + 1e-4))
        assert float((at - above).abs().max()) < 1e-3
        if inv_t > 1:
            below = selection_probabilities(candidates, 1 / (inv_t - 1e-4))
            assert float((at - below).abs().max()) < 1e-3


def test_chunk_multiplicities_match_pairwise_count():
    gen = torch.Generator().manual_seed(15)
    for shape, vocab in (((50, 40, 3), 2), ((50, 40, 3), 5), ((20, 7, 1), 3), ((5, 1, 4), 9)):
        candidates = torch.randint(0, vocab, shape, generator=gen)
        pairwise = (candidates[:, :, None, :] == candidates[:, None, :, :]).all(-1).sum(-1)  # [B, N]
        assert torch.equal(chunk_multiplicities(candidates), pairwise)


def test_select_returns_one_of_the_candidates():
    gen = torch.Generator().manual_seed(16)
    candidates = torch.randint(0, 3, (500, 20, 2), generator=gen)
    chosen, index = select_by_temperature(candidates, 0.45, generator=gen)
    assert chosen.shape == (500, 2) and index.shape == (500,) and index.dtype == torch.long
    assert bool(((index >= 0) & (index < 20)).all())
    assert torch.equal(chosen, candidates[torch.arange(500), index])


# 1 / (2 - 1e-8) is just outside the integer snap: its only level, 2 - 1e-8, must still accept singletons.
@pytest.mark.parametrize("temperature", [1.0, 1 / 2, 0.45, 1 / (2 - 1e-8), 1 / (2 + 1e-8)])
def test_all_distinct_candidates_pick_uniformly(temperature):
    num_rows, num_candidates = 16_000, 8
    candidates = torch.stack([torch.arange(num_candidates), torch.arange(num_candidates) % 3], -1)  # [8, 2]
    candidates = candidates.expand(num_rows, num_candidates, 2)
    probs = selection_probabilities(candidates, temperature)
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / num_candidates))
    _, index = select_by_temperature(candidates, temperature, generator=torch.Generator().manual_seed(17))
    counts = torch.bincount(index, minlength=num_candidates)
    uniform = torch.full((num_candidates,), 1 / num_candidates, dtype=torch.float64)
    assert chi_square(counts, uniform) < CHI2_CRITICAL_0001[num_candidates - 1]


def test_all_identical_candidates():
    candidates = torch.tensor([[7, 1, 2], [3, 3, 3]])[:, None, :].expand(2, 10, 3)  # two rows, one chunk each
    chosen, index = select_by_temperature(candidates, 1 / 3, generator=torch.Generator().manual_seed(18))
    assert torch.equal(chosen, torch.tensor([[7, 1, 2], [3, 3, 3]]))
    # A chunk's copies share its weight equally.
    torch.testing.assert_close(selection_probabilities(candidates, 1 / 3), torch.full((2, 10), 0.1))


# --------------------------------------------------------------------------------------------------------------
# Reproducibility


@pytest.mark.parametrize("method", ["exact", "approximate"])
def test_reproducible_with_generator(method):
    def run(algorithm_seed):
        return temperature_sample(
            make_draw(2000, seed=19), 0.45, method=method, num_candidates=16,
            generator=torch.Generator().manual_seed(algorithm_seed),
        )

    first = run(20)
    assert torch.equal(first, run(20))
    # The algorithm's own randomness (stage-2 coins, the pick) comes from the generator: another seed, another
    # result on the same draws.
    assert not torch.equal(first, run(21))


# --------------------------------------------------------------------------------------------------------------
# Validation


def good_draw(n):
    return CHUNKS[torch.zeros(4, n, dtype=torch.long)]


@pytest.mark.parametrize("temperature", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), -float("inf"), True, "0.5"])
def test_bad_temperature_raises(temperature):
    rule = r"temperature must be a (real|finite) number in \(0, 1\]"
    for method in ("exact", "approximate"):
        with pytest.raises(ValueError, match=rule) as info:
            temperature_sample(good_draw, temperature, method=method)
        assert repr(temperature) in str(info.value) or repr(float(temperature)) in str(info.value)
    with pytest.raises(ValueError, match=rule):
        select_by_temperature(CHUNKS[None], temperature)
    with pytest.raises(ValueError, match=rule):
        exact_temperature_sample(good_draw, temperature)


@pytest.mark.parametrize("num_candidates", [0, -3, 2.5, True, "8", None])
def test_bad_num_candidates_raises(num_candidates):
    for method in ("exact", "approximate"):
        with pytest.raises(ValueError, match=r"num_candidates must be an integer >= 1, got " + repr(num_candidates)):
            temperature_sample(good_draw, 0.5, method=method, num_candidates=num_candidates)


def test_bad_method_and_cap_settings_raise():
    with pytest.raises(ValueError, match=r"method must be one of \('exact', 'approximate'\), got 'greedy'"):
        temperature_sample(good_draw, 0.5, method="greedy")
    for method in ("exact", "approximate"):
        with pytest.raises(ValueError, match=r"max_rounds must be an integer >= 1, got 0"):
            temperature_sample(good_draw, 0.5, method=method, max_rounds=0)
        with pytest.raises(ValueError, match=r"on_max_rounds must be one of .*, got 'ignore'"):
            temperature_sample(good_draw, 0.5, method=method, on_max_rounds="ignore")
    with pytest.raises(ValueError, match=r"max_rounds must be an integer >= 1, got 2.0"):
        exact_temperature_sample(good_draw, 0.5, max_rounds=2.0)
    with pytest.raises(ValueError, match=r"draws_per_round must be an integer >= 1, got 1.5"):
        exact_temperature_sample(good_draw, 0.5, draws_per_round=1.5)
    with pytest.raises(ValueError, match=r"on_max_rounds must be one of .*, got 'ignore'"):
        exact_temperature_sample(good_draw, 0.5, on_max_rounds="ignore")


BAD_DRAWS = {
    "float": (lambda n: torch.zeros(4, n, 3), r"LongTensor .* got dtype torch.float32"),
    "int32": (lambda n: torch.zeros(4, n, 3, dtype=torch.int32), r"got dtype torch.int32"),
    "list": (lambda n: [[0, 0, 0]] * n, r"must return a torch.Tensor .* got list"),
    "2-d": (lambda n: torch.zeros(4, 3, dtype=torch.long), r"must return shape \[B, \d+, K\] .* got \(4, 3\)"),
    "wrong n": (lambda n: torch.zeros(4, n + 1, 3, dtype=torch.long), r"must return shape \[B, \d+, K\]"),
    "empty chunk": (lambda n: torch.zeros(4, n, 0, dtype=torch.long), r"with K >= 1"),
}


@pytest.mark.parametrize("name", list(BAD_DRAWS))
@pytest.mark.parametrize("method,temperature", [("exact", 0.5), ("approximate", 0.5), ("exact", 1.0)])
def test_bad_draw_output_raises(name, method, temperature):
    draw, message = BAD_DRAWS[name]
    with pytest.raises(ValueError, match=message):
        temperature_sample(draw, temperature, method=method, num_candidates=8)


@pytest.mark.parametrize("changed", ["batch", "chunk length"])
def test_draw_changing_shape_between_calls_raises(changed):
    calls = []

    def draw(n):
        calls.append(n)
        rows, chunk_len = 4, 3
        if len(calls) > 1:
            rows, chunk_len = (5, 3) if changed == "batch" else (4, 2)
        return torch.arange(1000 * len(calls), 1000 * len(calls) + rows * n * chunk_len).view(rows, n, chunk_len)

    with pytest.raises(ValueError, match=r"earlier calls fixed B = 4 and K = 3"):
        exact_temperature_sample(draw, 0.5)


@pytest.mark.parametrize(
    "candidates,message",
    [
        (torch.zeros(4, 3, dtype=torch.long), r"shape \[B, N, K\] .* got \(4, 3\)"),
        (torch.zeros(4, 0, 3, dtype=torch.long), r"N >= 1"),
        (torch.zeros(4, 5, 3), r"LongTensor .* got dtype torch.float32"),
        ([[[1]]], r"must be a torch.Tensor"),
    ],
)
def test_bad_candidates_raise(candidates, message):
    with pytest.raises(ValueError, match=message):
        select_by_temperature(candidates, 0.5)
