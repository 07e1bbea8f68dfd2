"""CUDA-graph decoding for CALM: blocks of decoding steps recorded once with `torch.cuda.CUDAGraph` and replayed
(arXiv 2510.27688, section "Next-Vector Prediction": one backbone step per chunk of K tokens).

A CALM decoding step (`CalmGenerationMixin._calm_step`: head sample, decode, compress, one backbone position over a
`StaticCache`) reads no value back to the host and, at a fixed batch size, cache length, temperature and number of
candidates, has fixed shapes and addresses. So S consecutive steps can be recorded as one graph over static input
and output buffers and replayed: no compiler runs (a new shape costs one eager run of the block, which is also a
real block of the call, plus the recording: about a second for a CALM-M), and a replay issues all the kernels of
S steps with no host work in between.

Modes (`generate(calm_compile_mode=...)`):
- `"cudagraph"` (the default on CUDA): the eager kernels of the step, recorded.
- `"cudagraph+inductor"`: the step compiled by inductor (`torch.compile`, no CUDA graphs of its own), recorded the
  same way: fused kernels, hence a faster steady state, at the price of one compilation per shape.

A call of G steps runs blocks of `NOISE_BLOCK_STEPS` steps, then the powers of two that make up the rest (G = 37:
16, 16, 4, 1), so no step is decoded in vain unless every row stops inside a block. Block boundaries coincide with
those of the head-noise blocks, so every step sees the random numbers it sees eagerly, and the tokens equal those of
eager decoding with the same seed.

Graphs are kept per model (in `CalmDecodingState.graphs`) for the static cache and the weight addresses they were
recorded with, share one memory pool, and are dropped when either changes. Recording needs plain static cache
layers: a backbone whose cache keeps host-side counters (sliding-window layers) is decoded by `torch.compile`
instead.
"""

from __future__ import annotations

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["GRAPH_MODES", "CalmBlockRunner", "block_sizes", "check_compile_mode", "graph_capable_cache"]

# Mode -> the torch.compile mode of the step inside the graphs (None: the eager step).
GRAPH_MODES = {"cudagraph": None, "cudagraph+inductor": "default"}
# Graphs a model keeps at most (each a batch size, cache length, temperature, N, block size and mask layout); beyond
# it the oldest is dropped.
MAX_GRAPHS = 48


# torch.compile's own modes (`torch.compile(mode=...)`), besides "backend:NAME" and the graph modes above.
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode) -> None:
    """`calm_compile_mode` must be a graph mode, a torch.compile mode or "backend:NAME" (a typo would otherwise only
    show as a failed compile and a silent switch to eager decoding)."""
    known = (*GRAPH_MODES, *TORCH_COMPILE_MODES)
    if isinstance(mode, str) and (mode in known or (mode.startswith("backend:") and len(mode) > len("backend:"))):
        return
    raise ValueError(
        f"calm_compile_mode must be one of {', '.join(map(repr, known))} or 'backend:NAME' (a torch.compile "
        f"backend), got {mode!r}."
    )


