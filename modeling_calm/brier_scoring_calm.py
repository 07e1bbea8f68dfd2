"""BrierLM for CALM: two sampled continuations at every chunk boundary (CALM.md section 3).

Ships to the Hub beside the CALM modeling files (`CalmForCausalLM.score_brier` calls it), so it imports only
torch and the sibling `brier_calm`. The functions take the model as their first argument and use only its
public pieces: `forward`, `embed_chunks`, the backbone `model.model`, `head.sample` and `autoencoder.decode`.

Shape letters: B blocks, T tokens per block, K tokens per chunk (`patch_size`), L = T / K chunks, S = 2 samples
per position, R = ceil(max_n / K) head steps per sample, D backbone width, Z latent size, E noise size of the
head (the energy head's uniform noise; Z for the flow head, whose noise is its start point x0), V vocabulary.

What is scored
--------------
A CALM is scored at chunk boundaries: entry i (i = 0..L-1) conditions on chunks 0..i, i.e. on tokens
0..(i+1)K-1, and its targets are the next max_n tokens (i+1)K .. (i+1)K+max_n-1. Two samples are drawn
independently from the generative head on h_i, and each is decoded by the frozen autoencoder (argmax) into K
tokens. When K < max_n, each sample is continued on its own: its decoded chunk is fed back as the next input
chunk and the head samples again, for R = ceil(max_n / K) steps in all, giving R*K >= max_n tokens of which the
first max_n are compared with the targets by `brier_calm.brier_indicators`.

Entry i counts iff all its max_n targets lie inside the block ((i+1)K + max_n <= T) and none has label -100.
A full block thus counts floor((T - max_n) / K) entries: 255 for T = 1024, K = 4, max_n = 4, against
T - max_n = 1020 positions for a token-level LM, which is scored after every token. Both are unbiased
estimates of a mean Brier score over positions of the same text, but over different sets of positions (every
token versus every K-th token); report `num_positions` beside the scores.

Randomness: the head noise of every (block, boundary, sample, step) is drawn up front, in that order, as one
tensor [B, L, S, R, E] from `generator` on the generator's own device (the CPU for a default
`torch.Generator()`) and then moved to the model's device, so a seed gives the same draws on any device. The
autoencoder decodes by argmax and adds no randomness. The two samples of a position always get different noise
(they are independent draws); the fast path and the reference consume the same tensor, so they agree exactly
up to float rounding of near-ties.

Fast path (`sample_brier_continuations`): one forward over the whole block with a KV cache; the R - 1
continuation steps then append, per block, one row per (boundary i, sample s), row r = 2 i + s, at chunk
position i + step. A custom 4-D additive attention mask lets row r see prefix chunks 0..i and its own earlier
continuation chunks only, so all boundaries and both samples advance together in R - 1 cached forwards. It needs
an attention implementation that accepts a 4-D float mask ("eager" or "sdpa") and a cache that keeps every
entry (no sliding-window eviction); otherwise use the reference. The reference
(`sample_brier_continuations_ref`) loops over blocks, boundaries, samples and steps with plain cache-free
forwards over the context plus the sample's own continuation.
"""

from __future__ import annotations

import math

import torch

from .modeling_calm_compat import output_cache
from .brier_calm import BRIER_LM_MAX_N, _check_max_n, brier_indicators


# The estimator of eq. 2 (brier_calm) needs exactly two independent samples per position.
NUM_BRIER_SAMPLES = 2
# transformers' convention for "not a target".
IGNORE_INDEX = -100
# Token id written into sample slots that are never scored (boundaries too close to the block end).
PAD_SAMPLE = -1
# Attention implementations that take an arbitrary 4-D additive float mask.
_MASKABLE_ATTENTION = ("eager", "sdpa")
# Most logits entries (rows * K * V) decoded at once: the argmax decode of every sample through a 128k
# vocabulary would otherwise hold B * L * 2 * K * V logits (gigabytes) at once.
_DECODE_MAX_ELEMENTS = 2**26


def brier_num_steps(patch_size: int, max_n: int = BRIER_LM_MAX_N) -> int:
    """R = ceil(max_n / K): head steps per sample to produce at least max_n tokens."""
    return math.ceil(max_n / patch_size)


def brier_num_positions(num_tokens: int, patch_size: int, max_n: int = BRIER_LM_MAX_N) -> int:
    """Chunk boundaries of a block of `num_tokens` tokens whose max_n targets lie inside it: i with
    (i + 1) K + max_n <= T, i.e. floor((T - max_n) / K) (0 for blocks too short)."""
    return max(num_tokens - max_n, 0) // patch_size


def _check_inputs(model, input_ids: torch.Tensor, labels: torch.Tensor | None, max_n: int) -> int:
    _check_max_n(max_n)
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
    return k


