"""CALM's generation settings and the decoding plan: what `generate` reads from its arguments and the model's
`GenerationConfig`, how prompts and stopping rules are prepared, and the `CalmDecodingPlan` the run executes
(arXiv 2510.27688, section "Likelihood-Free Temperature Sampling"). `CalmGenerationMixin` in
`modeling_calm_generation` inherits these steps from `CalmGenerationSettingsMixin`.

Shape letters: those of `modeling_calm` (C prompt chunks, G decoding steps, N candidates per row).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.stopping_criteria import MaxTimeCriteria
from transformers.utils import logging

from .modeling_calm_sampling import (
    DEFAULT_MAX_ROUNDS,
    DEFAULT_NUM_CANDIDATES,
    CalmRandom,
    check_positive_int,
    check_temperature,
)


logger = logging.get_logger(__name__)

__all__ = ["CALM_GENERATION_DEFAULTS", "CalmDecodingPlan", "CalmGenerationSettingsMixin"]

# CALM's own generation settings, saved in generation_config.json under these names. They are not transformers'
# `temperature`/`do_sample`: a GenerationConfig with temperature=0.5 and do_sample=False cannot be saved, and CALM
# always samples (it has no likelihoods, hence no greedy decoding).
CALM_GENERATION_DEFAULTS = {
    "calm_temperature": 1.0,
    "calm_sampling_method": "approximate",  # or "exact"; irrelevant at T = 1
    "calm_num_candidates": DEFAULT_NUM_CANDIDATES,  # N of the approximate method (and the exact method's fallback)
    "calm_max_rounds": DEFAULT_MAX_ROUNDS,  # cap on the exact method's rounds of head calls
    "calm_stop_on_bos": True,  # a generated BOS (a new document) stops the row, like an EOS
    "calm_compile": None,  # None: fast decoding on CUDA (see calm_compile_mode); True/False: force
    # "cudagraph": the eager step recorded in CUDA graphs (modeling_calm_graphs; a new shape is ready in about a
    # second); "cudagraph+inductor": the inductor-compiled step recorded the same way; or any torch.compile mode
    # ("reduce-overhead", "default", "max-autotune", ...) or "backend:NAME" for the step compiled on its own.
    "calm_compile_mode": "cudagraph",
    # Refuse a step whose N candidates would need more memory than this many bytes (estimate: `_calm_candidate_memory`);
    # None: DEFAULT_CANDIDATE_MEMORY. Not saved unless set.
    "calm_max_candidate_memory": None,
}
# 4 GiB: the paper's N = 200 at batch 64 on a CALM-M sized model is estimated at about 1.8 GiB, while N = 10^6 on
# a tiny model (8.4 GB, 75 s per call when tried; estimated 5.6 GiB) is refused.
DEFAULT_CANDIDATE_MEMORY = 4 * 2**30
SAMPLING_METHODS = ("approximate", "exact")
# Used when neither max_new_tokens nor max_length is given (transformers' default max_length is 20 in total).
DEFAULT_MAX_NEW_TOKENS = 20
# Head noise is drawn for this many steps at a time (one RNG call per block instead of one per step).
NOISE_BLOCK_STEPS = 16
# Without streamer or stopping criteria, stop tokens are read back to the host (a sync) only this often.
STOP_CHECK_INTERVAL = 8
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
class CalmDecodingPlan:
    """Everything one `generate` call decodes with, fixed before the first step (built by `generate`)."""

    input_ids: torch.LongTensor  # [B, T] the prompts as given (returned in front of the new tokens, streamed)
    chunk_ids: torch.LongTensor  # [B, C*K] the laid-out prompts
    chunk_mask: torch.BoolTensor  # [B, C] which prompt chunks are real
    num_chunks: torch.LongTensor  # [B] real prompt chunks per row
    steps: int  # G = ceil(max_new / K)
    max_new: int  # new tokens returned per row
    stop_ids: list[int]  # tokens that stop a row (kept in the output)
    pad_id: int | None  # fills a row after it stops
    criteria: list  # stopping criteria, called after every chunk
    streamer: object | None
    rng: CalmRandom
    noise: torch.Tensor | None  # explicit head noise [G', B, (N,) E]
    temperature: float
    num_candidates: int | None  # N of the approximate method; None at T = 1 and for the exact method
    exact: bool  # Algorithm 1 (eager only)
    max_rounds: int  # the exact method's cap
    fallback_candidates: int  # N of the exact method's fallback
    want_latents: bool


class _CalmStops:
    """Stop tokens and stopping criteria of one call, checked after every chunk on the device; the host reads the
    state back (a sync) only every `sync_every` steps."""

    def __init__(self, plan: CalmDecodingPlan, patch_size: int, device: torch.device):
        batch = plan.chunk_mask.shape[0]
        self.plan, self.k = plan, patch_size
        self.stop_ids = torch.tensor(plan.stop_ids, dtype=torch.long, device=device)
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # a stop token seen
        self.criteria_step = torch.full((batch,), plan.steps, dtype=torch.long, device=device)  # step a criterion fired
        # Reading the stop state back costs a device sync: only on accelerators is it worth spacing out.
        streaming = plan.streamer is not None or plan.criteria
        self.sync_every = 1 if (streaming or device.type == "cpu") else STOP_CHECK_INTERVAL

    def after_step(self, generated: torch.LongTensor, tokens: torch.LongTensor, i: int) -> bool:
        """Update with step i's chunk `tokens [B, K]` (`generated [B, (i+1)*K]` so far); stream it; True when every
        row has stopped (checked on sync steps only)."""
        plan, k = self.plan, self.k
        has_stops = self.stop_ids.numel() > 0
        running = ~self.stopped  # rows still running before this chunk
        if has_stops:
            self.stopped = self.stopped | torch.isin(tokens, self.stop_ids).any(-1)
        if plan.criteria or plan.streamer is not None:
            so_far = self.mask(generated)
            if plan.streamer is not None and bool(running[0]):
                self._stream(so_far[:, i * k : min((i + 1) * k, plan.max_new)])
            if plan.criteria:
                sequences = torch.cat([plan.input_ids, so_far], 1)
                done = torch.zeros_like(self.stopped)
                for criterion in plan.criteria:
                    result = criterion(sequences, None)
                    done = done | torch.as_tensor(result, device=done.device).bool().expand(done.shape[0])
                self.criteria_step = torch.where(done & (self.criteria_step == plan.steps), i, self.criteria_step)
        if (has_stops or plan.criteria) and (i + 1) % self.sync_every == 0:
            return bool((self.stopped | (self.criteria_step < plan.steps)).all())
        return False

    def mask(self, generated: torch.LongTensor) -> torch.LongTensor:
        """Replace tokens after each row's first stop token, or after the chunk where a criterion fired, by pad."""
        if self.plan.pad_id is None or (self.stop_ids.numel() == 0 and not self.plan.criteria):
            return generated
        positions = torch.arange(generated.shape[1], device=generated.device)[None]  # [1, new]
        keep = positions < (self.criteria_step[:, None] + 1) * self.k
        if self.stop_ids.numel():
            is_stop = torch.isin(generated, self.stop_ids)
            first = torch.where(is_stop.any(1), is_stop.int().argmax(1), generated.shape[1])  # [B]
            keep = keep & (positions <= first[:, None])
        return torch.where(keep, generated, self.plan.pad_id)

    def _stream(self, chunk: torch.LongTensor) -> None:
        """Put the chunk's tokens up to and including a stop token (batch 1)."""
        chunk = chunk[:1]
        if self.stop_ids.numel():
            hits = torch.isin(chunk[0], self.stop_ids).nonzero()
            if hits.numel():
                chunk = chunk[:, : int(hits[0, 0]) + 1]
        self.plan.streamer.put(chunk.cpu())



