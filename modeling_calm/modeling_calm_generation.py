"""Generation for CALM: one chunk of K tokens per step, likelihood-free temperature (arXiv 2510.27688, sections
"Next-Vector Prediction" and "Likelihood-Free Temperature Sampling").

`generate` runs in three stages: the prompts (`_calm_prompt_inputs`, then `modeling_calm.layout_prompts` lays them
out as whole chunks), the stopping rules (`_calm_stopping`), and the run (`_calm_run`: compiled or eager decoding of
a `CalmDecodingPlan`). What a model keeps between calls is one `CalmDecodingState`.

One decoding step (`_calm_step`): the head samples a latent from the last hidden state, the frozen autoencoder
decodes it into K tokens (`decode_tokens`, argmax), the K tokens are compressed into one chunk embedding and the
backbone advances one position with the KV cache. At T < 1 the head samples N latents per row in one call, all N
are decoded and one is picked by the generalised Algorithm 2 (approximate method), or the head is called
repeatedly by Algorithm 1 (exact method, eager only). All random numbers (the head's own noise, the pick's
uniforms) are drawn outside the step, so eager and compiled decoding see the same numbers. On CUDA the steps run
over a reused `StaticCache`, recorded in blocks as CUDA graphs (`modeling_calm_graphs`) or compiled with
`torch.compile`, with an eager fallback. Details: docs/generation.md.

Shape letters: those of `modeling_calm` (C prompt chunks, G decoding steps, N candidates per row).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.utils import ModelOutput, logging

from .modeling_calm_graphs import GRAPH_MODES, CalmBlockRunner, block_sizes, check_compile_mode, graph_capable_cache
from .modeling_calm_generation_settings import (
    CALM_GENERATION_DEFAULTS,
    NOISE_BLOCK_STEPS,
    STATIC_CACHE_ROUNDING,
    CalmDecodingPlan,
    CalmGenerationSettingsMixin,
    _CalmStops,
)
from .modeling_calm_sampling import (
    pick_by_uniform,
    selection_probabilities,
    temperature_sample,
)


logger = logging.get_logger(__name__)

__all__ = [
    "CALM_GENERATION_DEFAULTS",
    "CalmDecodingPlan",
    "CalmDecodingState",
    "CalmGenerateOutput",
    "CalmGenerationMixin",
    "CalmNonFiniteError",
]

@dataclass
class CalmGenerateOutput(ModelOutput):
    """Output of :meth:`CalmGenerationMixin.generate` with `return_dict_in_generate=True`.

    Args:
        sequences: `[B, T + new]` the prompts as given (with their padding) followed by the generated tokens;
            after a row stops, its tokens are `pad_token_id`.
        latents: `[B, G, Z]` the latent vector sampled at every step (`output_latents=True`), before any stop
            masking; `model.autoencoder.decode_tokens(latents)` gives the step's K tokens.
    """

    sequences: torch.LongTensor | None = None
    latents: torch.FloatTensor | None = None


class _CalmLock:
    """The per-model lock of compiled decoding: a `threading.Lock` that a copy or a pickle of the model gets fresh
    and unlocked (a plain lock cannot be deep-copied or pickled, and a shared one would tie copies together)."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info):
        self._lock.release()

    def __reduce__(self):
        return (_CalmLock, ())


# Guards the lazy creation of a model's decoding state (so two first calls do not create two locks).
_STATE_CREATION_LOCK = threading.Lock()


