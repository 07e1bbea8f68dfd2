"""CalmForCausalLM.generate: cache parity, batching and padding independence, stop tokens, lengths, streamer,
pipeline, GenerationConfig round trip, randomness, latents, temperature methods, compiled path, errors."""

import json

import pytest
import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, TextStreamer, pipeline
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from modeling_calm import CalmForCausalLM
from modeling_calm.modeling_calm import layout_prompts
from modeling_calm.modeling_calm_heads import zero_init_layers
from modeling_calm.modeling_calm_sampling import selection_probabilities
from tests.utils import BOS, EOS, NO_STOPS, PAD, left_pad, make_model, random_rows, tiny_calm_config

K = 4


@pytest.fixture(scope="module")
def model():
    return make_model()
def energy_noise(steps, batch, *rest, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(steps, batch, *rest, 8, generator=g) - 0.5  # noise_size 8 in the tiny config


# ----------------------------------------------------------------------------------------------------------------
# Layout and cache parity


def test_layout_right_aligns_and_completes_the_first_chunk_with_bos():
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]], extra=3)
    chunk_ids, chunk_mask, num_chunks, dropped = layout_prompts(ids, mask, K, BOS, PAD)
    assert chunk_ids.tolist() == [[BOS, BOS, 5, 6, 7, 8, 9, 10], [PAD] * 4 + [11, 12, 13, 14]]
    assert chunk_mask.tolist() == [[True, True], [False, True]]
    assert num_chunks.tolist() == [2, 1] and dropped.tolist() == [0, 0]
    chunk_ids, chunk_mask, num_chunks, dropped = layout_prompts(ids, mask, K, None, PAD)
    assert chunk_ids.tolist() == [[7, 8, 9, 10], [11, 12, 13, 14]] and dropped.tolist() == [2, 0]


@pytest.mark.parametrize(
    "head_type, cache_implementation, lengths",
    [("energy", None, [7, 10]), ("energy", "static", [7, 10]), ("energy", "static", [9, 11]), ("flow", None, [7, 10])],
)
def test_incremental_decoding_matches_teacher_forced_forward(model, head_type, cache_implementation, lengths):
    """Step i consumes noise[i]: the latents equal the head applied, with that noise, to the hidden states of one
    full forward over BOS-completed prompt + generated chunks. Lengths 7 and 10 give rows of 2 and 3 chunks (a
    pad chunk); 9 and 11 give 3 chunks each (no chunk mask at all)."""
    if head_type == "flow":
        model = make_model(head_type="flow")
    rows = random_rows(lengths)
    ids, mask = left_pad(rows)
    steps = 5
    # Energy head: uniform noise [steps, B, E]; flow head: the start points x0 [steps, B, Z] (Z = 8).
    noise = energy_noise(steps, 2) if head_type == "energy" else torch.randn(steps, 2, 8)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps * K, noise=noise, return_dict_in_generate=True,
        output_latents=True, cache_implementation=cache_implementation, **NO_STOPS,
    )
    new = out.sequences[:, ids.shape[1] :]
    for b, row in enumerate(rows):
        fill = [BOS] * (-len(row) % K)
        full = torch.tensor([fill + row + new[b].tolist()])
        hidden = model(full).last_hidden_state[0]  # [L, D]
        first = (len(fill) + len(row)) // K - 1  # the hidden state that predicts generated chunk 0
        expected = model.head.sample(hidden[first : first + steps], noise=noise[:, b])
        torch.testing.assert_close(out.latents[b], expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Batching and padding


def _solo_vs_batch(model, rows, batch_kwargs, solo_kwargs_for_row, extra_pad=0, max_new=13):
    ids, mask = left_pad(rows, extra=extra_pad)
    batch_new = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, **batch_kwargs)[:, ids.shape[1] :]
    for b, row in enumerate(rows):
        solo = model.generate(torch.tensor([row]), max_new_tokens=max_new, **solo_kwargs_for_row(b))[:, len(row) :]
        solo = torch.nn.functional.pad(solo, (0, batch_new.shape[1] - solo.shape[1]), value=PAD)
        assert torch.equal(solo[0], batch_new[b]), b


