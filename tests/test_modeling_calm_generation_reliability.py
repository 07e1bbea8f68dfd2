"""generate under threads, with non-finite models, tiny temperatures, huge N, and transformers' conventions
(do_sample=False, GenerationConfig merging, padding warnings, no logits): issue 16 items 1-3, issue 18 item 5."""

import copy
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

from modeling_calm import modeling_calm_sampling as sampling
from modeling_calm.modeling_calm_generation import CalmNonFiniteError
from tests.utils import EOS, NO_STOPS, PAD, left_pad, make_model, random_rows
from tests.utils import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def warnings_seen(monkeypatch):
    """Messages logged through `logger.warning_once` / `logger.warning` (warning_once's cache cleared)."""
    seen = []
    from modeling_calm import modeling_calm_generation as generation
    from modeling_calm import modeling_calm_generation_settings as settings

    for module in (generation, settings):
        monkeypatch.setattr(module.logger, "warning_once", lambda msg, *a, **k: seen.append(str(msg)))
        monkeypatch.setattr(module.logger, "warning", lambda msg, *a, **k: seen.append(str(msg)))
    monkeypatch.setattr(sampling.logger, "warning_once", lambda msg, *a, **k: seen.append(str(msg)))
    return seen


# ----------------------------------------------------------------------------------------------------------------
# 16.1 concurrent generate


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_concurrent_calls_equal_the_same_calls_alone(model, compiled, temperature):
    ids, mask = left_pad(random_rows([6, 9], seed=31))
    extra = dict(calm_compile=True, calm_compile_mode="backend:eager") if compiled else dict(calm_compile=False)

    def call(seed):
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=48, seed=seed, temperature=temperature, num_candidates=8,
            **NO_STOPS, **extra,
        )

    seeds = list(range(16))
    alone = {seed: call(seed) for seed in seeds}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that the calls interleave within steps
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            together = list(pool.map(call, seeds))
    finally:
        sys.setswitchinterval(interval)
    wrong = [seed for seed, out in zip(seeds, together) if not torch.equal(out, alone[seed])]
    assert wrong == []
    assert model.calm_last_decoding.startswith("compiled" if compiled else "eager")


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_concurrent_compiled_calls_on_the_reused_static_cache_do_not_break_it(temperature):
    """The reused static cache is the shared state: before the lock, 8 threads made the compiled step fail with
    `index_copy_(): index 7x is out of bounds for dimension 2 with size 64` (another call's cache position), and the
    model fell back to eager decoding for good, with only a log line. A fresh model, so no earlier call's state."""
    model = make_model()
    ids, mask = left_pad(random_rows([6, 9], seed=32))

    def call(seed):
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=48, seed=seed, temperature=temperature, num_candidates=8,
            cache_implementation="static", calm_compile=True, calm_compile_mode="backend:eager", **NO_STOPS,
        )

    seeds = list(range(48))
    alone = {seed: call(seed) for seed in seeds[:8]}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            together = list(pool.map(call, seeds))
    finally:
        sys.setswitchinterval(interval)
    assert not model._calm_decoding_state.compile_failed
    assert model.calm_last_decoding.startswith("compiled"), model.calm_last_decoding
    assert [s for s, out in zip(seeds, together) if s in alone and not torch.equal(out, alone[s])] == []


def test_a_model_with_its_lock_deep_copies_and_pickles(model):
    model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, seed=0, calm_compile=True,
                   calm_compile_mode="backend:eager")
    copied = copy.deepcopy(model)
    assert copied._calm_state.lock is not model._calm_state.lock
    assert copied._calm_state.static_cache is None  # a copy gets its own cache
    restored = pickle.loads(pickle.dumps(model))
    with restored._calm_state.lock:  # fresh and unlocked
        pass
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(copied.generate(ids, max_new_tokens=4, seed=1), model.generate(ids, max_new_tokens=4, seed=1))


# ----------------------------------------------------------------------------------------------------------------
# 16.2 non-finite values


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.5, num_candidates=4),
                                      dict(temperature=0.5, sampling_method="exact", max_rounds=2),
                                      dict(calm_compile=True, calm_compile_mode="backend:eager")])
def test_a_nan_head_is_refused_not_decoded_as_a_stop(settings):
    bad = make_model()
    with torch.no_grad():
        bad.head.output.fc2.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite latents"):
        bad.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, seed=0, **settings)


def test_a_nan_backbone_is_refused_at_the_prompt():
    bad = make_model()
    with torch.no_grad():
        bad.model.norm.weight.fill_(float("nan"))
    with pytest.raises(CalmNonFiniteError, match="hidden state after the prompt is not finite"):
        bad.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# 16.3 tiny temperatures and huge N


def test_selection_visits_at_most_n_plus_one_levels(monkeypatch):
    calls = []
    lgamma = torch.lgamma

    def counting(x):
        calls.append(1)
        if len(calls) > 1000:
            raise AssertionError("selection_probabilities loops over more levels than N + 1")
        return lgamma(x)

    monkeypatch.setattr(sampling.torch, "lgamma", counting)
    candidates = torch.randint(0, 3, (2, 16, 2), generator=torch.Generator().manual_seed(0))
    probs = sampling.selection_probabilities(candidates, 1e-7)
    assert len(calls) <= 2 * 17 and torch.allclose(probs.sum(1), torch.ones(2))
    assert len(sampling.selection_levels(1e7, 16)) <= 17