def block_sizes(steps: int, largest: int) -> list[int]:
    """Block sizes for `steps` decoding steps: `largest` (a power of two) as often as it fits, then the binary digits
    of the rest, largest first (`block_sizes(37, 16) == [16, 16, 4, 1]`)."""
    if steps < 0 or largest < 1 or largest & (largest - 1):
        raise ValueError(f"block_sizes needs steps >= 0 and a power of two largest, got {steps}, {largest}")
    sizes = [largest] * (steps // largest)
    rest, size = steps % largest, largest // 2
    while rest:
        if rest >= size:
            sizes.append(size)
            rest -= size
        size //= 2
    return sizes


def graph_capable_cache(cache) -> bool:
    """Whether a static cache can be recorded: every layer a plain (non-sliding) static layer, whose fill level is a
    device tensor. Sliding-window layers keep a Python counter that a graph would freeze."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(
        not getattr(layer, "is_sliding", False) and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
        for layer in layers
    )


def weight_addresses(model) -> tuple:
    """Where every parameter and buffer of `model` lives (`data_ptr`, in module order): a recorded graph is valid
    only while this is unchanged."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


class _CalmBlock:
    """S decoding steps over static buffers: run eagerly once (warm-up, a real block), then recorded and replayed."""

    def __init__(self, model, cache, step_fn, size, hidden, noise, uniforms, mask, temperature):
        batch = hidden.shape[0]
        device = hidden.device
        self.model, self.cache, self.step_fn, self.size, self.temperature = model, cache, step_fn, size, temperature
        self.hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        self.noise = torch.empty((size, *noise.shape[1:]), dtype=noise.dtype, device=device)
        self.uniforms = None if uniforms is None else torch.empty((size, batch), dtype=uniforms.dtype, device=device)
        self.mask = None if mask is None else torch.empty_like(mask)
        self.position = torch.empty((batch, 1), dtype=torch.long, device=device)
        self.tokens = torch.empty((size, batch, model.config.patch_size), dtype=torch.long, device=device)
        self.latents = None  # allocated by the warm-up, in the dtype the head returns
        self.graph = None

    def body(self) -> None:
        hidden = self.hidden
        for j in range(self.size):
            uniforms = None if self.uniforms is None else self.uniforms[j]
            tokens, latents, hidden = self.step_fn(
                self.model, self.cache, hidden, self.noise[j], uniforms, self.position + j, self.mask, self.temperature
            )
            if self.latents is None:
                self.latents = torch.empty((self.size, *latents.shape), dtype=latents.dtype, device=latents.device)
            self.tokens[j].copy_(tokens)
            self.latents[j].copy_(latents)
        self.hidden.copy_(hidden)


class CalmBlockRunner:
    """Runs one `generate` call's decoding steps in blocks, replaying the graphs kept in `state.graphs`.

    `capture=False` runs the same blocks without recording (on a CPU, where there are no CUDA graphs): the block
    logic, tested against eager decoding there.
    """

    def __init__(self, model, state, cache, step_fn, mode: str, temperature: float, capture: bool):
        self.model, self.state, self.cache, self.step_fn = model, state, cache, step_fn
        self.mode, self.temperature, self.capture = mode, temperature, capture
        # Graphs read the weights and the cache at the addresses they were recorded with: after the weights moved
        # (`model.cpu().cuda()`, adapters added or merged) or over another cache, they are stale.
        weights = weight_addresses(model)
        if state.graphs_cache is not cache or state.graphs_weights != weights:
            state.graphs.clear()
            state.graphs_cache, state.graphs_weights = cache, weights

    def run(self, hidden, noise, uniforms, position, mask):
        """Decode `noise.shape[0]` steps from `hidden [B, D]` (`position [B, 1]`: the first step's positions).

        Returns (tokens `[S, B, K]`, latents `[S, B, Z]`, next hidden `[B, D]`): views of the block's buffers,
        valid until the next block of the same size runs.
        """
        size = noise.shape[0]
        key = (
            self.mode, size, tuple(noise.shape[1:]), noise.dtype, uniforms is not None, self.temperature,
            None if mask is None else tuple(mask.shape),
        )
        graphs = self.state.graphs
        block = graphs.get(key)
        if block is None:
            if len(graphs) >= MAX_GRAPHS:
                graphs.pop(next(iter(graphs)))
            block = graphs[key] = _CalmBlock(
                self.model, self.cache, self.step_fn, size, hidden, noise, uniforms, mask, self.temperature
            )
        if hidden is not block.hidden:
            block.hidden.copy_(hidden)
        block.noise.copy_(noise)
        if uniforms is not None:
            block.uniforms.copy_(uniforms)
        if mask is not None:
            block.mask.copy_(mask)
        block.position.copy_(position)
        if block.graph is not None:
            block.graph.replay()
        elif block.latents is None or not self.capture:
            self._eager(block)
        else:
            self._record(block)
            block.graph.replay()
        return block.tokens, block.latents, block.hidden

    def _stream(self):
        if self.state.graph_stream is None:
            self.state.graph_stream = torch.cuda.Stream(device=self.model.device)
        return self.state.graph_stream

    def _eager(self, block: _CalmBlock) -> None:
        if not self.capture:
            block.body()
            return
        # The warm-up runs on the stream the recording will use (so the libraries' per-stream state exists).
        stream, current = self._stream(), torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            block.body()
        current.wait_stream(stream)

    def _record(self, block: _CalmBlock) -> None:
        if self.state.graph_pool is None:
            self.state.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work during the recording neither fails nor joins it.
        with torch.cuda.graph(
            graph, pool=self.state.graph_pool, stream=self._stream(), capture_error_mode="thread_local"
        ):
            block.body()
        block.graph = graph
        logger.info(f"CALM recorded a CUDA graph of {block.size} decoding steps ({self.mode}).")