@pytest.mark.parametrize("extra_pad", [0, 9])
def test_rows_do_not_depend_on_batch_or_padding_with_explicit_noise(model, extra_pad):
    rows = random_rows([3, 9, 14])
    steps = 4
    noise = energy_noise(steps, len(rows))
    _solo_vs_batch(
        model, rows, dict(noise=noise), lambda b: dict(noise=noise[:, b : b + 1]), extra_pad=extra_pad
    )


def test_rows_do_not_depend_on_batch_with_per_row_generators_at_low_temperature(model):
    rows = random_rows([5, 12], seed=3)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    settings = dict(temperature=0.5, num_candidates=16)
    _solo_vs_batch(
        model, rows, dict(generator=gens([10, 11]), **settings), lambda b: dict(generator=gens([10 + b]), **settings)
    )


# ----------------------------------------------------------------------------------------------------------------
# Stopping, lengths, streamer


def test_eos_several_ids_stop_rows_separately_and_pad_without_deleting_tokens(model):
    ids = torch.tensor(random_rows([8, 8], seed=4))
    raw = model.generate(ids, max_new_tokens=24, seed=5, **NO_STOPS)[:, 8:]
    # Stop ids: row 0's token at new position 5 and row 1's at position 13 (unless they occur earlier).
    stop_ids = [int(raw[0, 5]), int(raw[1, 13])]
    # The pad id is a token that row 0 generates before its stop: it must stay where it is.
    pad_id = int(raw[0, 1])
    assert pad_id not in stop_ids
    out = model.generate(ids, max_new_tokens=24, seed=5, eos_token_id=stop_ids, pad_token_id=pad_id, stop_on_bos=False)
    new = out[:, 8:]
    for b in range(2):
        hits = [i for i, t in enumerate(raw[b].tolist()) if t in stop_ids]
        stop = hits[0]
        assert new[b, : stop + 1].tolist() == raw[b, : stop + 1].tolist()
        assert (new[b, stop + 1 :] == pad_id).all()
    assert new[0, 1] == pad_id  # a generated token equal to the pad id is kept
    # Generation ends once every row has stopped (checked every few steps), never before.
    last_stop = max(next(i for i, t in enumerate(raw[b].tolist()) if t in stop_ids) for b in range(2))
    assert last_stop < new.shape[1] <= 24


def test_bos_stops_by_default(model):
    ids = torch.tensor(random_rows([8], seed=6))
    raw = model.generate(ids, max_new_tokens=16, seed=7, **NO_STOPS)[0, 8:]
    bos = int(raw[6])
    first = raw.tolist().index(bos)
    out = model.generate(ids, max_new_tokens=16, seed=7, bos_token_id=bos, eos_token_id=None)[0, 8:]
    assert out[: first + 1].tolist() == raw[: first + 1].tolist() and (out[first + 1 :] == PAD).all()
    assert first + 1 < 16 and out.shape[0] < 16  # the only row stopped: generation ended early
    kept = model.generate(ids, max_new_tokens=16, seed=7, bos_token_id=bos, eos_token_id=None, stop_on_bos=False)
    assert torch.equal(kept[0, 8:], raw)


def test_max_new_tokens_and_max_length_truncate_the_last_chunk(model):
    ids = torch.tensor(random_rows([6, 6], seed=8))
    eight = model.generate(ids, max_new_tokens=8, seed=9, **NO_STOPS)
    seven = model.generate(ids, max_new_tokens=7, seed=9, **NO_STOPS)
    assert seven.shape == (2, 13) and torch.equal(seven, eight[:, :13])
    by_length = model.generate(ids, max_length=11, seed=9, **NO_STOPS)
    assert torch.equal(by_length, eight[:, :11])


