"""Generation for CALM: one chunk of K tokens per step, likelihood-free temperature (CALM.md sections 2 and 4).

Shapes: B batch, T prompt tokens, K tokens per chunk, P prompt chunks (after layout), S decoding steps
(= ceil(max_new_tokens / K)), D backbone hidden size, Z latent size, E head noise size (energy head; the flow
head's noise is its start point x0, of size Z), N candidates per row (approximate temperature sampling),
V vocabulary, H autoencoder hidden size.

One decoding step (`_calm_decode_step`): the generative head samples a latent from the last hidden state, the
frozen autoencoder decodes it into K tokens (argmax), the K tokens are compressed into one chunk embedding and the
backbone advances one position with the KV cache. At T < 1 the head samples N latents per row in one call, all N
are decoded, and one is picked with the generalised Algorithm 2 of `sampling_calm` (approximate method), or the
head is called repeatedly by Algorithm 1 (exact method, eager only).

Prompt layout (the first partial chunk). The model reads whole chunks, so every row is aligned on the RIGHT: its
last full chunk ends where its prompt ends and the first generated chunk follows directly. The r = len % K
leading tokens of a row form a partial first chunk, which is completed on the LEFT with the BOS token when the
config has one (training data puts BOS at document starts, so BOS is the least surprising filler); without BOS
those r tokens are dropped with a logged warning. Rows shorter than the longest one start with whole pad chunks,
masked out with the chunk attention mask; positions count from each row's first real chunk, so a row's result
does not depend on how much padding it got. The attention mask only selects the content tokens (in order): left
padding is the usual case, but padding anywhere is read the same way.

Randomness. All of it comes from uniform (energy head) or normal (flow head) draws made outside the step, in
blocks of `NOISE_BLOCK_STEPS` steps: per block, first the head noise `[steps, B, (N,) E]`, then (approximate
method only) one uniform per row and step `[steps, B]` for the pick. The source is the global RNG, a
`torch.Generator` (any device; the draws are moved to the model's device), a list of one generator per row
(each row then draws its own numbers, so a row gives the same result alone or in any batch), or `seed=`. Explicit
`noise=` replaces the head noise. Eager and compiled decoding therefore see the same numbers.

Fast path. On CUDA (or with `calm_compile=True`) the step runs as one `torch.compile`d function (default mode
"reduce-overhead", i.e. CUDA graphs) over a `StaticCache` that is kept and reused between calls of the same
shape; the prefill stays eager. Stop tokens are checked on the device and read back only every
`STOP_CHECK_INTERVAL` steps (every step on the CPU or with a streamer or stopping criteria). If compiling or running the
compiled step fails, generation restarts eagerly (same random numbers) with a logged warning, and the model
remembers not to compile again; `model.calm_last_decoding` says which path ran.

Candidate decoding at T < 1. The decoder trunk runs on all B*N candidates (cheap: H = 512), and the vocabulary
projection [B*N*K, H] x [H, V], which dominates (about 2*N*K*H*V FLOPs per row and step: 105 GFLOP for CALM-M at
N = 200), runs in row blocks of at most `LOGITS_BLOCK_ELEMENTS` logits in the model's dtype, each reduced by
argmax at once, so float32 logits of all candidates are never materialised. Candidates are not deduplicated
before decoding: head samples are continuous and never coincide, duplicates exist only among decoded chunks,
which `sampling_calm.chunk_multiplicities` counts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation.stopping_criteria import MaxTimeCriteria, StoppingCriteriaList
from transformers.utils import ModelOutput, logging

from .sampling_calm import (
    DEFAULT_MAX_ROUNDS,
    DEFAULT_NUM_CANDIDATES,
    selection_probabilities,
    temperature_sample,
)


logger = logging.get_logger(__name__)

# CALM's own generation settings, saved in generation_config.json under these names. They are not transformers'
# `temperature`/`do_sample`: a GenerationConfig with temperature=0.5 and do_sample=False cannot be saved, and CALM
# always samples (it has no likelihoods, hence no greedy decoding).
CALM_GENERATION_DEFAULTS = {
    "calm_temperature": 1.0,
    "calm_sampling_method": "approximate",  # or "exact"; irrelevant at T = 1
    "calm_num_candidates": DEFAULT_NUM_CANDIDATES,  # N of the approximate method (and the exact method's fallback)
    "calm_max_rounds": DEFAULT_MAX_ROUNDS,  # cap on the exact method's rounds of head calls
    "calm_stop_on_bos": True,  # a generated BOS (a new document) stops the row, like an EOS
    "calm_compile": None,  # None: compile the decoding step on CUDA; True/False: force
    "calm_compile_mode": "reduce-overhead",
}
SAMPLING_METHODS = ("approximate", "exact")
# Used when neither max_new_tokens nor max_length is given (transformers' default max_length is 20 in total).
DEFAULT_MAX_NEW_TOKENS = 20
# Head noise is drawn for this many steps at a time (one RNG call per block instead of one per step).
NOISE_BLOCK_STEPS = 16
# Without streamer or stopping criteria, stop tokens are read back to the host (a sync) only this often.
STOP_CHECK_INTERVAL = 8
# Largest logits block of the vocabulary projection when decoding candidates (2^27 bf16 logits = 256 MiB).
LOGITS_BLOCK_ELEMENTS = 2**27
# Static caches are sized in multiples of this many chunks, so nearby lengths reuse one cache and one graph.
STATIC_CACHE_ROUNDING = 64
# transformers sampling knobs that act on logits; CALM has none, so they are ignored (with a warning when passed).
_IGNORED_LOGIT_SETTINGS = (
    "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "min_length",
    "min_new_tokens", "logits_processor", "renormalize_logits",
)
# Arguments that callers such as pipeline("text-generation") pass and that mean nothing here.
_ACCEPTED_AND_IGNORED = (
    "do_sample", "use_cache", "synced_gpus", "assistant_model", "prefix_allowed_tokens_fn",
    "token_type_ids",  # some tokenizers return it; a decoder over chunks has no segments
)


@dataclass
class CalmGenerateOutput(ModelOutput):
    """Output of :meth:`CalmGenerationMixin.generate` with `return_dict_in_generate=True`.

    Args:
        sequences: `[B, T + new]` the prompts as given (with their padding) followed by the generated tokens;
            after a row stops, its tokens are `pad_token_id`.
        latents: `[B, S, Z]` the latent vector sampled at every step (`output_latents=True`), before any stop
            masking; `model.autoencoder.decode_tokens(latents)` gives the step's K tokens.
    """

    sequences: torch.LongTensor | None = None
    latents: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Random numbers


class _CalmRandom:
    """One source of uniform/normal draws: global RNG, one generator, or one generator per row."""

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
        # -> [steps, batch, *rest] on self.device
        if self.per_row is not None:
            rows = [fn((steps, *rest), generator=g, device=g.device) for g in self.per_row]
            return torch.stack(rows, dim=1).to(self.device)
        if self.generator is not None:
            g = self.generator
            return fn((steps, batch, *rest), generator=g, device=g.device).to(self.device)
        return fn((steps, batch, *rest), device=self.device)

    def uniform(self, steps: int, batch: int, *rest: int) -> torch.Tensor:
        return self._draw(torch.rand, steps, batch, rest)

    def normal(self, steps: int, batch: int, *rest: int) -> torch.Tensor:
        return self._draw(torch.randn, steps, batch, rest)

    def device_generator(self) -> torch.Generator | None:
        """A generator on the model's device for sampling_calm's own draws (exact method), derived from ours."""
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
# Prompt layout


def layout_prompts(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    patch_size: int,
    bos_token_id: int | None,
    filler_id: int,
) -> tuple[torch.LongTensor, torch.BoolTensor, torch.LongTensor, torch.LongTensor]:
    """Right-aligned whole-chunk layout of a batch of prompts (the first-partial-chunk rule, module docstring).

    Args:
        input_ids: `[B, T]` prompts; attention_mask: `[B, T]`, nonzero on content tokens.
        patch_size: K. bos_token_id: left filler of a partial first chunk (None: drop those tokens).
        filler_id: id written into whole pad chunks (never seen: they are masked).
    Returns:
        `(chunk_ids [B, P*K], chunk_mask [B, P] bool, num_chunks [B], dropped [B])`: the laid-out prompts, which
        chunks are real, each row's number of real chunks and of dropped leading tokens.
    """
    k = patch_size
    batch, width = input_ids.shape
    device = input_ids.device
    content = attention_mask.bool()
    lengths = content.sum(1)  # [B]
    if bool((lengths == 0).any()):
        raise ValueError("Every prompt needs at least one token: a row of `attention_mask` (or `input_ids`) is empty.")
    if bos_token_id is not None:
        fill, dropped = (-lengths) % k, torch.zeros_like(lengths)  # BOS tokens in front, tokens dropped
    else:
        fill, dropped = torch.zeros_like(lengths), lengths % k
        if bool((lengths - dropped == 0).any()):
            raise ValueError(
                f"A prompt is shorter than patch_size K={k} and the config has no `bos_token_id` to complete its "
                "first chunk: give at least K tokens or set `bos_token_id`."
            )
    laid_lengths = lengths + fill - dropped  # [B], multiples of K
    num_chunks = laid_lengths // k
    total = int(num_chunks.max()) * k
    # Content tokens of each row, packed to the left in their order: stream[b, rank] = token.
    rank = content.long().cumsum(1) - 1  # [B, T]
    stream = torch.full((batch, width + 1), filler_id, dtype=input_ids.dtype, device=device)
    stream.scatter_(1, torch.where(content, rank, width), input_ids)  # non-content tokens land in the spare column
    # Output column j of row b holds stream token q - fill + dropped, where q = j - (total - laid_length).
    q = torch.arange(total, device=device)[None] - (total - laid_lengths)[:, None]  # [B, P*K]
    source = (q - fill[:, None] + dropped[:, None]).clamp(0, width - 1)
    chunk_ids = stream.gather(1, source)
    if bos_token_id is not None:
        chunk_ids = torch.where((q >= 0) & (q < fill[:, None]), bos_token_id, chunk_ids)
    chunk_ids = torch.where(q >= 0, chunk_ids, filler_id)
    chunk_mask = (q >= 0).view(batch, -1, k)[:, :, 0]  # [B, P]
    return chunk_ids, chunk_mask, num_chunks, dropped


# ----------------------------------------------------------------------------------------------------------------
# The decoding step (compiled as a whole on the fast path)


def _pick_by_uniform(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF pick: `probs [B, N]` (rows sum to 1), `uniforms [B]` in [0, 1) -> index `[B]`.

    A zero-probability candidate is never picked: the first index whose CDF exceeds u*total has positive mass.
    """
    cdf = probs.double().cumsum(-1)  # [B, N]
    index = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1])[:, None], right=True)[:, 0]
    # Rounding can put u*total at the very end: fall back to the last candidate with positive mass.
    last_positive = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(index, last_positive)


