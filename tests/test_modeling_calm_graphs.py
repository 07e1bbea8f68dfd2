"""CUDA-graph decoding (modeling_calm_graphs): block sizes, the block loop against eager decoding (on the CPU the
blocks run unrecorded), a decoding step free of host reads (what recording needs; checked on the meta device, in
every CI venv's transformers), the caches that can be recorded, graph bookkeeping, and on CUDA the recorded graphs
against eager decoding."""

import threading

import pytest
import torch
from transformers import GenerationConfig
from transformers.cache_utils import StaticCache
from transformers.generation.streamers import BaseStreamer

from modeling_calm import CalmForCausalLM
from modeling_calm.modeling_calm_generation_settings import CALM_GENERATION_DEFAULTS
from modeling_calm.modeling_calm_graphs import GRAPH_MODES, MAX_GRAPHS, block_sizes, graph_capable_cache
from tests.utils import EOS, NO_STOPS, left_pad, make_model, random_rows, single_thread, tiny_calm_config  # noqa: F401

K = 4
BLOCKS = dict(calm_compile=True, calm_compile_mode="cudagraph")
EAGER = dict(calm_compile=False)


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_block_sizes_cover_the_steps_with_powers_of_two_largest_first():
    assert block_sizes(37, 16) == [16, 16, 4, 1]
    assert block_sizes(16, 16) == [16] and block_sizes(15, 16) == [8, 4, 2, 1] and block_sizes(0, 16) == []
    for steps in range(70):
        sizes = block_sizes(steps, 16)
        assert sum(sizes) == steps and sizes == sorted(sizes, reverse=True)
        # No block crosses a multiple of 16 (the head-noise blocks).
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        assert all(start // 16 == (start + size - 1) // 16 for start, size in zip(starts, sizes))
    for bad in [(-1, 16), (5, 12), (5, 0)]:
        with pytest.raises(ValueError, match="power of two"):
            block_sizes(*bad)


def test_default_mode_is_cudagraph():
    assert CALM_GENERATION_DEFAULTS["calm_compile_mode"] == "cudagraph" and "cudagraph" in GRAPH_MODES


# ----------------------------------------------------------------------------------------------------------------
# The block loop (unrecorded on the CPU) against eager decoding


@pytest.mark.parametrize("temperature, candidates", [(1.0, None), (0.5, 7), (0.3, 5)])
@pytest.mark.parametrize("new_tokens", [4, 9 * K, 37 * K + 2])
def test_blocks_equal_eager_decoding(model, temperature, candidates, new_tokens):
    """Same seed, same tokens and latents: block sizes 1 to 16 (37 steps = 16 + 16 + 4 + 1), left padding."""
    ids, mask = left_pad(random_rows([5, 11, 8], seed=4))
    kwargs = dict(
        attention_mask=mask, max_new_tokens=new_tokens, temperature=temperature, num_candidates=candidates, seed=7,
        return_dict_in_generate=True, output_latents=True, **NO_STOPS,
    )
    eager = model.generate(ids, **kwargs, **EAGER)
    blocks = model.generate(ids, **kwargs, **BLOCKS)
    assert model.calm_last_decoding == "blocks (cudagraph, not recorded: no CUDA)"
    assert torch.equal(blocks.sequences, eager.sequences)
    assert torch.equal(blocks.latents, eager.latents)


def test_blocks_keep_stop_tokens_streaming_and_criteria_of_eager_decoding():
    """Rows that stop inside a block: the tokens after the stop are padding as eagerly, the call ends at the same
    step, and a streamer receives the same chunks."""
    model = make_model(peaked=True)
    ids, mask = left_pad(random_rows([6, 9], seed=5))
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=40 * K, seed=3, **EAGER)
    # Pick as stop token one the eager run generates mid-way, so rows stop inside blocks.
    stop = int(eager[0, ids.shape[1] + 9 * K + 1])
    for kwargs in (dict(eos_token_id=stop), dict(eos_token_id=[stop, EOS], stop_on_bos=False)):
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=40 * K, seed=3, **kwargs, **EAGER)
        blocks = model.generate(ids, attention_mask=mask, max_new_tokens=40 * K, seed=3, **kwargs, **BLOCKS)
        assert torch.equal(blocks, reference)
        assert (reference[0, ids.shape[1] :] == stop).any()

    def after_seven_chunks(input_ids, scores):  # a stopping criterion firing inside the first block
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 7 * K, dtype=torch.bool)

    kwargs = dict(attention_mask=mask, max_new_tokens=40 * K, seed=3, stopping_criteria=[after_seven_chunks],
                  **NO_STOPS)
    reference = model.generate(ids, **kwargs, **EAGER)
    assert torch.equal(model.generate(ids, **kwargs, **BLOCKS), reference)
    assert reference.shape[1] == ids.shape[1] + 7 * K

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    streams = []
    for extra in (EAGER, BLOCKS):
        streamer = Collect()
        model.generate(ids[:1], max_new_tokens=20 * K, seed=3, eos_token_id=stop, streamer=streamer, **extra)
        streams.append(streamer.chunks)
    assert streams[0] == streams[1] and len(streams[0]) > 3