def draw_brier_noise(
    model, batch: int, num_chunks: int, max_n: int = BRIER_LM_MAX_N, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Head noise of every (block, boundary, sample, step), drawn in that order on the generator's device.

    Returns:
        `torch.FloatTensor` of shape `[B, L, 2, R, E]` (E = `noise_size` for the energy head, uniform in
        [-0.5, 0.5); Z for the flow head, standard normal), on the generator's device (the CPU by default).
    """
    head = model.head
    shape = (batch, num_chunks, NUM_BRIER_SAMPLES, brier_num_steps(model.config.patch_size, max_n))
    device = generator.device if generator is not None else torch.device("cpu")
    draw = getattr(head, "draw_noise", None)
    if callable(draw):
        return draw(shape, device, generator)
    latent_size = getattr(head, "latent_size", None)
    if latent_size is None:
        raise ValueError(
            f"Cannot draw noise for head {type(head).__name__}: it has neither draw_noise nor latent_size."
        )
    # Flow head: the noise is the start point x0 ~ N(0, I) of its sampler.
    return torch.randn((*shape, latent_size), device=device, generator=generator)


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


def _sample_chunks(model, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Head sample on each hidden state, decoded to K tokens by argmax: `[..., D]`, `[..., E]` -> `[..., K]`."""
    latents = model.head.sample(hidden, noise=noise.to(hidden.device))  # [..., Z]
    lead = latents.shape[:-1]
    flat = latents.reshape(-1, latents.shape[-1])  # [N, Z]
    k, vocab = model.config.patch_size, model.config.vocab_size
    rows = max(1, _DECODE_MAX_ELEMENTS // (k * vocab))
    # decode reads [N, Z] as N chunks of one sequence: logits [N*K, V] -> argmax [N*K]
    tokens = torch.cat([model.autoencoder.decode(part).argmax(-1) for part in flat.split(rows)])
    return tokens.view(*lead, k)


def _check_attention(model) -> None:
    impl = getattr(model.model.config, "_attn_implementation", None)
    if impl is not None and impl not in _MASKABLE_ATTENTION:
        raise ValueError(
            f"The fast CALM Brier sampler continues samples (K={model.config.patch_size} < max_n) under a custom "
            f"4-D attention mask, which needs attention implementation {' or '.join(_MASKABLE_ATTENTION)}; got "
            f"{impl!r}. Call model.set_attn_implementation('sdpa') first, or use "
            f"score_brier_ref."
        )


@torch.no_grad()
def sample_brier_continuations(
    model,
    input_ids: torch.Tensor,
    max_n: int = BRIER_LM_MAX_N,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Two independent continuations of at least max_n tokens at every chunk boundary (fast, batched path).

    Args:
        model: a `CalmForCausalLM`.
        input_ids (`torch.LongTensor` of shape `[B, T]`): the blocks, T a multiple of K.
        max_n (`int`, *optional*, defaults to 4): tokens needed per continuation.
        noise (`torch.FloatTensor` of shape `[B, L, 2, R, E]`, *optional*): head noise (see `draw_brier_noise`);
            drawn from `generator` when None.
        generator (`torch.Generator`, *optional*): source of `noise`.

    Returns:
        `torch.LongTensor` of shape `[B, L, 2, R*K]`: `samples[b, i, s]` continues tokens 0..(i+1)K-1 of block
        b. Boundaries whose max_n targets run past the block end hold -1 (they are never sampled).
    """
    k = _check_inputs(model, input_ids, None, max_n)
    noise = _prepare_noise(model, input_ids, max_n, noise, generator)
    batch, length = input_ids.shape
    num_chunks, steps = length // k, brier_num_steps(k, max_n)
    positions = brier_num_positions(length, k, max_n)  # P boundaries with room for max_n targets
    device = input_ids.device
    samples = torch.full((batch, num_chunks, NUM_BRIER_SAMPLES, steps * k), PAD_SAMPLE, dtype=torch.long, device=device)
    if positions == 0:
        return samples
    if steps > 1:
        _check_attention(model)

    out = model(input_ids=input_ids, use_cache=steps > 1)
    hidden = out.last_hidden_state[:, :positions]  # [B, P, D]: h_i after chunks 0..i
    hidden = hidden[:, :, None].expand(-1, -1, NUM_BRIER_SAMPLES, -1)  # [B, P, 2, D]
    tokens = _sample_chunks(model, hidden, noise[:, :positions, :, 0])  # [B, P, 2, K]
    samples[:, :positions, :, :k] = tokens
    if steps == 1:
        return samples
    cache = output_cache(out)
    if cache is None:
        raise ValueError("The backbone returned no KV cache; the fast CALM Brier sampler needs a KV cache.")

    rows = NUM_BRIER_SAMPLES * positions  # continuation rows per block, row r = 2 i + s
    dtype = out.last_hidden_state.dtype
    # Prefix visibility [2P, L]: row (i, s) sees chunks 0..i of the block (already in the cache).
    causal = torch.arange(num_chunks, device=device)[None, :] <= torch.arange(positions, device=device)[:, None]
    prefix = causal.repeat_interleave(NUM_BRIER_SAMPLES, dim=0)
    # Each appended group of 2P chunks is visible only to its own row: an identity [2P, 2P] per step.
    own = torch.eye(rows, dtype=torch.bool, device=device)
    row_positions = torch.arange(positions, device=device).repeat_interleave(NUM_BRIER_SAMPLES)  # [2P]: i per row
    for step in range(1, steps):
        # Keys: L prefix chunks, then `step` appended groups (the last is this step's input).
        visible = torch.cat([prefix] + [own] * step, dim=-1)  # [2P, L + 2P * step]
        additive = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
        embeds = model.embed_chunks(tokens.reshape(batch, rows * k))  # previous chunk of each row -> [B, 2P, D]
        out = model.model(
            inputs_embeds=embeds,
            attention_mask=additive[None, None].expand(batch, 1, -1, -1),  # [B, 1, 2P, L + 2P * step]
            position_ids=(row_positions + step)[None].expand(batch, -1),  # continuation chunk of row (i, s) at i + step
            use_cache=True,
            **{model._cache_kwarg: cache},
        )
        cache = output_cache(out)
        hidden = out.last_hidden_state.view(batch, positions, NUM_BRIER_SAMPLES, -1)  # [B, P, 2, D]
        tokens = _sample_chunks(model, hidden, noise[:, :positions, :, step])  # [B, P, 2, K]
        samples[:, :positions, :, step * k : (step + 1) * k] = tokens
    return samples


@torch.no_grad()
def sample_brier_continuations_ref(
    model,
    input_ids: torch.Tensor,
    max_n: int = BRIER_LM_MAX_N,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Slow, obviously correct reference for `sample_brier_continuations` (same arguments, same output).

    For every block, boundary and sample, the context grows one decoded chunk at a time and each step is a plain
    cache-free forward over the context; the head samples on the last hidden state with the same noise entry as
    the fast path. Cost: B * P * 2 * R forwards.
    """
    k = _check_inputs(model, input_ids, None, max_n)
    noise = _prepare_noise(model, input_ids, max_n, noise, generator)
    batch, length = input_ids.shape
    steps = brier_num_steps(k, max_n)
    samples = torch.full((batch, length // k, NUM_BRIER_SAMPLES, steps * k), PAD_SAMPLE, dtype=torch.long)
    for b in range(batch):
        for i in range(brier_num_positions(length, k, max_n)):
            for s in range(NUM_BRIER_SAMPLES):
                context = input_ids[b, : (i + 1) * k]  # chunks 0..i
                for step in range(steps):
                    hidden = model(input_ids=context[None]).last_hidden_state[0, -1]  # [D]
                    latent = model.head.sample(hidden, noise=noise[b, i, s, step])  # [Z]
                    chunk = model.autoencoder.decode(latent[None]).argmax(-1)  # [K]
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
    y = (input_ids if labels is None else labels).long()
    batch, length = y.shape
    num_chunks = length // patch_size
    # Past the block end every target is "not a target": pad with -100 so the gather below stays in range.
    padded = torch.cat([y, y.new_full((batch, max_n), IGNORE_INDEX)], dim=1)  # [B, T + max_n]
    starts = (torch.arange(num_chunks, device=y.device) + 1) * patch_size  # first target of boundary i
    index = starts[:, None] + torch.arange(max_n, device=y.device)[None, :]  # [L, max_n], all < T + max_n
    targets = padded[:, index]  # [B, L, max_n]
    return targets, (targets != IGNORE_INDEX).all(dim=-1)


def score_calm_brier(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    max_n: int = BRIER_LM_MAX_N,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reference: bool = False,
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

    Returns:
        `(brier, mask)`: float32 [B, L, max_n] per-boundary estimates (0 where masked) and bool [B, L], True at
        the boundaries that count (all max_n targets inside the block and not -100).
    """
    k = _check_inputs(model, input_ids, labels, max_n)
    sampler = sample_brier_continuations_ref if reference else sample_brier_continuations
    samples = sampler(model, input_ids, max_n=max_n, noise=noise, generator=generator)  # [B, L, 2, R*K]
    targets, valid = brier_targets(input_ids, labels, k, max_n)
    targets, valid = targets.to(samples.device), valid.to(samples.device)
    brier = brier_indicators(samples[:, :, 0, :max_n], samples[:, :, 1, :max_n], targets, max_n=max_n, mask=valid)
    return brier, valid