def _calm_decode_step(
    model,
    cache,
    hidden: torch.Tensor,
    noise: torch.Tensor,
    uniforms: torch.Tensor | None,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float,
):
    """One step: `hidden [B, D]` -> (tokens `[B, K]`, latents `[B, Z]`, next hidden `[B, D]`).

    `noise` is `[B, E]` (T = 1) or `[B, N, E]` (approximate method, then `uniforms [B]` picks a candidate).
    """
    batch, dim = hidden.shape
    if noise.dim() == 3:
        num = noise.shape[1]
        expanded = hidden[:, None].expand(batch, num, dim).reshape(batch * num, dim)  # [B*N, D]
        candidate_latents = model.head.sample(expanded, noise=noise.reshape(batch * num, -1))  # [B*N, Z]
        candidates = model._calm_decode_argmax(candidate_latents).view(batch, num, -1)  # [B, N, K]
        probs = selection_probabilities(candidates, temperature)  # [B, N]
        index = _pick_by_uniform(probs, uniforms)  # [B]
        tokens = candidates.gather(1, index[:, None, None].expand(-1, 1, candidates.shape[-1]))[:, 0]
        latents = candidate_latents.view(batch, num, -1)[torch.arange(batch, device=hidden.device), index]
    else:
        latents = model.head.sample(hidden, noise=noise)  # [B, Z]
        tokens = model._calm_decode_argmax(latents)  # [B, K]
    next_hidden = model._calm_advance(tokens, cache, position_ids, attention_mask)
    return tokens, latents, next_hidden