class CalmGenerationSettingsMixin:
    """The settings, prompt and stopping stages of `generate` (see `CalmGenerationMixin`)."""

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
    # The decoding step (compiled as a whole on the fast path)

    def _calm_settings(self, generation_config, kwargs, explicit) -> tuple[GenerationConfig, dict]:
        # As transformers merges them: the model's generation config, overridden by the fields a caller's config
        # sets to non-default values (so its unset pad/eos ids do not drop the model's).
        gc = copy.deepcopy(self.generation_config) if self.generation_config is not None else GenerationConfig()
        if generation_config is not None:
            if self.generation_config is None:
                gc = copy.deepcopy(generation_config)
            else:
                for name, value in generation_config.to_diff_dict().items():
                    if name != "transformers_version":
                        setattr(gc, name, value)
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
        settings["do_sample"] = kwargs.get("do_sample") is not False  # only an explicit False means deterministic
        for name in _IGNORED_LOGIT_SETTINGS + _ACCEPTED_AND_IGNORED:
            kwargs.pop(name, None)
        gc.do_sample = True  # CALM always samples; also keeps transformers' validation of sampling fields quiet
        unknown = gc.update(**kwargs)
        if unknown:
            raise ValueError(f"generate() got arguments CALM does not use: {sorted(unknown)}.")
        asked = [name for name in ("output_scores", "output_logits") if getattr(gc, name, False)]
        if asked:
            raise ValueError(
                f"CALM has no logits: {' and '.join(f'{name}=True' for name in asked)} cannot be honoured (each step "
                "samples a latent vector from the generative head and decodes it; no distribution over tokens "
                "exists). Drop it; `output_latents=True` with `return_dict_in_generate=True` returns the latents."
            )
        if (gc.num_beams or 1) > 1:
            raise ValueError(f"num_beams={gc.num_beams}: CALM has no likelihoods, so beam search is impossible.")
        self._calm_check_settings(settings)
        return gc, settings

    @staticmethod
    def _calm_check_settings(settings: dict) -> None:
        check_temperature(settings["calm_temperature"])
        method = settings["calm_sampling_method"]
        if method not in SAMPLING_METHODS:
            raise ValueError(f"sampling_method={method!r} is unknown: use one of {SAMPLING_METHODS}.")
        for name in ("calm_num_candidates", "calm_max_rounds"):
            check_positive_int(name.removeprefix("calm_"), settings[name])
        if settings["calm_max_candidate_memory"] is not None:
            check_positive_int("calm_max_candidate_memory", settings["calm_max_candidate_memory"])

    # ------------------------------------------------------------------------------------------------------------
    # generate

    def _calm_prompt_inputs(self, input_ids, attention_mask, gc: GenerationConfig, bos_id: int | None):
        """Checked prompts and mask on the model's device (one BOS when no prompt), repeated for
        `num_return_sequences`, and the number of new tokens."""
        device = self.device
        if input_ids is None:
            if bos_id is None:
                raise ValueError("`input_ids` is required when the config has no `bos_token_id` to start from.")
            input_ids = torch.full((1, 1), bos_id, dtype=torch.long, device=device)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"`input_ids` must be a non-empty [batch, tokens] tensor, got {tuple(input_ids.shape)}.")
        input_ids = input_ids.to(device)
        self._calm_warn_padding(input_ids, attention_mask, gc.pad_token_id)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} must equal `input_ids` {tuple(input_ids.shape)}."
            )
        repeats = gc.num_return_sequences or 1
        if repeats > 1:
            input_ids = input_ids.repeat_interleave(repeats, 0)
            attention_mask = attention_mask.repeat_interleave(repeats, 0)
        prompt_width = input_ids.shape[1]
        max_new = gc.max_new_tokens
        if max_new is None:
            max_new = gc.max_length - prompt_width if gc.max_length is not None else DEFAULT_MAX_NEW_TOKENS
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise ValueError(
                f"max_new_tokens={max_new!r} (or max_length={gc.max_length!r} minus the prompt width {prompt_width}) "
                "must give at least 1 new token."
            )
        return input_ids, attention_mask, max_new

    @staticmethod
    def _calm_warn_padding(input_ids, attention_mask, pad_id: int | None) -> None:
        """Warn, as transformers does, about prompts padded without a mask and about right padding."""
        if attention_mask is None:
            if pad_id is None or input_ids.shape[0] < 2:
                return
            left, right = (input_ids[:, 0] == pad_id).any(), (input_ids[:, -1] == pad_id).any()
            if bool(left):
                logger.warning_once(
                    f"A row of `input_ids` starts with pad_token_id={pad_id} but no `attention_mask` was passed: the "
                    "padding is read as prompt text. Pass the tokenizer's `attention_mask` with padded batches."
                )
        else:
            right = (attention_mask[:, -1] == 0).any()
        if bool(right):
            logger.warning_once(
                "Right padding detected (a prompt row ends in padding): the returned sequences are the prompts as "
                "given followed by the new tokens, so padding would separate a prompt from its continuation. Pad "
                "on the left for generation (`tokenizer.padding_side = 'left'`)."
            )

    @staticmethod
    def _calm_stopping(gc: GenerationConfig, settings: dict, stopping_criteria, bos_id: int | None):
        """(stop token ids, pad id, stopping criteria): EOS (and BOS with `stop_on_bos`) stop a row, `max_time`
        becomes a criterion, and a row that stops is filled with pad (a stop token when pad is unset)."""
        pad_id = gc.pad_token_id
        eos = gc.eos_token_id
        stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
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
        return stop_ids, pad_id, criteria

    def _calm_plan(
        self, input_ids, attention_mask, max_new, bos_id, stop_ids, pad_id, criteria, streamer, settings, *,
        noise, generator, seed, output_latents,
    ) -> CalmDecodingPlan:
        """Lay the prompts out as whole chunks, check the lengths and the sampling set-up, fix the random source."""
        from .modeling_calm import layout_prompts  # here, not on top: modeling_calm imports this module

        k = self.config.patch_size
        batch = input_ids.shape[0]
        steps = -(-max_new // k)
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

        temperature = float(settings["calm_temperature"])
        if not settings["do_sample"]:
            # Deterministic decoding: the head's noise at its centre (0 for the energy head's uniform noise in
            # [-0.5, 0.5) and for the flow/diffusion heads' Gaussian x0), one candidate, no temperature.
            if noise is not None:
                raise ValueError("do_sample=False decodes with zero head noise: pass `noise` or do_sample=False, not both.")
            if temperature != 1.0 or settings["calm_sampling_method"] != "approximate":
                logger.warning_once(
                    f"do_sample=False decodes deterministically (zero head noise, one candidate): temperature="
                    f"{temperature} and sampling_method={settings['calm_sampling_method']!r} are ignored."
                )
            temperature = 1.0
            noise = torch.zeros(steps, batch, self.head.noise_size, device=self.device)
        exact = settings["calm_sampling_method"] == "exact" and temperature < 1.0
        num_cand = settings["calm_num_candidates"] if temperature < 1.0 and not exact else None
        if temperature < 1.0:  # the approximate method's N, or the exact method's fallback N
            self._calm_check_candidate_memory(batch, settings)
        rng = CalmRandom(self.device, generator=generator, seed=seed, batch_size=batch)
        if noise is not None:
            if exact:
                raise ValueError("`noise` is not supported by the exact method (it draws a random number of samples).")
            size = self.head.noise_size
            expected = (batch, num_cand, size) if num_cand else (batch, size)
            if noise.dim() != len(expected) + 1 or tuple(noise.shape[1:]) != expected or noise.shape[0] < steps:
                raise ValueError(
                    f"`noise` must have shape [steps>={steps}, {', '.join(map(str, expected))}] for this call, got "
                    f"{tuple(noise.shape)}."
                )
            noise = noise.to(self.device)
        if exact and rng.per_row is not None:
            raise ValueError("Per-row generators are supported at T = 1 and by the approximate method, not 'exact'.")
        if streamer is not None and batch != 1:
            raise ValueError(f"A streamer needs batch size 1, got {batch} rows.")
        return CalmDecodingPlan(
            input_ids=input_ids, chunk_ids=chunk_ids, chunk_mask=chunk_mask, num_chunks=num_chunks, steps=steps,
            max_new=max_new, stop_ids=stop_ids, pad_id=pad_id, criteria=criteria, streamer=streamer, rng=rng,
            noise=noise, temperature=temperature, num_candidates=num_cand, exact=exact,
            max_rounds=settings["calm_max_rounds"], fallback_candidates=settings["calm_num_candidates"],
            want_latents=bool(output_latents),
        )

    def _calm_candidate_memory(self, batch: int, num_candidates: int) -> int:
        """Estimated bytes of one step's N candidates per row: the head's conditioned hidden states, noise and
        latents, and the autoencoder decoder's activations for K tokens each (its logits run in bounded blocks)."""
        config, ae = self.config, self.config.autoencoder_config
        per_candidate = (
            config.hidden_size * (config.num_mlp_layers + 2)
            + self.head.noise_size
            + 2 * config.latent_size
            + config.patch_size * (3 * ae.hidden_size + ae.intermediate_size)
        )
        selection = 8 * (2 * config.patch_size + 10)  # int64/float64 work of the pick: sorted chunks, counts, levels
        # float32, x2: a layer's input and output are alive together.
        return batch * num_candidates * (2 * 4 * per_candidate + selection)

    def _calm_check_candidate_memory(self, batch: int, settings: dict) -> None:
        num = settings["calm_num_candidates"]
        limit = settings["calm_max_candidate_memory"] or DEFAULT_CANDIDATE_MEMORY
        estimate = self._calm_candidate_memory(batch, num)
        if estimate > limit:
            raise ValueError(
                f"num_candidates={num} at batch size {batch} needs about {estimate / 2**30:.2f} GiB per step for "
                f"the candidates (estimate), above calm_max_candidate_memory={limit} bytes "
                f"({limit / 2**30:.2f} GiB). Lower num_candidates (the paper uses about 200) or the batch size, or "
                "raise calm_max_candidate_memory."
            )