@pytest.mark.parametrize("temperature", [0.5, 1 / 3, 0.3, 0.07, 0.01])
def test_capped_levels_give_the_same_probabilities(temperature):
    # Reference: every level 1/T, 1/T - 1, ..., as before the cap (float64, same formula).
    g = torch.Generator().manual_seed(3)
    candidates = torch.randint(0, 3, (5, 12, 2), generator=g)
    inv_t = sampling._inverse_temperature(temperature)
    counts = sampling.chunk_multiplicities(candidates).double()
    log_weights = None
    for j in reversed(range(int(inv_t))):
        arg = counts - (inv_t - j) + 1
        ok = arg > 0
        lw = (torch.lgamma(counts + 1) - torch.lgamma(torch.where(ok, arg, 1.0)) - counts.log()).masked_fill(
            ~ok, -float("inf"))
        log_weights = lw if log_weights is None else torch.where(ok.any(1, keepdim=True), lw, log_weights)
    reference = torch.softmax(log_weights, 1).float()
    assert torch.equal(sampling.selection_probabilities(candidates, temperature), reference)


@pytest.mark.parametrize("method", ["approximate", "exact"])
def test_temperature_1e_7_returns(model, method, warnings_seen):
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, seed=0, temperature=1e-7,
                         num_candidates=8, sampling_method=method, **NO_STOPS)
    assert out.shape == (1, 12)
    if method == "exact":
        assert any("falls back to the approximate method" in w for w in warnings_seen)


def test_exact_method_does_not_draw_when_it_cannot_finish(warnings_seen):
    draws = []

    def draw(n):
        draws.append(n)
        return torch.zeros(3, n, 2, dtype=torch.long)

    out = sampling.temperature_sample(draw, 1e-7, method="exact", num_candidates=5)
    assert draws == [5] and out.shape == (3, 2)
    with pytest.raises(RuntimeError, match="identical draws"):
        sampling.exact_temperature_sample(draw, 1e-7, on_max_rounds="raise")


def test_huge_num_candidates_is_refused_with_a_memory_estimate(model):
    with pytest.raises(ValueError, match=r"num_candidates=1000000 .* GiB per step .*estimate"):
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, temperature=0.5, num_candidates=10**6)
    with pytest.raises(ValueError, match="num_candidates=8 .*calm_max_candidate_memory=1000 bytes"):
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, temperature=0.5, num_candidates=8,
                       calm_max_candidate_memory=1000)


# ----------------------------------------------------------------------------------------------------------------
# 18.5 generate conventions


@pytest.mark.parametrize("head_type", ["energy", "flow"])
def test_do_sample_false_is_deterministic_zero_noise(head_type, warnings_seen):
    m = make_model(head_type=head_type)
    ids, mask = left_pad(random_rows([6, 9], seed=41))
    first = m.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, seed=0, **NO_STOPS)
    second = m.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, seed=123, **NO_STOPS)
    zero = m.generate(ids, attention_mask=mask, max_new_tokens=10, noise=torch.zeros(3, 2, m.head.noise_size),
                      **NO_STOPS)
    assert torch.equal(first, second) and torch.equal(first, zero)
    assert not warnings_seen
    cold = m.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, temperature=0.5, **NO_STOPS)
    assert torch.equal(cold, first) and any("temperature=0.5" in w and "ignored" in w for w in warnings_seen)
    sampled = [m.generate(ids, attention_mask=mask, max_new_tokens=10, seed=s, **NO_STOPS) for s in (0, 1)]
    assert not torch.equal(sampled[0], sampled[1])  # sampling is still the default


def test_a_users_generation_config_keeps_the_models_pad_and_eos(model):
    assert model.generation_config.eos_token_id == EOS and model.generation_config.pad_token_id == PAD
    gc, _ = model._calm_settings(GenerationConfig(max_new_tokens=12, max_time=30.0), {}, {})
    assert (gc.pad_token_id, gc.eos_token_id, gc.max_new_tokens, gc.max_time) == (PAD, EOS, 12, 30.0)
    ids = torch.tensor(random_rows([8], seed=42))
    merged = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=12), seed=5)
    reference = model.generate(ids, max_new_tokens=12, seed=5)
    assert torch.equal(merged, reference)


def test_padded_batch_without_mask_and_right_padding_warn(model, warnings_seen):
    ids, mask = left_pad(random_rows([4, 8], seed=43))
    model.generate(ids, max_new_tokens=4, seed=0)
    assert any("no `attention_mask`" in w for w in warnings_seen)
    warnings_seen.clear()
    model.generate(ids, attention_mask=mask, max_new_tokens=4, seed=0)
    assert not warnings_seen
    right_ids, right_mask = ids.flip(1), mask.flip(1)
    model.generate(right_ids, attention_mask=right_mask, max_new_tokens=4, seed=0)
    assert any("Right padding" in w for w in warnings_seen)
    warnings_seen.clear()
    model.generate(right_ids, max_new_tokens=4, seed=0)
    assert any("Right padding" in w for w in warnings_seen)


@pytest.mark.parametrize("kwargs", [dict(output_scores=True), dict(output_logits=True),
                                    dict(return_dict_in_generate=True, output_scores=True),
                                    dict(generation_config=GenerationConfig(output_logits=True, max_new_tokens=4))])
def test_scores_and_logits_are_refused(model, kwargs):
    with pytest.raises(ValueError, match="CALM has no logits"):
        model.generate(torch.tensor([[5, 6, 7, 8]]), **{"max_new_tokens": 4, **kwargs})