@dataclass
class CalmDecodingState:
    """What a model keeps between `generate` calls (one per model, `CalmGenerationMixin._calm_state`).

    Compiled decoding reuses `static_cache` (and the graphs keep its addresses), so two threads decoding the same
    shapes would overwrite each other's cache: every use of it, and compilation, runs under `lock`. A copy or a
    pickle of the model starts with a fresh state (its own cache and lock).
    """

    lock: _CalmLock = field(default_factory=_CalmLock)  # held around everything compiled decoding shares
    static_cache: StaticCache | None = None  # reused by compiled decoding: the graphs keep its addresses
    static_cache_key: tuple | None = None  # (batch, length, dtype, device) it was built for
    compile_failed: bool = False  # compiling or running the compiled step failed once: stay eager
    graphs: dict = field(default_factory=dict)  # CUDA-graph blocks (`modeling_calm_graphs`) over `graphs_cache`
    graphs_cache: StaticCache | None = None  # the static cache the kept graphs were recorded over
    graphs_weights: tuple | None = None  # the weights' addresses the kept graphs were recorded with
    graph_pool: tuple | None = None  # the memory pool all of this model's graphs share
    graph_stream: torch.cuda.Stream | None = None  # the side stream graphs are warmed up and recorded on
    last_decoding: str | None = None  # which path the last call took (`model.calm_last_decoding`)

    def __reduce__(self):
        return (CalmDecodingState, ())


class CalmNonFiniteError(ValueError):
    """`generate` met a non-finite (NaN or inf) hidden state or latent: the tokens would be meaningless."""


# ----------------------------------------------------------------------------------------------------------------
# The mixin


_COMPILED_STEPS: dict = {}


def _compiled_step(mode: str):
    """One torch.compile wrapper of `CalmGenerationMixin._calm_step` per mode for the whole process (dynamo caches
    per code object anyway).

    `mode` is a torch.compile mode ("reduce-overhead" = CUDA graphs, "default", "max-autotune", ...) or
    "backend:NAME" for a torch.compile backend with its default mode ("backend:eager" traces with dynamo but runs
    eagerly: a quick check of the traced path, used by the tests).
    """
    with _COMPILED_STEPS_LOCK:
        return _compiled_step_locked(mode)


_COMPILED_STEPS_LOCK = threading.Lock()


def _compiled_step_locked(mode: str):
    if mode not in _COMPILED_STEPS:
        step = CalmGenerationMixin._calm_step
        if mode.startswith("backend:"):
            _COMPILED_STEPS[mode] = torch.compile(step, backend=mode.removeprefix("backend:"), dynamic=False)
        else:
            _COMPILED_STEPS[mode] = torch.compile(step, mode=None if mode == "default" else mode, dynamic=False)
    return _COMPILED_STEPS[mode]