def test_stopping_criteria_stop_rows_separately(model):
    class StopRowZeroAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[0] = input_ids.shape[1] >= 8 + 8
            return done

    ids = torch.tensor(random_rows([8, 8], seed=10))
    raw = model.generate(ids, max_new_tokens=16, seed=11, **NO_STOPS)
    out = model.generate(ids, max_new_tokens=16, seed=11, stopping_criteria=[StopRowZeroAfter()], **NO_STOPS)
    assert torch.equal(out[0, :16], raw[0, :16]) and (out[0, 16:] == PAD).all()
    assert torch.equal(out[1], raw[1])


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_exactly_the_returned_tokens(model):
    ids = torch.tensor(random_rows([7], seed=12))
    raw = model.generate(ids, max_new_tokens=22, seed=13, **NO_STOPS)[0, 7:]
    stop = int(raw[9])
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=22, seed=13, streamer=streamer, eos_token_id=stop, stop_on_bos=False)
    assert streamer.ended and streamer.puts[0] == ids.tolist()
    streamed = [t for chunk in streamer.puts[1:] for t in chunk[0]]
    new = out[0, 7:].tolist()
    assert streamed == new[: new.index(stop) + 1]
    assert all(len(chunk[0]) <= K for chunk in streamer.puts[1:])
    # Without a stop, the last chunk is cut at max_new_tokens.
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=22, seed=13, streamer=streamer, **NO_STOPS)
    assert [t for chunk in streamer.puts[1:] for t in chunk[0]] == out[0, 7:].tolist() and out.shape[1] == 7 + 22


# ----------------------------------------------------------------------------------------------------------------
# Pipeline, TextStreamer, GenerationConfig


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{f"w{i}": i + 4 for i in range(95)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_text_generation_pipeline_matches_a_direct_call(model):
    tokenizer = word_tokenizer()
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    torch.manual_seed(14)
    result = pipe("w1 w2 w3 w4 w5", max_new_tokens=6, return_tensors=True)
    ids = tokenizer("w1 w2 w3 w4 w5", return_tensors="pt").input_ids
    # The pipeline passes its default temperature 0.7 (as a keyword or inside a GenerationConfig, depending on the
    # transformers version); CALM reads it as its likelihood-free temperature.
    torch.manual_seed(14)
    direct = model.generate(ids, max_new_tokens=6, temperature=0.7)
    assert result[0]["generated_token_ids"] == direct[0].tolist()
    texts = pipe(["w1 w2 w3", "w7"], max_new_tokens=5, num_return_sequences=2, temperature=1.0)
    assert [len(t) for t in texts] == [2, 2]
    assert texts[0][0]["generated_text"].startswith("w1 w2 w3") and texts[1][1]["generated_text"].startswith("w7")


def test_text_streamer_prints_the_generated_text(model, capsys):
    tokenizer = word_tokenizer()
    ids = tokenizer("w1 w2 w3 w4 w5 w6", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=10, seed=15, streamer=TextStreamer(tokenizer), **NO_STOPS)
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0]).strip()


def test_generation_config_round_trip_with_calm_fields(tmp_path):
    model = make_model()
    model.generation_config.calm_temperature = 0.5
    model.generation_config.calm_num_candidates = 17
    model.generation_config.calm_sampling_method = "approximate"
    model.save_pretrained(tmp_path)  # must not raise (transformers' own temperature is untouched)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["calm_temperature"] == 0.5 and saved["calm_num_candidates"] == 17
    assert "temperature" not in saved
    loaded = CalmForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.generation_config.calm_temperature == 0.5
    ids = torch.tensor(random_rows([8], seed=16))
    assert torch.equal(
        loaded.generate(ids, max_new_tokens=8, seed=3),
        model.generate(ids, max_new_tokens=8, seed=3, temperature=0.5, num_candidates=17),
    )
    assert not torch.equal(
        loaded.generate(ids, max_new_tokens=8, seed=3), model.generate(ids, max_new_tokens=8, seed=3, temperature=1.0)
    )
    config = GenerationConfig(calm_temperature=0.25, calm_num_candidates=9, max_new_tokens=4)
    assert torch.equal(
        model.generate(ids, generation_config=config, seed=3),
        model.generate(ids, max_new_tokens=4, seed=3, temperature=0.25, num_candidates=9),
    )


# ----------------------------------------------------------------------------------------------------------------
# Randomness, latents, temperature