_COMPILED_STEPS: dict = {}


def _compiled_step(mode: str):
    """One torch.compile wrapper per mode for the whole process (dynamo caches per code object anyway).

    `mode` is a torch.compile mode ("reduce-overhead" = CUDA graphs, "default", "max-autotune", ...) or
    "backend:NAME" for a torch.compile backend with its default mode ("backend:eager" traces with dynamo but runs
    eagerly: a quick check of the traced path, used by the tests).
    """
    if mode not in _COMPILED_STEPS:
        if mode.startswith("backend:"):
            step = torch.compile(_calm_decode_step, backend=mode.removeprefix("backend:"), dynamic=False)
        else:
            step = torch.compile(_calm_decode_step, mode=None if mode == "default" else mode, dynamic=False)
        _COMPILED_STEPS[mode] = step
    return _COMPILED_STEPS[mode]


# ----------------------------------------------------------------------------------------------------------------
# The mixin


class CalmGenerationMixin:
    """`generate` for CALM: chunked next-vector decoding with likelihood-free temperature.

    Mixed into `CalmForCausalLM` before transformers' `GenerationMixin`, whose `generate` it overrides (CALM has
    no logits, so none of the token-level machinery applies).
    """

    calm_last_decoding: str | None = None

    def _init_calm_generation_config(self) -> None:
        """Write CALM's generation defaults into `self.generation_config` (saved as generation_config.json)."""
        config = getattr(self, "generation_config", None)
        if config is None:
            return
        for name, value in CALM_GENERATION_DEFAULTS.items():
            if getattr(config, name, None) is None and value is not None:
                setattr(config, name, value)
        # A config flagged as derived from the model config is loaded back without its custom fields.
        config._from_model_config = False

    # ------------------------------------------------------------------------------------------------------------
    # Building blocks of the step

    def _calm_decode_argmax(self, latents: torch.Tensor) -> torch.LongTensor:
        """Argmax tokens of latents `[M, Z]` -> `[M, K]`, the vocabulary projection in row blocks (see top)."""
        autoencoder = self.autoencoder
        hidden = autoencoder.decoder(latents.to(autoencoder.lm_head.weight.dtype))  # [M, K, H]
        flat = hidden.reshape(-1, hidden.shape[-1])  # [M*K, H]
        rows = max(1, LOGITS_BLOCK_ELEMENTS // autoencoder.config.vocab_size)
        if flat.shape[0] <= rows:
            tokens = autoencoder.lm_head(flat).argmax(-1)
        else:
            tokens = torch.cat([autoencoder.lm_head(part).argmax(-1) for part in flat.split(rows)])
        return tokens.view(latents.shape[0], -1)

    def _calm_advance(self, tokens, cache, position_ids, attention_mask) -> torch.Tensor:
        """Feed one chunk `[B, K]` to the backbone with the cache -> last hidden state `[B, D]`."""
        embeds = self.embed_chunks(tokens)  # [B, 1, D]
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state[:, -1]

    def _calm_noise_size(self) -> int:
        return self.head.noise_size if hasattr(self.head, "noise_size") else self.config.latent_size

    def _calm_head_noise(self, rng: _CalmRandom, steps: int, batch: int, *rest: int) -> torch.Tensor:
        """Head noise `[steps, B, *rest, E]`: uniform in [-0.5, 0.5) (energy head) or N(0, I) x0 (flow head)."""
        size = self._calm_noise_size()
        if hasattr(self.head, "draw_noise"):
            return rng.uniform(steps, batch, *rest, size) - 0.5
        return rng.normal(steps, batch, *rest, size)

    # ------------------------------------------------------------------------------------------------------------
    # Settings

    def _calm_settings(self, generation_config, kwargs, explicit) -> tuple[GenerationConfig, dict]:
        base = generation_config if generation_config is not None else self.generation_config
        if base is None:
            base = GenerationConfig()
        gc = copy.deepcopy(base)
        settings = {}
        for name, default in CALM_GENERATION_DEFAULTS.items():
            value = getattr(gc, name, None)
            if value is None and self.generation_config is not None:
                value = getattr(self.generation_config, name, None)
            settings[name] = default if value is None else value
        # transformers' own `temperature` field, when a caller set it (e.g. pipeline("text-generation") on
        # transformers 5.17 puts its default 0.7 there), is a per-call choice and outranks the saved calm_temperature.
        if getattr(gc, "temperature", None) is not None:
            settings["calm_temperature"] = gc.temperature
        for name in list(kwargs):
            if name in CALM_GENERATION_DEFAULTS:
                settings[name] = kwargs.pop(name)
        for name, value in explicit.items():
            if value is not None:
                settings[name] = value
        ignored = sorted(name for name in _IGNORED_LOGIT_SETTINGS if kwargs.get(name) is not None)
        if ignored:
            logger.warning_once(
                f"CALM has no logits: {ignored} are ignored. Use `temperature` (likelihood-free, in (0, 1]), "
                "`num_candidates` and `sampling_method` instead."
            )
        for name in _IGNORED_LOGIT_SETTINGS + _ACCEPTED_AND_IGNORED:
            kwargs.pop(name, None)
        gc.do_sample = True  # CALM always samples; also keeps transformers' validation of sampling fields quiet
        unknown = gc.update(**kwargs)
        if unknown:
            raise ValueError(f"generate() got arguments CALM does not use: {sorted(unknown)}.")
        if (gc.num_beams or 1) > 1:
            raise ValueError(f"num_beams={gc.num_beams}: CALM has no likelihoods, so beam search is impossible.")
        self._calm_check_settings(settings)
        return gc, settings

    @staticmethod
    def _calm_check_settings(settings: dict) -> None:
        temperature = settings["calm_temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a number in (0, 1], got {temperature!r}.")
        if not math.isfinite(temperature) or not 0.0 < temperature <= 1.0:
            raise ValueError(
                f"temperature={temperature!r} is not allowed: it must be finite and in (0, 1] (likelihood-free "
                "temperature can only sharpen the model's distribution)."
            )
        method = settings["calm_sampling_method"]
        if method not in SAMPLING_METHODS:
            raise ValueError(f"sampling_method={method!r} is unknown: use one of {SAMPLING_METHODS}.")
        for name in ("calm_num_candidates", "calm_max_rounds"):
            value = settings[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.removeprefix('calm_')}={value!r} must be an integer >= 1.")

    # ------------------------------------------------------------------------------------------------------------
    # generate

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        stopping_criteria: StoppingCriteriaList | list | None = None,
        streamer=None,
        temperature: float | None = None,
        sampling_method: str | None = None,
        num_candidates: int | None = None,
        max_rounds: int | None = None,
        stop_on_bos: bool | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        output_latents: bool | None = None,
        **kwargs,
    ) -> torch.LongTensor | CalmGenerateOutput:
        r"""Generate continuations chunk by chunk (K tokens per step), with likelihood-free temperature.

        Args:
            input_ids: `[B, T]` prompts (any length >= 1; T need not be a multiple of K). None: one BOS.
            attention_mask: `[B, T]` 1 on content tokens, 0 on padding (usually left padding). Default all ones.
            generation_config: base settings (default `model.generation_config`); keyword arguments override it.
                transformers fields used: `max_new_tokens`, `max_length` (prompt + new, counted on `input_ids`),
                `eos_token_id` (int or list), `bos_token_id`, `pad_token_id`, `num_return_sequences`,
                `max_time`, `return_dict_in_generate`. Logit knobs (top_k, top_p, penalties...) and `do_sample`
                are ignored: CALM always samples.
            stopping_criteria: transformers `StoppingCriteria` (or callables `(input_ids, scores) -> [B] bool`),
                evaluated after every chunk on the sequences so far; a row they stop is padded afterwards.
            streamer: e.g. `TextStreamer` (batch 1): gets the prompt once, then each new chunk.
            temperature: T in (0, 1] (`calm_temperature`, default 1). Fluent text needs T <= 0.5 with the
                approximate method and N ~ 200 (the authors' advice).
            sampling_method: "approximate" (default; Algorithm 2 over N candidates, generalised to any T) or
                "exact" (Algorithm 1, eager, draws until accepted; a row still unfinished after `max_rounds` rounds
                of 16 head samples falls back to the approximate method with a warning). `calm_sampling_method`.
            num_candidates: N for the approximate method (`calm_num_candidates`, default 200).
            max_rounds: cap of the exact method (`calm_max_rounds`, default 1000).
            stop_on_bos: a generated BOS (a document start; CALM's training text has no EOS) stops the row like
                an EOS (`calm_stop_on_bos`, default True). Stop tokens are kept in the output.
            noise: explicit head noise: `[S', B, E]` at T = 1 (energy head: uniform in [-0.5, 0.5); flow head:
                x0 `[S', B, Z]`), or `[S', B, N, E]` for the approximate method; step i uses `noise[i]`,
                S' >= the steps run. Not for the exact method.
            generator: a `torch.Generator` (any device) or a list of one per row, for every random draw.
            seed: shorthand for a fresh generator on the model's device seeded with it.
            output_latents: with `return_dict_in_generate=True`, also return the sampled latents `[B, S, Z]`.
            kwargs: more generation-config fields; `calm_*` names of the settings above; `calm_compile`
                (None = on CUDA, True, False) and `calm_compile_mode` for the compiled decoding step.

        Returns:
            `[B, T + new]` token ids (the prompts as given, then at most `max_new_tokens` new tokens; after a
            row's stop token its tokens are `pad_token_id`), or a `CalmGenerateOutput` with
            `return_dict_in_generate=True`.
        """
        if kwargs.get("custom_generate") is not None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None and kwargs.get("inputs") is not None:
            input_ids = kwargs.pop("inputs")  # transformers' name of the first argument
        kwargs.pop("inputs", None)
        explicit = {
            "calm_temperature": temperature,
            "calm_sampling_method": sampling_method,
            "calm_num_candidates": num_candidates,
            "calm_max_rounds": max_rounds,
            "calm_stop_on_bos": stop_on_bos,
        }
        gc, settings = self._calm_settings(generation_config, dict(kwargs), explicit)
        device = self.device
        k = self.config.patch_size

        # ---- prompts ------------------------------------------------------------------------------------------
        bos_id = gc.bos_token_id if gc.bos_token_id is not None else self.config.bos_token_id
        if input_ids is None:
            if bos_id is None:
                raise ValueError("`input_ids` is required when the config has no `bos_token_id` to start from.")
            input_ids = torch.full((1, 1), bos_id, dtype=torch.long, device=device)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"`input_ids` must be a non-empty [batch, tokens] tensor, got {tuple(input_ids.shape)}.")
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} must equal `input_ids` {tuple(input_ids.shape)}."
            )
        repeats = gc.num_return_sequences or 1
        if repeats > 1:
            input_ids = input_ids.repeat_interleave(repeats, 0)
            attention_mask = attention_mask.repeat_interleave(repeats, 0)
        batch, prompt_width = input_ids.shape

        # ---- lengths ------------------------------------------------------------------------------------------
        max_new = gc.max_new_tokens
        if max_new is None:
            max_new = gc.max_length - prompt_width if gc.max_length is not None else DEFAULT_MAX_NEW_TOKENS
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise ValueError(
                f"max_new_tokens={max_new!r} (or max_length={gc.max_length!r} minus the prompt width {prompt_width}) "
                "must give at least 1 new token."
            )
        steps = -(-max_new // k)

        pad_id = gc.pad_token_id
        eos = gc.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        stop_ids = list(eos)
        if settings["calm_stop_on_bos"] and bos_id is not None and bos_id not in stop_ids:
            stop_ids.append(bos_id)
        criteria = list(stopping_criteria or [])
        if gc.max_time is not None:
            criteria.append(MaxTimeCriteria(max_time=gc.max_time))
        if pad_id is None and stop_ids:
            pad_id = stop_ids[0]
            logger.warning_once(f"`pad_token_id` is not set: rows that stop are filled with {pad_id} (a stop token).")
        if pad_id is None and criteria:
            raise ValueError("`pad_token_id` is needed to fill rows that stopping criteria stop; set it.")

        chunk_ids, chunk_mask, num_chunks, dropped = layout_prompts(
            input_ids, attention_mask, k, bos_id, pad_id if pad_id is not None else 0
        )
        if bool(dropped.any()):
            logger.warning(
                f"The config has no `bos_token_id` to complete a partial first chunk: the first {dropped.tolist()} "
                f"tokens of the prompts (length % K={k}) are dropped."
            )
        max_positions = self.config.backbone_config.max_position_embeddings
        longest = int(num_chunks.max())
        if longest + steps > max_positions:
            raise ValueError(
                f"The longest prompt takes {longest} chunks and {max_new} new tokens take {steps} more: "
                f"{longest + steps} chunks exceed the backbone's max_position_embeddings={max_positions} "
                f"(positions count chunks of K={k} tokens). Shorten the prompt or max_new_tokens."
            )

        # ---- sampling set-up ----------------------------------------------------------------------------------
        temperature = float(settings["calm_temperature"])
        exact = settings["calm_sampling_method"] == "exact" and temperature < 1.0
        num_cand = settings["calm_num_candidates"] if temperature < 1.0 and not exact else None
        rng = _CalmRandom(device, generator=generator, seed=seed, batch_size=batch)
        if noise is not None:
            if exact:
                raise ValueError("`noise` is not supported by the exact method (it draws a random number of samples).")
            expected = (batch, num_cand, self._calm_noise_size()) if num_cand else (batch, self._calm_noise_size())
            if noise.dim() != len(expected) + 1 or tuple(noise.shape[1:]) != expected or noise.shape[0] < steps:
                raise ValueError(
                    f"`noise` must have shape [steps>={steps}, {', '.join(map(str, expected))}] for this call, got "
                    f"{tuple(noise.shape)}."
                )
            noise = noise.to(device)
        if exact and rng.per_row is not None:
            raise ValueError("Per-row generators are supported at T = 1 and by the approximate method, not 'exact'.")
        if streamer is not None and batch != 1:
            raise ValueError(f"A streamer needs batch size 1, got {batch} rows.")

        plan = dict(
            input_ids=input_ids, chunk_ids=chunk_ids, chunk_mask=chunk_mask, num_chunks=num_chunks, steps=steps,
            max_new=max_new, stop_ids=stop_ids, pad_id=pad_id, criteria=criteria, streamer=streamer, rng=rng,
            noise=noise, temperature=temperature, num_candidates=num_cand, exact=exact,
            max_rounds=settings["calm_max_rounds"], fallback_candidates=settings["calm_num_candidates"],
            want_latents=bool(output_latents),
        )
        use_compile = settings["calm_compile"]
        if use_compile is None:
            use_compile = device.type == "cuda" and not gc.disable_compile
        use_compile = bool(use_compile) and not exact and not getattr(self, "_calm_compile_failed", False)

        if use_compile:
            if settings["calm_compile"] is None:  # chosen for the caller: say what the first call costs
                logger.warning_once(
                    "CALM compiles its decoding step on CUDA (torch.compile, CUDA graphs) for each new batch size, "
                    "length and temperature: such a first call takes from tens of seconds to about two minutes, "
                    "later ones are fast. For a few one-off generations pass calm_compile=False (eager decoding)."
                )
            state = rng.get_state()
            try:
                result = self._calm_decode(plan, compiled=settings["calm_compile_mode"], static=True)
                self.calm_last_decoding = f"compiled ({settings['calm_compile_mode']}, static cache)"
            except Exception as error:  # noqa: BLE001 - any compile/runtime failure falls back to eager
                if streamer is not None:
                    raise
                logger.warning(
                    f"Compiled CALM decoding failed ({type(error).__name__}: {error}); falling back to eager "
                    "decoding, which this model will use from now on."
                )
                self._calm_compile_failed = True
                self._calm_static_cache = None
                rng.set_state(state)
                result = self._calm_decode(plan, compiled=None, static=gc.cache_implementation == "static")
                self.calm_last_decoding = "eager (compile failed)"
        else:
            result = self._calm_decode(plan, compiled=None, static=gc.cache_implementation == "static")
            self.calm_last_decoding = "eager" + (" (exact method)" if exact else "")
            if settings["calm_compile"] is not False and getattr(self, "_calm_compile_failed", False):
                self.calm_last_decoding += " (compiling failed earlier)"

        new_tokens, latents = result
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        if gc.return_dict_in_generate:
            return CalmGenerateOutput(sequences=sequences, latents=latents if output_latents else None)
        return sequences

    # ------------------------------------------------------------------------------------------------------------
    # The decoding loop

    def _calm_cache(self, batch: int, length: int, static: bool, reuse: bool):
        backbone_config = self.model.config
        if not static:
            return DynamicCache(config=backbone_config), length
        if not reuse:
            return StaticCache(config=backbone_config, max_cache_len=length), length
        length = -(-length // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING
        key = (batch, length, self.dtype, self.device)
        cached = getattr(self, "_calm_static_cache", None)
        if cached is not None and cached[0] == key:
            cached[1].reset()  # in place: the compiled graphs keep their static addresses
            return cached[1], length
        cache = StaticCache(config=backbone_config, max_cache_len=length)
        self._calm_static_cache = (key, cache)
        return cache, length

    def _calm_decode(self, plan: dict, compiled: str | None, static: bool):
        """Prefill, then `steps` decoding steps. Returns (new tokens `[B, new]` after stop masking, latents)."""
        chunk_ids, chunk_mask, num_chunks = plan["chunk_ids"], plan["chunk_mask"], plan["num_chunks"]
        steps, rng, temperature = plan["steps"], plan["rng"], plan["temperature"]
        batch, prompt_chunks = chunk_mask.shape
        k = self.config.patch_size
        device = chunk_ids.device
        run_compiled = compiled is not None
        cache, cache_len = self._calm_cache(batch, prompt_chunks + steps, static, reuse=run_compiled)
        padded = not bool(chunk_mask.all())
        # Chunk-level padding mask over every cache slot (left pad chunks 0, the rest 1); None without padding.
        full_mask = None
        if padded:
            full_mask = torch.ones(batch, cache_len, dtype=torch.long, device=device)
            full_mask[:, :prompt_chunks] = chunk_mask.long()
        prompt_positions = (chunk_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P], from each row's first chunk
        step_positions = num_chunks[None, :, None] + torch.arange(steps, device=device)[:, None, None]  # [S, B, 1]

        def mask_at(length: int):
            if full_mask is None:
                return None
            return full_mask if static else full_mask[:, :length]

        out = self.model(
            inputs_embeds=self.embed_chunks(chunk_ids),
            attention_mask=mask_at(prompt_chunks),
            position_ids=prompt_positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        hidden = out.last_hidden_state[:, -1].contiguous()  # [B, D]: every row's last real chunk (right-aligned)

        step_fn = _compiled_step(compiled) if run_compiled else _calm_decode_step
        cudagraphs = run_compiled and "reduce-overhead" in str(compiled) and device.type == "cuda"
        tokens_out = torch.empty(batch, steps * k, dtype=torch.long, device=device)
        latents_out = (
            torch.empty(batch, steps, self.config.latent_size, dtype=self.dtype, device=device)
            if plan["want_latents"]
            else None
        )
        stop_ids = torch.tensor(plan["stop_ids"], dtype=torch.long, device=device)
        has_stops = stop_ids.numel() > 0
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # a stop token seen (device-side)
        criteria_step = torch.full((batch,), steps, dtype=torch.long, device=device)  # step a criterion stopped
        streamer, criteria = plan["streamer"], plan["criteria"]
        if streamer is not None:
            streamer.put(plan["input_ids"].cpu())
        # Reading the stop state back costs a device sync: only on accelerators is it worth spacing out.
        sync_every = 1 if (streamer is not None or criteria or device.type == "cpu") else STOP_CHECK_INTERVAL
        approximate = plan["num_candidates"] is not None

        steps_run = 0
        noise_block = uniform_block = None
        for i in range(steps):
            block_index = i % NOISE_BLOCK_STEPS
            if block_index == 0:
                count = min(NOISE_BLOCK_STEPS, steps - i)
                if plan["exact"]:
                    pass  # the exact method draws its own noise inside `draw`
                elif plan["noise"] is not None:
                    noise_block = plan["noise"][i : i + count]
                else:
                    rest = (plan["num_candidates"],) if approximate else ()
                    noise_block = self._calm_head_noise(rng, count, batch, *rest)
                if approximate:
                    uniform_block = rng.uniform(count, batch)
            position_ids = step_positions[i]
            mask = mask_at(prompt_chunks + i + 1)
            if plan["exact"]:
                tokens, latents = self._calm_exact_chunk(hidden, plan)
                hidden = self._calm_advance(tokens, cache, position_ids, mask)
            else:
                uniforms = uniform_block[block_index] if approximate else None
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                tokens, latents, hidden = step_fn(
                    self, cache, hidden, noise_block[block_index], uniforms, position_ids, mask, temperature
                )
                if run_compiled:
                    hidden = hidden.clone()  # the graph's output buffers are reused by the next replay
            tokens_out[:, i * k : (i + 1) * k] = tokens
            if latents_out is not None:
                latents_out[:, i] = latents
            steps_run = i + 1

            newly = ~stopped  # rows still running before this chunk
            if has_stops:
                stopped = stopped | torch.isin(tokens, stop_ids).any(-1)
            if criteria or streamer is not None:
                so_far = self._calm_mask_after_stops(tokens_out[:, : steps_run * k], stop_ids, criteria_step, plan)
                if streamer is not None and bool(newly[0]):
                    self._calm_stream(streamer, so_far[:, i * k : min((i + 1) * k, plan["max_new"])], stop_ids)
                if criteria:
                    sequences = torch.cat([plan["input_ids"], so_far], 1)
                    done = torch.zeros(batch, dtype=torch.bool, device=device)
                    for criterion in criteria:
                        result = criterion(sequences, None)
                        done = done | torch.as_tensor(result, device=device).bool().expand(batch)
                    criteria_step = torch.where(done & (criteria_step == steps), i, criteria_step)
            if (has_stops or criteria) and (steps_run % sync_every == 0):
                if bool((stopped | (criteria_step < steps)).all()):
                    break
        if streamer is not None:
            streamer.end()

        new_tokens = self._calm_mask_after_stops(tokens_out[:, : steps_run * k], stop_ids, criteria_step, plan)
        new_tokens = new_tokens[:, : plan["max_new"]]
        if latents_out is not None:
            latents_out = latents_out[:, :steps_run]
        return new_tokens, latents_out

    def _calm_mask_after_stops(self, generated, stop_ids, criteria_step, plan) -> torch.LongTensor:
        """Replace tokens after each row's first stop token, or after the chunk where a criterion fired, by pad."""
        if plan["pad_id"] is None or (stop_ids.numel() == 0 and not plan["criteria"]):
            return generated
        k = self.config.patch_size
        positions = torch.arange(generated.shape[1], device=generated.device)[None]  # [1, new]
        keep = positions < (criteria_step[:, None] + 1) * k
        if stop_ids.numel():
            is_stop = torch.isin(generated, stop_ids)
            first = torch.where(is_stop.any(1), is_stop.int().argmax(1), generated.shape[1])  # [B]
            keep = keep & (positions <= first[:, None])
        return torch.where(keep, generated, plan["pad_id"])

    @staticmethod
    def _calm_stream(streamer, chunk: torch.LongTensor, stop_ids: torch.Tensor) -> None:
        """Put the chunk's tokens up to and including a stop token (batch 1)."""
        chunk = chunk[:1]
        if stop_ids.numel():
            hits = torch.isin(chunk[0], stop_ids).nonzero()
            if hits.numel():
                chunk = chunk[:, : int(hits[0, 0]) + 1]
        streamer.put(chunk.cpu())

    def _calm_exact_chunk(self, hidden: torch.Tensor, plan: dict):
        """Algorithm 1 via `sampling_calm.temperature_sample(method="exact")`; draw(n) runs the head n times."""
        batch, dim = hidden.shape
        drawn_tokens, drawn_latents = [], []

        def draw(n: int) -> torch.LongTensor:
            noise = self._calm_head_noise(plan["rng"], 1, batch, n)[0]  # [B, n, E]
            latents = self.head.sample(hidden[:, None].expand(batch, n, dim), noise=noise)  # [B, n, Z]
            tokens = self._calm_decode_argmax(latents.reshape(batch * n, -1)).view(batch, n, -1)  # [B, n, K]
            drawn_tokens.append(tokens)
            drawn_latents.append(latents)
            return tokens

        chosen = temperature_sample(
            draw,
            plan["temperature"],
            method="exact",
            num_candidates=plan["fallback_candidates"],
            generator=plan["rng"].device_generator(),
            max_rounds=plan["max_rounds"],
        )  # [B, K]
        latents = None
        if plan["want_latents"]:
            # The chosen chunk is one of the drawn ones: return the latent of its first copy.
            all_tokens = torch.cat(drawn_tokens, 1)  # [B, draws, K]
            match = (all_tokens == chosen[:, None]).all(-1).int().argmax(1)  # [B]
            latents = torch.cat(drawn_latents, 1)[torch.arange(batch, device=hidden.device), match]
        return chosen, latents