class CalmGenerationMixin(CalmGenerationSettingsMixin):
    """`generate` for CALM: chunked next-vector decoding with likelihood-free temperature.

    Mixed into `CalmForCausalLM` before transformers' `GenerationMixin`, whose `generate` it overrides (CALM has
    no logits, so none of the token-level machinery applies).
    """

    @property
    def _calm_state(self) -> CalmDecodingState:
        state = self.__dict__.get("_calm_decoding_state")
        if state is None:
            with _STATE_CREATION_LOCK:
                state = self.__dict__.get("_calm_decoding_state")
                if state is None:
                    state = self.__dict__["_calm_decoding_state"] = CalmDecodingState()
        return state

    @property
    def calm_last_decoding(self) -> str | None:
        """Which decoding path the last `generate` call took ("eager", "compiled (...)", ...)."""
        return self._calm_state.last_decoding

    def _calm_step(
        self,
        cache: Cache,
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
            candidate_latents = self.head.sample(expanded, noise=noise.reshape(batch * num, -1))  # [B*N, Z]
            candidates = self.autoencoder.decode_tokens(candidate_latents[:, None]).view(batch, num, -1)  # [B, N, K]
            probs = selection_probabilities(candidates, temperature)  # [B, N]
            index = pick_by_uniform(probs, uniforms)  # [B]
            tokens = candidates.gather(1, index[:, None, None].expand(-1, 1, candidates.shape[-1]))[:, 0]
            latents = candidate_latents.view(batch, num, -1)[torch.arange(batch, device=hidden.device), index]
        else:
            latents = self.head.sample(hidden, noise=noise)  # [B, Z]
            tokens = self.autoencoder.decode_tokens(latents[:, None])  # [B, K]
        return tokens, latents, self._calm_advance(tokens, cache, position_ids, attention_mask)

    def _calm_advance(self, tokens, cache, position_ids, attention_mask) -> torch.Tensor:
        """Feed one chunk `[B, K]` to the backbone with the cache -> last hidden state `[B, D]`."""
        out = self.model(
            inputs_embeds=self.embed_chunks(tokens),  # [B, 1, D]
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state[:, -1]

    def _calm_exact_chunk(self, hidden: torch.Tensor, plan: CalmDecodingPlan):
        """Algorithm 1 via `temperature_sample(method="exact")`; draw(n) runs the head n times."""
        batch, dim = hidden.shape
        drawn_tokens, drawn_latents = [], []

        def draw(n: int) -> torch.LongTensor:
            noise = plan.rng.head_noise(self.head, 1, batch, n)[0]  # [B, n, E]
            latents = self.head.sample(hidden[:, None].expand(batch, n, dim), noise=noise)  # [B, n, Z]
            tokens = self.autoencoder.decode_tokens(latents.reshape(batch * n, 1, -1)).view(batch, n, -1)  # [B, n, K]
            drawn_tokens.append(tokens)
            drawn_latents.append(latents)
            return tokens

        chosen = temperature_sample(
            draw,
            plan.temperature,
            method="exact",
            num_candidates=plan.fallback_candidates,
            generator=plan.rng.device_generator(),
            max_rounds=plan.max_rounds,
        )  # [B, K]
        # The chosen chunk is one of the drawn ones: return the latent of its first copy (also for the finiteness
        # check of `_calm_decode`, hence always).
        all_tokens = torch.cat(drawn_tokens, 1)  # [B, draws, K]
        match = (all_tokens == chosen[:, None]).all(-1).int().argmax(1)  # [B]
        latents = torch.cat(drawn_latents, 1)[torch.arange(batch, device=hidden.device), match]
        return chosen, latents

    # ------------------------------------------------------------------------------------------------------------
    # Settings

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
                `max_time`, `return_dict_in_generate`; a caller's config is merged over the model's own (its fields
                left at their defaults keep the model's values, e.g. pad/eos ids), as in transformers. Logit knobs
                (top_k, top_p, penalties...) are ignored with a warning; `output_scores`/`output_logits` raise
                (CALM has no logits).
            do_sample (keyword): `False` is deterministic decoding (the head's noise at its centre: zero for the
                energy head's uniform noise and the flow/diffusion heads' Gaussian x0; one candidate; temperature
                ignored, with a warning when set). Default: sampling (a GenerationConfig's `do_sample` is not read,
                since it is False by default).
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
            noise: explicit head noise: `[G', B, E]` at T = 1 (energy head: uniform in [-0.5, 0.5); flow head:
                x0 `[G', B, Z]`), or `[G', B, N, E]` for the approximate method; step i uses `noise[i]`,
                G' >= the steps run. Not for the exact method.
            generator: a `torch.Generator` (any device) or a list of one per row, for every random draw.
            seed: shorthand for a fresh generator on the model's device seeded with it.
            output_latents: with `return_dict_in_generate=True`, also return the sampled latents `[B, G, Z]`.
            kwargs: more generation-config fields; `calm_*` names of the settings above; `calm_compile`
                (None = on CUDA, True, False) and `calm_compile_mode` (default "cudagraph": the decoding steps
                recorded in CUDA graphs, see `modeling_calm_graphs`; "cudagraph+inductor"; or a torch.compile
                mode for the step alone).

        Example:

        ```python
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer

        >>> tokenizer = AutoTokenizer.from_pretrained("org/calm-m")  # a converted or trained CALM
        >>> model = AutoModelForCausalLM.from_pretrained("org/calm-m", trust_remote_code=True)
        >>> prompts = tokenizer(["The capital of France"], return_tensors="pt")
        >>> out = model.generate(**prompts, max_new_tokens=32, temperature=0.5, num_candidates=200, seed=0)
        >>> tokenizer.decode(out[0])
        ```

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
        bos_id = gc.bos_token_id if gc.bos_token_id is not None else self.config.bos_token_id
        input_ids, attention_mask, max_new = self._calm_prompt_inputs(input_ids, attention_mask, gc, bos_id)
        stop_ids, pad_id, criteria = self._calm_stopping(gc, settings, stopping_criteria, bos_id)
        plan = self._calm_plan(
            input_ids, attention_mask, max_new, bos_id, stop_ids, pad_id, criteria, streamer, settings,
            noise=noise, generator=generator, seed=seed, output_latents=output_latents,
        )
        new_tokens, latents = self._calm_run(plan, settings, gc)
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        if gc.return_dict_in_generate:
            return CalmGenerateOutput(sequences=sequences, latents=latents if output_latents else None)
        return sequences

    # ------------------------------------------------------------------------------------------------------------
    # The three stages of generate: prompts, stopping, run

    def _calm_run(self, plan: CalmDecodingPlan, settings: dict, gc: GenerationConfig):
        """Decode the plan, compiled when asked (or on CUDA) and possible, else eagerly; on a compile failure,
        again eagerly from the same random state. Returns (new tokens `[B, new]`, latents or None)."""
        state = self._calm_state
        static = gc.cache_implementation == "static"
        check_compile_mode(settings["calm_compile_mode"])
        use_compile = settings["calm_compile"]
        if use_compile is None:
            use_compile = self.device.type == "cuda" and not gc.disable_compile
        use_compile = bool(use_compile) and not plan.exact and not state.compile_failed
        if not use_compile:
            result = self._calm_decode(plan, compiled=None, static=static)
            state.last_decoding = "eager" + (" (exact method)" if plan.exact else "")
            if settings["calm_compile"] is not False and state.compile_failed:
                state.last_decoding += " (compiling failed earlier)"
            return result
        mode = settings["calm_compile_mode"]
        if settings["calm_compile"] is None and mode not in GRAPH_MODES:  # chosen for the caller: say what it costs
            logger.warning_once(
                "CALM compiles its decoding step on CUDA (torch.compile, CUDA graphs) for each new batch size, "
                "length and temperature: such a first call takes from tens of seconds to about two minutes, "
                "later ones are fast. For a few one-off generations pass calm_compile=False (eager decoding)."
            )
        # The compiled path shares one static cache (and its graphs) per model: concurrent calls take turns here,
        # compilation included. The eager path above builds its cache per call and needs no lock.
        with state.lock:
            if state.compile_failed:  # another thread's call failed to compile while this one waited
                result = self._calm_decode(plan, compiled=None, static=static)
                state.last_decoding = "eager (compiling failed earlier)"
                return result
            rng_state = plan.rng.get_state()
            try:
                result = self._calm_decode(plan, compiled=mode, static=True)
                if mode not in GRAPH_MODES:
                    state.last_decoding = f"compiled ({mode}, static cache)"
            except CalmNonFiniteError:
                raise
            except Exception as error:  # noqa: BLE001 - any compile/runtime failure falls back to eager
                if plan.streamer is not None:
                    raise
                logger.warning(
                    f"Compiled CALM decoding failed ({type(error).__name__}: {error}); falling back to eager "
                    "decoding, which this model will use from now on."
                )
                state.compile_failed = True
                state.static_cache = state.static_cache_key = None
                plan.rng.set_state(rng_state)
                result = self._calm_decode(plan, compiled=None, static=static)
                state.last_decoding = "eager (compile failed)"
        return result

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
        state = self._calm_state
        if state.static_cache is not None and state.static_cache_key == key:
            state.static_cache.reset()  # in place: the compiled graphs keep their static addresses
            return state.static_cache, length
        state.static_cache = StaticCache(config=backbone_config, max_cache_len=length)
        state.static_cache_key = key
        return state.static_cache, length

    def _calm_prefill(self, plan: CalmDecodingPlan, static: bool, reuse: bool):
        """The prompt forward. Returns (cache, last hidden `[B, D]`, mask_at(length) for the step masks)."""
        chunk_ids, chunk_mask = plan.chunk_ids, plan.chunk_mask
        batch, prompt_chunks = chunk_mask.shape
        cache, cache_len = self._calm_cache(batch, prompt_chunks + plan.steps, static, reuse=reuse)
        # Chunk-level padding mask over every cache slot (left pad chunks 0, the rest 1); None without padding.
        full_mask = None
        if not bool(chunk_mask.all()):
            full_mask = torch.ones(batch, cache_len, dtype=torch.long, device=chunk_ids.device)
            full_mask[:, :prompt_chunks] = chunk_mask.long()

        def mask_at(length: int):
            if full_mask is None:
                return None
            return full_mask if static else full_mask[:, :length]

        out = self.model(
            inputs_embeds=self.embed_chunks(chunk_ids),
            attention_mask=mask_at(prompt_chunks),
            position_ids=(chunk_mask.long().cumsum(-1) - 1).clamp(min=0),  # [B, C], from each row's first chunk
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return cache, out.last_hidden_state[:, -1].contiguous(), mask_at  # every row's last real chunk

    @staticmethod
    def _calm_check_finite(prompt_finite: torch.Tensor, first_bad: torch.Tensor, steps: int) -> None:
        """Raise `CalmNonFiniteError` when the prompt's hidden state or a sampled latent was NaN/inf (one sync)."""
        prompt_ok, latents_ok = torch.stack([prompt_finite.all(), (first_bad == steps).all()]).tolist()
        if prompt_ok and latents_ok:
            return
        hint = (
            " The tokens decoded from such values are meaningless (a NaN model decodes padding, which looks like a "
            "stop). The weights are probably non-finite (e.g. a diverged training run): list them with "
            "`[n for n, p in model.named_parameters() if not p.isfinite().all()]`."
        )
        if not prompt_ok:
            rows = (~prompt_finite).nonzero()[:, 0].tolist()
            raise CalmNonFiniteError(f"generate: the backbone's hidden state after the prompt is not finite in rows {rows}." + hint)
        rows = (first_bad < steps).nonzero()[:, 0].tolist()
        raise CalmNonFiniteError(
            f"generate: the generative head sampled non-finite latents (NaN or inf) in rows {rows}, first at step "
            f"{int(first_bad.min())}." + hint
        )

    def _calm_step_runner(self, plan: CalmDecodingPlan, compiled: str | None, cache):
        """(step function, block runner, mode): the runner in the CUDA-graph modes (`modeling_calm_graphs`), else
        None; the mode is the torch.compile mode the step runs under (None: eager)."""
        if compiled is None:
            return type(self)._calm_step, None, None
        if compiled not in GRAPH_MODES:
            return _compiled_step(compiled), None, compiled
        state = self._calm_state
        if not graph_capable_cache(cache):
            logger.warning_once(
                f"calm_compile_mode={compiled!r} needs plain static cache layers, but this backbone's cache has "
                "sliding-window layers (host-side counters a CUDA graph would freeze): decoding with "
                "torch.compile('reduce-overhead') instead."
            )
            state.last_decoding = "compiled (reduce-overhead, static cache; sliding-window cache)"
            return _compiled_step("reduce-overhead"), None, "reduce-overhead"
        inner = GRAPH_MODES[compiled]
        step_fn = type(self)._calm_step if inner is None else _compiled_step(inner)
        capture = self.device.type == "cuda"
        state.last_decoding = (
            f"cuda graphs ({compiled}, static cache)" if capture else f"blocks ({compiled}, not recorded: no CUDA)"
        )
        return step_fn, CalmBlockRunner(self, state, cache, step_fn, compiled, plan.temperature, capture), compiled

    def _calm_decode(self, plan: CalmDecodingPlan, compiled: str | None, static: bool):
        """Prefill, then `steps` decoding steps. Returns (new tokens `[B, new]` after stop masking, latents)."""
        steps, rng = plan.steps, plan.rng
        batch, prompt_chunks = plan.chunk_mask.shape
        k = self.config.patch_size
        device = plan.chunk_ids.device
        run_compiled = compiled is not None
        cache, hidden, mask_at = self._calm_prefill(plan, static, reuse=run_compiled)
        step_positions = plan.num_chunks[None, :, None] + torch.arange(steps, device=device)[:, None, None]  # [G, B, 1]

        step_fn, runner, mode = self._calm_step_runner(plan, compiled, cache)
        cudagraphs = runner is None and "reduce-overhead" in str(mode) and device.type == "cuda"
        tokens_out = torch.empty(batch, steps * k, dtype=torch.long, device=device)
        latents_out = None
        if plan.want_latents:
            latents_out = torch.empty(batch, steps, self.config.latent_size, dtype=self.dtype, device=device)
        stops = _CalmStops(plan, k, device)
        if plan.streamer is not None:
            plan.streamer.put(plan.input_ids.cpu())
        approximate = plan.num_candidates is not None
        # Non-finite values are flagged on the device (no sync per step) and checked once at the end.
        prompt_finite = torch.isfinite(hidden).all(-1)  # [B]
        first_bad = torch.full((batch,), steps, dtype=torch.long, device=device)  # step of a row's first bad latent

        # Blocks of steps: one step each, or (CUDA graphs) up to NOISE_BLOCK_STEPS, never across a noise block.
        sizes = block_sizes(steps, NOISE_BLOCK_STEPS) if runner is not None else [1] * steps
        steps_run = i = 0
        noise_block = uniform_block = None
        for size in sizes:
            block_index = i % NOISE_BLOCK_STEPS
            if block_index == 0:
                count = min(NOISE_BLOCK_STEPS, steps - i)
                if plan.exact:
                    pass  # the exact method draws its own noise inside `draw`
                elif plan.noise is not None:
                    noise_block = plan.noise[i : i + count]
                else:
                    rest = (plan.num_candidates,) if approximate else ()
                    noise_block = rng.head_noise(self.head, count, batch, *rest)
                if approximate:
                    uniform_block = rng.uniform(count, batch)
            position_ids = step_positions[i]
            mask = mask_at(prompt_chunks + i + 1)
            if plan.exact:
                tokens, latents = self._calm_exact_chunk(hidden, plan)
                hidden = self._calm_advance(tokens, cache, position_ids, mask)
                tokens, latents = tokens[None], latents[None]
            elif runner is not None:
                window = slice(block_index, block_index + size)
                tokens, latents, hidden = runner.run(
                    hidden, noise_block[window], uniform_block[window] if approximate else None, position_ids, mask
                )
            else:
                uniforms = uniform_block[block_index] if approximate else None
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                tokens, latents, hidden = step_fn(
                    self, cache, hidden, noise_block[block_index], uniforms, position_ids, mask, plan.temperature
                )
                if run_compiled:
                    hidden = hidden.clone()  # the graph's output buffers are reused by the next replay
                tokens, latents = tokens[None], latents[None]
            # tokens [S, B, K], latents [S, B, Z] for the block's S steps
            tokens_out[:, i * k : (i + size) * k] = tokens.transpose(0, 1).reshape(batch, size * k)
            bad = ~torch.isfinite(latents).all(-1)  # [S, B]
            first_bad = torch.minimum(first_bad, torch.where(bad.any(0), bad.int().argmax(0) + i, steps))
            if latents_out is not None:
                latents_out[:, i : i + size] = latents.transpose(0, 1)
            done = False
            for j in range(size):
                steps_run = i + j + 1
                if stops.after_step(tokens_out[:, : steps_run * k], tokens[j], i + j):
                    done = True
                    break
            i += size
            if done:
                break
        # Steps of a block after the stop were decoded in vain: their latents do not count.
        first_bad = torch.where(first_bad < steps_run, first_bad, steps)
        if plan.streamer is not None:
            plan.streamer.end()
        self._calm_check_finite(prompt_finite, first_bad, steps)

        new_tokens = stops.mask(tokens_out[:, : steps_run * k])[:, : plan.max_new]
        if latents_out is not None:
            latents_out = latents_out[:, :steps_run]
        return new_tokens, latents_out