def test_seed_and_generator_reproducibility(model):
    ids = torch.tensor(random_rows([5, 8], seed=17)[1:])
    first = model.generate(ids, max_new_tokens=12, seed=1)
    assert torch.equal(first, model.generate(ids, max_new_tokens=12, seed=1))
    assert not torch.equal(first, model.generate(ids, max_new_tokens=12, seed=2))
    a = model.generate(ids, max_new_tokens=12, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, model.generate(ids, max_new_tokens=12, generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(5)
    b = model.generate(ids, max_new_tokens=12)
    torch.manual_seed(5)
    assert torch.equal(b, model.generate(ids, max_new_tokens=12))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_returned_latents_decode_to_the_returned_tokens(model, temperature):
    ids, mask = left_pad(random_rows([6, 11], seed=18))
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, seed=6, temperature=temperature, num_candidates=32,
        return_dict_in_generate=True, output_latents=True, **NO_STOPS,
    )
    assert out.latents.shape == (2, 3, 8)
    decoded = model.autoencoder.decode_tokens(out.latents)  # [B, 3*K]
    assert torch.equal(decoded[:, :10], out.sequences[:, ids.shape[1] :])
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=10, seed=6, return_dict_in_generate=True)
    assert plain.latents is None


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0.5), dict(temperature=0.3, num_candidates=50), dict(temperature=0.5, sampling_method="exact")],
)
def test_low_temperature_methods_run_and_are_reproducible(settings):
    # A peaked model: chunks repeat among candidates, so temperature has an effect (and the exact method ends soon).
    model = make_model(peaked=True)
    ids = torch.tensor(random_rows([8, 8], seed=19))
    out = model.generate(ids, max_new_tokens=12, seed=7, **settings, **NO_STOPS)
    assert out.shape == (2, 20) and int(out.min()) >= 0 and int(out.max()) < 99
    assert torch.equal(out, model.generate(ids, max_new_tokens=12, seed=7, **settings, **NO_STOPS))
    assert ("exact" in model.calm_last_decoding) == (settings.get("sampling_method") == "exact")


def test_approximate_pick_follows_the_selection_probabilities():
    """With fixed candidates (the same head noise on every row), the picked candidate's frequency over many rows
    matches modeling_calm_sampling.selection_probabilities of those candidates."""
    model = make_model(peaked=True)
    rows, num = 3000, 12
    prompt = torch.tensor(random_rows([8], seed=20)).expand(rows, -1)
    noise = energy_noise(1, 1, num, seed=21).expand(1, rows, num, 8)
    out = model.generate(
        prompt, max_new_tokens=K, noise=noise, temperature=0.5, num_candidates=num, seed=8,
        return_dict_in_generate=True, output_latents=True, **NO_STOPS,
    )
    hidden = model(prompt[:1]).last_hidden_state[0, -1]
    candidate_latents = model.head.sample(hidden.expand(num, -1), noise=noise[0, 0])  # [N, Z]
    candidates = model.autoencoder.decode_tokens(candidate_latents[:, None])  # [N, K]
    probs = selection_probabilities(candidates[None], 0.5)[0]  # [N]
    chosen = out.sequences[:, 8:]
    # Every pick is one of the candidates, and its latent is that candidate's latent.
    match = (chosen[:, None] == candidates[None]).all(-1)  # [rows, N]
    assert match.any(1).all()
    distance = (out.latents[:, 0, None] - candidate_latents[None]).abs().amax(-1)  # [rows, N]
    assert distance.min(1).values.max() < 1e-5
    distinct = {tuple(c) for c in candidates.tolist()}
    assert 1 < len(distinct) < num  # repeats exist, so the levels of Algorithm 2 matter
    for chunk in distinct:
        is_chunk = (candidates == torch.tensor(chunk)).all(-1)
        expected = float(probs[is_chunk].sum())
        observed = float((chosen == torch.tensor(chunk)).all(-1).float().mean())
        # Binomial standard error at 3000 rows is at most 0.0092; 4.5 sigma.
        assert abs(observed - expected) < 0.042, (chunk, observed, expected)


# ----------------------------------------------------------------------------------------------------------------
# Compiled path