def test_blocks_keep_the_models_graphs_for_their_cache_and_drop_them_with_it(model):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model.generate(ids, max_new_tokens=37 * K, seed=0, **NO_STOPS, **BLOCKS)
    state = model._calm_state
    sizes = {key[1] for key in state.graphs}
    assert sizes == {16, 4, 1} and state.graphs_cache is state.static_cache
    kept = dict(state.graphs)
    model.generate(ids, max_new_tokens=37 * K, seed=1, **NO_STOPS, **BLOCKS)  # same shapes: the same blocks
    assert all(state.graphs[key] is block for key, block in kept.items())
    model.generate(torch.cat([ids, ids]), max_new_tokens=8, seed=0, **NO_STOPS, **BLOCKS)  # new batch: new cache
    assert state.graphs_cache is state.static_cache and not set(kept) & set(state.graphs) - {None}
    assert all(block.cache is state.static_cache for block in state.graphs.values())
    assert len(state.graphs) <= MAX_GRAPHS


def test_blocks_from_several_threads_equal_serial_calls():
    model = make_model()
    rows = random_rows([7, 12, 9, 5], seed=9)
    serial = [model.generate(torch.tensor([row]), max_new_tokens=6 * K, seed=i, temperature=0.5, num_candidates=6,
                             **BLOCKS) for i, row in enumerate(rows)]
    results, errors = [None] * len(rows), []

    def work(i):
        try:
            results[i] = model.generate(torch.tensor([rows[i]]), max_new_tokens=6 * K, seed=i, temperature=0.5,
                                        num_candidates=6, **BLOCKS)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(torch.equal(a, b) for a, b in zip(results, serial))


def test_blocks_follow_a_generation_config_mode():
    model = make_model()
    config = GenerationConfig(calm_compile=True, calm_compile_mode="cudagraph", max_new_tokens=8)
    model.generate(torch.tensor([[5, 6, 7, 8]]), generation_config=config, seed=0)
    assert model.calm_last_decoding.startswith("blocks (cudagraph")


# ----------------------------------------------------------------------------------------------------------------
# What recording needs: a step with no host reads, over a cache with no host counters


def _meta_step(config, approximate: bool, padded: bool):
    """One prefill and one decoding step with every tensor on the meta device, where reading a value on the host
    (`.item()`, `bool()`, `.tolist()`, data-dependent shapes) raises: a step that passes never syncs, so it can be
    recorded in a CUDA graph. (The prefill runs eagerly, outside the graphs; here it only fills the cache.)"""
    with torch.device("meta"):
        model = CalmForCausalLM(config).eval()
    batch, chunks, length, n = 2, 2, 16, 5
    device = torch.device("meta")
    cache = StaticCache(config=model.model.config, max_cache_len=length)
    mask = torch.ones(batch, length, dtype=torch.long, device=device) if padded else None
    with torch.no_grad():
        out = model.model(
            inputs_embeds=model.embed_chunks(torch.zeros(batch, chunks * K, dtype=torch.long, device=device)),
            position_ids=torch.arange(chunks, device=device)[None].expand(batch, -1),
            use_cache=True, **{model._cache_kwarg: cache},
        )
        hidden = out.last_hidden_state[:, -1]
        shape = (batch, n) if approximate else (batch,)
        noise = model.head.draw_noise(shape, device=device)
        uniforms = torch.zeros(batch, device=device) if approximate else None
        position = torch.full((batch, 1), chunks, dtype=torch.long, device=device)
        tokens, latents, hidden = type(model)._calm_step(
            model, cache, hidden, noise, uniforms, position, mask, 0.4 if approximate else 1.0
        )
    assert tokens.shape == (batch, K) and latents.shape == (batch, config.latent_size) and hidden.shape[0] == batch
    return cache


@pytest.mark.parametrize("head_type", ["energy", "flow", "diffusion"])
@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_the_decoding_step_reads_nothing_back_to_the_host(head_type, approximate, padded):
    cache = _meta_step(tiny_calm_config(head_type=head_type), approximate, padded)
    assert graph_capable_cache(cache)


def test_host_reads_are_detected_on_the_meta_device():
    """The check above would catch a sync: the same step with a host read added fails there."""
    config = tiny_calm_config()

    class Syncing(CalmForCausalLM):
        def _calm_step(self, cache, hidden, noise, uniforms, position_ids, attention_mask, temperature):
            if bool((hidden > 0).any()):
                pass
            return super()._calm_step(cache, hidden, noise, uniforms, position_ids, attention_mask, temperature)

    original = CalmForCausalLM._calm_step
    CalmForCausalLM._calm_step = Syncing._calm_step
    try:
        with pytest.raises((RuntimeError, NotImplementedError)):
            _meta_step(config, approximate=False, padded=False)
    finally:
        CalmForCausalLM._calm_step = original


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_backbones_step_without_host_reads(family):
    _meta_step(tiny_calm_config(backbone=dict(model_type=family, sliding_window=None)), True, True)


def test_a_sliding_window_cache_is_decoded_by_torch_compile_instead():
    config = tiny_calm_config(backbone=dict(model_type="mistral", sliding_window=8))
    model = CalmForCausalLM(config).eval()
    cache = StaticCache(config=model.model.config, max_cache_len=32)
    assert all(layer.is_sliding for layer in cache.layers) and not graph_capable_cache(cache)
    ids = torch.tensor([[5, 6, 7, 8]])
    eager = model.generate(ids, max_new_tokens=12, seed=0, **NO_STOPS, **EAGER)
    out = model.generate(ids, max_new_tokens=12, seed=0, **NO_STOPS, **BLOCKS)
    assert model.calm_last_decoding == "compiled (reduce-overhead, static cache; sliding-window cache)"
    assert torch.equal(out, eager)


# ----------------------------------------------------------------------------------------------------------------
# Recorded graphs (CUDA only; run on the GPU machine)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize("mode", sorted(GRAPH_MODES))
@pytest.mark.parametrize("temperature, candidates", [(1.0, None), (0.5, 7)])
def test_recorded_graphs_equal_eager_decoding_on_cuda(mode, temperature, candidates):
    model = make_model().cuda()
    ids, mask = left_pad(random_rows([5, 11, 8], seed=4))
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=37 * K, temperature=temperature, num_candidates=candidates,
                  seed=7, return_dict_in_generate=True, output_latents=True, **NO_STOPS)
    eager = model.generate(ids, **kwargs, **EAGER)
    for _ in range(3):  # warm-up blocks, then recorded ones, then replays of kept graphs
        graphs = model.generate(ids, **kwargs, calm_compile=True, calm_compile_mode=mode)
        assert model.calm_last_decoding == f"cuda graphs ({mode}, static cache)"
        assert torch.equal(graphs.sequences, eager.sequences)
        if mode == "cudagraph":  # the eager kernels, replayed: bit for bit
            torch.testing.assert_close(graphs.latents, eager.latents, atol=0, rtol=0)
        else:  # inductor's fused kernels round differently
            torch.testing.assert_close(graphs.latents, eager.latents, atol=1e-4, rtol=1e-4)
    assert all(block.graph is not None for block in model._calm_state.graphs.values())


@cuda
def test_decode_tokens_on_cuda_with_an_unaligned_vocabulary_equals_the_full_argmax():
    model = make_model().cuda()  # vocabulary 99: projected as rows [:64] and [64:]
    latents = torch.randn(500, 1, model.config.latent_size, device="cuda")
    full = model.autoencoder.decode(latents).argmax(-1)
    assert torch.equal(model.autoencoder.decode_tokens(latents), full)


def test_a_failing_block_run_falls_back_to_eager_from_the_same_random_state(monkeypatch):
    from modeling_calm.modeling_calm_graphs import CalmBlockRunner

    model = make_model()
    ids, mask = left_pad(random_rows([6, 9], seed=8))
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=20, seed=5, temperature=0.5, num_candidates=6,
                           **EAGER)

    def broken(self, *args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(CalmBlockRunner, "run", broken)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, seed=5, temperature=0.5, num_candidates=6,
                         **BLOCKS)
    assert model.calm_last_decoding == "eager (compile failed)" and torch.equal(out, eager)
    assert model._calm_state.compile_failed and model._calm_state.static_cache is None


def test_kept_graphs_are_dropped_when_the_weights_move():
    """A graph reads the weights at their recorded addresses: after `model.to(...)` round trips (new storage) or a
    new adapter, the kept blocks are rebuilt, and the tokens still equal eager decoding."""
    model = make_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model.generate(ids, max_new_tokens=5 * K, seed=0, **NO_STOPS, **BLOCKS)
    state = model._calm_state
    kept = dict(state.graphs)
    model.generate(ids, max_new_tokens=5 * K, seed=0, **NO_STOPS, **BLOCKS)
    assert all(state.graphs[key] is block for key, block in kept.items())  # same weights: kept
    model.to(torch.float64).to(torch.float32)  # same dtype and device, new storage
    out = model.generate(ids, max_new_tokens=5 * K, seed=0, **NO_STOPS, **BLOCKS)
    assert not any(state.graphs.get(key) is block for key, block in kept.items())
    assert torch.equal(out, model.generate(ids, max_new_tokens=5 * K, seed=0, **NO_STOPS, **EAGER))


@pytest.mark.parametrize("mode", ["cudagraphs", "reduce_overhead", "", "backend:", 3, None])
def test_an_unknown_compile_mode_is_a_value_error_naming_the_choices(model, mode):
    with pytest.raises(ValueError, match="calm_compile_mode must be one of 'cudagraph', 'cudagraph\\+inductor'"):
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, seed=0, calm_compile=True,
                       calm_compile_mode=mode)