def test_compiled_step_matches_eager_and_failure_falls_back(model):
    ids, mask = left_pad(random_rows([6, 9], seed=22))
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=9, seed=3, temperature=0.5, num_candidates=8)
    # "backend:eager" traces the step with dynamo over the reused StaticCache without generating code (fast).
    for _ in range(2):
        compiled = model.generate(
            ids, attention_mask=mask, max_new_tokens=9, seed=3, temperature=0.5, num_candidates=8,
            calm_compile=True, calm_compile_mode="backend:eager",
        )
        assert model.calm_last_decoding.startswith("compiled") and torch.equal(compiled, eager)
    broken = make_model()
    fallback = broken.generate(
        ids, attention_mask=mask, max_new_tokens=9, seed=3, temperature=0.5, num_candidates=8,
        calm_compile=True, calm_compile_mode="backend:no-such-backend",
    )
    assert broken.calm_last_decoding == "eager (compile failed)" and torch.equal(fallback, eager)


# ----------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=1.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=0.5, num_candidates=0), "num_candidates"),
        (dict(sampling_method="greedy"), "sampling_method"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4 * 63), "max_position_embeddings"),
        (dict(num_beams=2), "num_beams"),
        (dict(noise=torch.zeros(1, 1, 8)), "noise"),
        (dict(temperature=0.5, sampling_method="exact", noise=torch.zeros(4, 1, 8)), "noise"),
        (dict(pixel_values=torch.zeros(1, 8)), "pixel_values"),
    ],
)
def test_bad_arguments_raise_value_errors(model, kwargs, message):
    kwargs.setdefault("max_new_tokens", 8)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor(random_rows([8], seed=23)), **kwargs)


def test_bad_prompts_raise_value_errors(model):
    with pytest.raises(ValueError, match="non-empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    assert model.generate(max_new_tokens=4, seed=0).shape == (1, 5)  # no prompt: start from one BOS
    ids = torch.tensor(random_rows([8], seed=25))
    by_inputs = model.generate(inputs=ids, max_new_tokens=4, seed=0)
    assert torch.equal(by_inputs, model.generate(ids, max_new_tokens=4, seed=0))
    ids = torch.tensor(random_rows([8, 8], seed=24))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.randint(3, 99, (1, 4 * 62)), max_new_tokens=12)  # 62 + 3 chunks > 64 positions
    no_bos = make_model(bos_token_id=None, backbone=dict(bos_token_id=None))
    with pytest.raises(ValueError, match="bos_token_id"):
        no_bos.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)


# ----------------------------------------------------------------------------------------------------------------
# Parity with the authors' decoding steps (the reference fixture, converted)


def test_golden_noise_reproduces_the_reference_steps():
    """The public generate, given the reference's per-step head noise, returns the reference's raw chunks.

    The reference right-padded its 6-token prompt with pad ids to 8 (a documented fault); feeding that same padded
    prompt as content isolates the decoding step. Stops are off: `gen_step_tokens` are the chunks before masking.
    """
    from pathlib import Path

    from safetensors.torch import load_file

    from conversion import calm_conversion

    fixture = Path(__file__).parent / "fixtures" / "reference_tiny"
    if not (fixture / "golden.safetensors").exists():
        pytest.skip("reference fixture not present")
    model, _ = calm_conversion.convert_calm(fixture / "calm", fixture / "ae")
    model.eval()
    golden = load_file(str(fixture / "golden.safetensors"))
    prompt = golden["gen_prompt"]  # [2, 6]
    padded = torch.cat([prompt, torch.full((2, -prompt.shape[1] % K), model.config.pad_token_id)], 1)  # [2, 8]
    steps = golden["gen_step_tokens"]  # [4, 2, K]
    noise = golden["gen_rand_stream"].view(steps.shape[0], 2, -1) - 0.5  # one [B, E] call per step
    out = model.generate(input_ids=padded, max_new_tokens=16, temperature=1.0, noise=noise, **NO_STOPS)
    assert torch.equal(out[:, 8:], steps.permute(1, 0, 2).reshape(2, -1))


def test_tokenizer_outputs_with_token_type_ids_are_accepted(model):
    # `generate(**tokenizer(text, return_tensors="pt"))` must work with tokenizers that return token_type_ids.
    ids, mask = left_pad(random_rows([6]))
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, seed=0)
    with_types = model.generate(
        input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), max_new_tokens=8, seed=0
    )
    assert torch.equal(plain, with_types)
    with pytest.raises(ValueError, match="does not use"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, not_an_argument=1)
