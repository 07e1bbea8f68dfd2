"""The CALM autoencoder: K tokens <-> one continuous vector, context-free (arXiv 2510.27688, section "Autoencoder").

Shapes follow the legend of `modeling_calm` (H is this model's hidden size).

Encoder (per chunk, no attention between chunks):
    ids [B, T] -> embed [B*L, K, H] -> n/2 residual SwiGLU blocks per token -> flatten [B*L, 1, K*H]
    -> squeeze Linear(K*H, H) -> n/2 blocks -> RMSNorm -> Linear(H, 2Z) -> mean, log_std [B, L, Z]
Decoder (the mirror image):
    latents [B, L, Z] -> Linear(Z, H) -> n/2 blocks -> expand Linear(H, K*H) -> [B*L, K, H] -> n/2 blocks
    -> RMSNorm -> logits = hidden @ E^T [B, T, V] (tied to the encoder's token embedding E)

Training is variational with the paper's "robust latent space" recipe: input token dropout, reparameterised
sampling, latent dropout, and a KL term clamped per dimension from below ("KL clipping").
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from .configuration_calm import CalmAutoencoderConfig
from .modeling_calm_kernels import projection_argmax, projection_argmax_supported


logger = logging.get_logger(__name__)

__all__ = [
    "CalmAutoencoder",
    "CalmAutoencoderOutput",
    "CalmAutoencoderPreTrainedModel",
    "CalmRMSNorm",
    "MAX_LOGITS_PER_BLOCK",
    "check_checkpoint_dtypes",
    "check_loading_info",
    "check_token_ids",
]

# Token id written over dropped input tokens (the authors use 0; any fixed id works, the decoder never sees it).
DROPPED_TOKEN_ID = 0
# Largest block of logits (rows * V) that `decode_tokens` computes at once, each block reduced by argmax at once:
# decoding many latents (generate's candidates, BrierLM's samples) through a 128k vocabulary would otherwise hold
# gigabytes of logits (2^27 bf16 logits = 256 MiB).
MAX_LOGITS_PER_BLOCK = 2**27
# cuBLAS runs a matrix product whose output rows are not a multiple of 8 elements long (Llama 3's 128,257-token
# vocabulary) with slow unaligned kernels: 34 ms instead of about 5 for CALM-M's 25,600 candidate tokens at batch 32
# and N = 200 on an H200 (docs/RESULTS.md). On CUDA `decode_tokens` therefore projects onto the largest multiple of
# this many vocabulary rows and onto the few remaining rows separately.
VOCAB_ALIGNMENT = 64


def check_token_ids(input_ids: torch.Tensor, patch_size: int, name: str = "input_ids", hint: str = "") -> None:
    """Token ids `[B, T]` with T a positive multiple of K, for both models (they read whole chunks)."""
    if input_ids.dim() != 2:
        raise ValueError(f"`{name}` must have shape [batch, tokens], got {tuple(input_ids.shape)}.")
    if input_ids.shape[1] == 0 or input_ids.shape[1] % patch_size:
        raise ValueError(
            f"`{name}` has {input_ids.shape[1]} tokens per row; the model reads whole chunks, so it needs a "
            f"positive multiple of patch_size K={patch_size}{hint}."
        )


@dataclass
class CalmAutoencoderOutput(ModelOutput):
    """Output of :meth:`CalmAutoencoder.forward`.

    Args:
        loss: training: `K * cross_entropy + kl_weight * kl_loss`; eval: plain token cross-entropy.
        logits: `[B, T, V]` reconstruction logits.
        accuracy: share of (non -100) label tokens whose argmax reconstruction is right.
        reconstruction_loss: token cross-entropy (mean over labelled tokens).
        kl_loss: clamped KL, summed over Z and averaged over chunks.
        latent_mean, latent_log_std: `[B, L, Z]` posterior parameters.
        latents: `[B, L, Z]` the latents that were decoded.
        last_hidden_state: `[B, T, Z]` every token's chunk code: token t carries the posterior mean of its chunk
            t // K. A mean over the attention mask (sentence-transformers' mean pooling) is then the mean of the
            chunk codes, each chunk weighted by its number of real tokens (all equal when the text fills whole
            chunks; whole padding chunks never count) -- the pooled chunk embedding of arXiv 2510.27688's
            autoencoder.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    latent_mean: torch.FloatTensor | None = None
    latent_log_std: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


def split_argmax_projection(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, split: int
) -> torch.LongTensor:
    """`argmax(F.linear(hidden, weight, bias), -1)` computed as two products, over vocabulary rows `[:split]` and
    `[split:]`; a row of the second part wins only when strictly larger, so ties go to the lower index as in
    `torch.argmax`. `hidden [R, H]`, `weight [V, H]` -> `[R]`."""
    main = F.linear(hidden, weight[:split], None if bias is None else bias[:split])  # [R, split]
    rest = F.linear(hidden, weight[split:], None if bias is None else bias[split:])  # [R, V - split]
    main_index, rest_index = main.argmax(-1, keepdim=True), rest.argmax(-1, keepdim=True)
    rest_wins = rest.gather(-1, rest_index) > main.gather(-1, main_index)
    return torch.where(rest_wins, rest_index + split, main_index)[:, 0]


# The Triton kernel runs as it is inside a compiled decoding step (a graph break), not traced by dynamo.
_compiler_free_projection_argmax = torch.compiler.disable(projection_argmax)


class CalmRMSNorm(nn.Module):
    """RMSNorm computed in float32, as in Llama (the reference uses the same arithmetic)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(dtype)


class CalmAutoencoderMLP(nn.Module):
    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CalmAutoencoderBlock(nn.Module):
    """Pre-norm residual block `x + MLP(RMSNorm(x))`, applied to every position on its own."""

    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__()
        self.norm = CalmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CalmAutoencoderMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class CalmAutoencoderEncoder(nn.Module):
    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__()
        hidden, k = config.hidden_size, config.patch_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList(CalmAutoencoderBlock(config) for _ in range(config.num_encoder_layers))
        self.squeeze_proj = nn.Linear(k * hidden, hidden)
        self.norm = CalmRMSNorm(hidden, config.rms_norm_eps)
        self.latent_proj = nn.Linear(hidden, 2 * config.latent_size)
        self.patch_size = k

    def forward(self, chunk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # chunk_ids: [N, K] -> mean, log_std [N, Z]
        x = self.embed_tokens(chunk_ids)  # [N, K, H]
        half = len(self.layers) // 2
        for layer in self.layers[:half]:
            x = layer(x)
        x = self.squeeze_proj(x.flatten(1))  # [N, H]
        for layer in self.layers[half:]:
            x = layer(x)
        mean, log_std = self.latent_proj(self.norm(x)).chunk(2, dim=-1)
        return mean, log_std


class CalmAutoencoderDecoder(nn.Module):
    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__()
        hidden, k = config.hidden_size, config.patch_size
        self.latent_proj = nn.Linear(config.latent_size, hidden)
        self.layers = nn.ModuleList(CalmAutoencoderBlock(config) for _ in range(config.num_decoder_layers))
        self.expand_proj = nn.Linear(hidden, k * hidden)
        self.norm = CalmRMSNorm(hidden, config.rms_norm_eps)
        self.patch_size = k

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # latents: [N, Z] -> hidden states [N, K, H]
        x = self.latent_proj(latents)
        half = len(self.layers) // 2
        for layer in self.layers[:half]:
            x = layer(x)
        x = self.expand_proj(x).unflatten(-1, (self.patch_size, -1))  # [N, K, H]
        for layer in self.layers[half:]:
            x = layer(x)
        return self.norm(x)


class CalmAutoencoderPreTrainedModel(PreTrainedModel):
    config_class = CalmAutoencoderConfig
    base_model_prefix = "autoencoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["CalmAutoencoderBlock"]
    # Per-batch mean loss: the Trainer must scale it for gradient accumulation (a `**kwargs` forward would make it
    # pass `num_items_in_batch` instead).
    accepts_loss_kwargs = False
    # No attention inside: every attention implementation a parent model asks for is fine.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' default initialisation, which is CALM's for every layer of the autoencoder:

        | module            | weight                  | bias |
        |-------------------|-------------------------|------|
        | Linear, Embedding | N(0, initializer_range) | 0    |
        | LayerNorm         | 1                       | 0    |
        | RMSNorm           | 1                       | -    |
        """
        super()._init_weights(module)


class CalmAutoencoder(CalmAutoencoderPreTrainedModel):
    """Chunk autoencoder of CALM. Usable alone, e.g. as a chunk embedding model (`encode(...)[0]`)."""

    _tied_weights_keys = {"lm_head.weight": "encoder.embed_tokens.weight"}
    # `decode_tokens`/`argmax_tokens` on CUDA with Triton, bf16/fp16: project and take the argmax in one kernel
    # (`modeling_calm_kernels.projection_argmax`), the logits never in memory. Set False on an instance for
    # torch's product followed by `argmax`; the tokens differ only where two logits are equal up to rounding.
    fused_projection_argmax: bool = True
    # Row counts (exclusive, inclusive] for which torch's aligned product + argmax beat the kernel on an H200
    # (0.358 against 0.381 ms at 800 rows, batch 1 with N = 200; `benchmarks/bench_projection_argmax.py`): those
    # stay unfused. Fewer rows (T = 1) or more (batches of candidates) go through the kernel.
    unfused_projection_rows: tuple[int, int] = (16, 1024)

    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__(config)
        self.encoder = CalmAutoencoderEncoder(config)
        self.decoder = CalmAutoencoderDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, checked: every key of the autoencoder must be in the checkpoint, with
        its shape, and no other (ValueError naming the keys), and no integer/bool tensor may fill a floating
        weight. Returns the model, or `(model, loading_info)` with `output_loading_info=True`."""
        return checked_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, model_args, kwargs)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def encode(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of every chunk.

        Args:
            input_ids: `[B, T]` token ids, T a multiple of K.
        Returns:
            `(latent_mean, latent_log_std)`, each `[B, T / K, Z]`. The mean is the deterministic chunk code.
        """
        check_token_ids(input_ids, self.config.patch_size)
        k = self.config.patch_size
        # Explicit sizes: a batch of zero rows (no target chunk at all) has no size to infer for a -1.
        batch, chunks, latent = input_ids.shape[0], input_ids.shape[1] // k, self.config.latent_size
        mean, log_std = self.encoder(input_ids.reshape(batch * chunks, k))
        return mean.view(batch, chunks, latent), log_std.view(batch, chunks, latent)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Logits of the K tokens of every latent.

        Args:
            latents: `[..., L, Z]` latent vectors.
        Returns:
            `[..., L * K, V]` logits; `argmax(-1)` reads off the tokens.
        """
        if latents.shape[-1] != self.config.latent_size:
            raise ValueError(
                f"`latents` must end in latent_size={self.config.latent_size}, got shape {tuple(latents.shape)}."
            )
        lead = latents.shape[:-2]
        hidden = self.decoder(latents.reshape(-1, latents.shape[-1]))  # [N, K, H]
        logits = self.lm_head(hidden)
        return logits.view(*lead, -1, logits.shape[-1])

    @torch.no_grad()
    def decode_tokens(
        self,
        latents: torch.Tensor,
        max_logits_per_block: int = MAX_LOGITS_PER_BLOCK,
        num_tokens: int | None = None,
    ) -> torch.LongTensor:
        """Argmax tokens of every latent: `[..., L, Z]` -> `[..., L * K]`, the one latent -> token decoder.

        The vocabulary projection runs in row blocks of at most `max_logits_per_block` logits, in the model's dtype,
        each reduced by argmax at once, so the float logits of all latents never exist together. Same tokens as
        `decode(latents).argmax(-1)`. On CUDA with Triton, in bf16 or fp16, one fused kernel projects and reduces
        without writing any logit (`fused_projection_argmax`); its tokens can differ from the unfused ones only
        where two logits are equal up to one rounding step of the dtype.

        `num_tokens` (1..K, default K) keeps only the first `num_tokens` tokens of every chunk: `[..., L *
        num_tokens]`, the same tokens as the full decode at those places, without projecting the others onto
        the vocabulary (BrierLM needs only the first max_n tokens of a continuation).
        """
        states = self.decoder_states(latents)  # [N, K, H]
        if num_tokens is not None:
            k = states.shape[1]
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= k:
                raise ValueError(
                    f"num_tokens must be an integer in [1, K={states.shape[1]}] (tokens kept per chunk), got "
                    f"{num_tokens!r}."
                )
            states = states[:, :num_tokens]
        tokens = self.argmax_tokens(states.reshape(-1, states.shape[-1]), max_logits_per_block)  # [N*K']
        return tokens.view(*latents.shape[:-2], -1)

    def decoder_states(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoder output before the vocabulary projection: `[..., L, Z]` -> `[N, K, H]`, N = the number of
        latents (in order), in the model's dtype. `argmax_tokens` turns any subset of its rows into tokens."""
        if latents.shape[-1] != self.config.latent_size:
            raise ValueError(
                f"`latents` must end in latent_size={self.config.latent_size}, got shape {tuple(latents.shape)}."
            )
        return self.decoder(latents.reshape(-1, latents.shape[-1]).to(self.lm_head.weight.dtype))

    @torch.no_grad()
    def argmax_tokens(self, states: torch.Tensor, max_logits_per_block: int = MAX_LOGITS_PER_BLOCK) -> torch.Tensor:
        """Argmax token of every decoder state `[M, H]` -> `[M]`, projected in row blocks of at most
        `max_logits_per_block` logits (see `decode_tokens`)."""
        if self._fuses_projection(states):
            return _compiler_free_projection_argmax(states, self.lm_head.weight)
        rows = max(1, max_logits_per_block // self.config.vocab_size)
        return torch.cat([self._argmax_tokens(part) for part in states.split(rows)])

    def _plain_lm_head(self) -> bool:
        """Whether `lm_head` is a bare `nn.Linear` (no hooks, no accelerate offload hook), so its weight may be
        multiplied directly instead of calling the module."""
        head = self.lm_head
        return type(head) is nn.Linear and not (
            head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook")
        )

    def _fuses_projection(self, states: torch.Tensor) -> bool:
        return (
            self.fused_projection_argmax
            and not self.unfused_projection_rows[0] < states.shape[0] <= self.unfused_projection_rows[1]
            and self._plain_lm_head()
            and self.lm_head.bias is None
            and projection_argmax_supported(states, self.lm_head.weight)
        )

    def _argmax_tokens(self, hidden: torch.Tensor) -> torch.LongTensor:
        """`argmax(lm_head(hidden), -1)` for `[R, H]`: on CUDA, with an unaligned vocabulary and a plain Linear, as
        the argmax over the aligned rows and over the rest (a rest row wins only when strictly larger, so ties go to
        the lower index, as in `torch.argmax`)."""
        head = self.lm_head
        vocab = head.weight.shape[0]
        aligned = vocab - vocab % VOCAB_ALIGNMENT
        if not (hidden.is_cuda and vocab % 8 and aligned and self._plain_lm_head()):
            return head(hidden).argmax(-1)
        return split_argmax_projection(hidden, head.weight, head.bias, aligned)

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sample_latents: bool = True,
        latent_noise_std: float = 0.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CalmAutoencoderOutput:
        r"""Encode, sample a latent, decode.

        Args:
            input_ids: `[B, T]`, T a multiple of K.
            labels: `[B, T]` reconstruction targets (usually `input_ids`); -100 is ignored. The loss is
                computed when labels are given; accuracy is measured against labels, else against `input_ids`.
            attention_mask: accepted for `Trainer`/collator compatibility; positions with 0 are left out of the
                loss and accuracy (the autoencoder itself is context-free).
            sample_latents: draw `z = mean + std * eps` (the paper does, in eval mode too); `False` decodes the
                posterior mean, the deterministic code.
            latent_noise_std: extra Gaussian noise of this std added to z (robustness checks of the latent space).
            noise: explicit `eps` for the reparameterisation, any shape with `B * L * Z` elements (reproducibility).
            generator: torch.Generator for eps when `noise` is None.
        """
        check_token_ids(input_ids, self.config.patch_size)
        if latent_noise_std < 0:
            raise ValueError(f"`latent_noise_std` must be >= 0, got {latent_noise_std}.")
        config = self.config
        targets = input_ids if labels is None else labels
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"`labels` shape {tuple(labels.shape)} must equal `input_ids` {tuple(input_ids.shape)}.")
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask == 0, -100)

        encoder_ids = input_ids
        if self.training and config.ae_dropout > 0:
            # Input token dropout: the encoder learns codes that survive corrupted chunks.
            drop = torch.rand(input_ids.shape, device=input_ids.device, generator=generator) < config.ae_dropout
            encoder_ids = input_ids.masked_fill(drop, DROPPED_TOKEN_ID)
        mean, log_std = self.encode(encoder_ids)  # [B, L, Z]

        latents = mean
        if sample_latents:
            if noise is None:
                noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
            latents = mean + noise.reshape(mean.shape).to(mean.dtype) * torch.exp(log_std)
        if latent_noise_std > 0:
            latents = latents + latent_noise_std * torch.randn(
                latents.shape, device=latents.device, dtype=latents.dtype, generator=generator
            )
        if self.training and config.ae_dropout > 0:
            latents = F.dropout(latents, p=config.ae_dropout, training=True)

        logits = self.decode(latents)  # [B, T, V]
        flat_targets = targets.reshape(-1)
        valid = flat_targets != -100
        predictions = logits.argmax(-1).reshape(-1)
        accuracy = (predictions[valid] == flat_targets[valid]).float().mean() if valid.any() else None

        loss = reconstruction_loss = kl_loss = None
        if labels is not None:
            flat_logits = logits.reshape(-1, logits.shape[-1]).float()
            if valid.any():
                reconstruction_loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
            else:
                # No labelled token: cross_entropy's mean over nothing is NaN. A zero that stays attached to the
                # graph lets a training step run (and change nothing) instead of poisoning the weights.
                reconstruction_loss = flat_logits.sum() * 0.0
            # KL(q || N(0, I)) per dimension, clamped from below ("KL clipping"), summed over Z, mean over chunks.
            kl = 0.5 * (mean.float().pow(2) + torch.exp(2 * log_std.float()) - 1 - 2 * log_std.float())
            # Chunks without any labelled token (padding, fully ignored) are left out, as in the reconstruction term.
            chunk_has_target = valid.view(mean.shape[0], mean.shape[1], config.patch_size).any(-1)  # [B, L]
            kl_per_chunk = kl.clamp(min=config.kl_clamp).sum(-1)  # [B, L]
            kl_loss = torch.where(chunk_has_target, kl_per_chunk, torch.zeros_like(kl_per_chunk)).sum() / (
                chunk_has_target.sum().clamp(min=1)
            )
            if self.training:
                loss = config.patch_size * reconstruction_loss + config.kl_weight * kl_loss
            else:
                loss = reconstruction_loss

        return CalmAutoencoderOutput(
            loss=loss,
            logits=logits,
            accuracy=accuracy,
            reconstruction_loss=reconstruction_loss,
            kl_loss=kl_loss,
            latent_mean=mean,
            latent_log_std=log_std,
            latents=latents,
            last_hidden_state=mean.repeat_interleave(config.patch_size, dim=1),
        )


# ----------------------------------------------------------------------------------------------------------------
# Checked loading: a CALM's frozen autoencoder is never trained again, so a tensor that is missing from a checkpoint
# (and would be left at its random initialisation) or one whose dtype cannot hold trained weights is an error.
# ----------------------------------------------------------------------------------------------------------------
# safetensors dtype names of integer and bool tensors: cast into a floating parameter they carry no trained weights.
_NON_FLOAT_SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}
# Hub arguments of `from_pretrained` that locate the checkpoint files.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# The strategies transformers resolves through accelerate (any other string names a device).
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# Keys a loading error names per kind (a checkpoint without its autoencoder misses dozens).
_MAX_KEYS_NAMED = 16


def check_loading_info(model_name: str, info, ignore_mismatched_prefixes: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming every missing, unexpected or mismatched key of transformers' loading report.

    `info` is what `from_pretrained(..., output_loading_info=True)` returns; transformers has already removed the
    keys it treats as ignorable (non-persistent buffers, `_keys_to_ignore_on_load_*`) and the tied copies.
    Mismatched keys under `ignore_mismatched_prefixes` pass (the caller asked for `ignore_mismatched_sizes=True`).
    """
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = info.get(kind) if isinstance(info, dict) else getattr(info, kind, None)
        names = sorted(key if isinstance(key, str) else key[0] for key in (keys or ()))
        if kind == "mismatched_keys" and ignore_mismatched_prefixes:
            names = [name for name in names if not name.startswith(ignore_mismatched_prefixes)]
        if names:
            shown = ", ".join(names[:_MAX_KEYS_NAMED]) + (
                f", ... ({len(names)} in all)" if len(names) > _MAX_KEYS_NAMED else ""
            )
            problems.append(f"{len(names)} {kind.replace('_', ' ')}: {shown}")
    if problems:
        raise ValueError(
            f"The checkpoint does not match {model_name}: every tensor must be in it with the model's name and shape, "
            f"or loading would keep random weights ({'; '.join(problems)}). Check that the folder holds the "
            "complete model (for a CALM: autoencoder, backbone, input compression and head)."
        )


def _safetensors_dtypes(path: str) -> dict[str, str]:
    """Tensor name -> safetensors dtype name, read from the file's JSON header (8-byte little-endian length)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {name: entry["dtype"] for name, entry in header.items()}


def _checkpoint_safetensors_files(pretrained_model_name_or_path, kwargs: dict) -> list[str]:
    """The local paths of the safetensors files `from_pretrained` read (a single file or the shards of an index)."""
    from transformers.utils import cached_file

    hub = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
    lookup = dict(hub, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    path = str(pretrained_model_name_or_path)
    if os.path.isfile(path):
        return [path] if path.endswith(".safetensors") else []
    single = cached_file(path, "model.safetensors", **lookup)
    if single is not None:
        return [single]
    index = cached_file(path, "model.safetensors.index.json", **lookup)
    if index is None:
        return []
    with open(index) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    return [file for file in (cached_file(path, shard, **lookup) for shard in shards) if file is not None]


def check_checkpoint_dtypes(model: nn.Module, pretrained_model_name_or_path, kwargs: dict) -> None:
    """Refuse integer or bool checkpoint tensors loaded into floating parameters (the cast would hide a broken
    checkpoint: such a tensor never held trained weights)."""
    try:
        files = _checkpoint_safetensors_files(pretrained_model_name_or_path, kwargs)
    except (OSError, ValueError) as error:  # the load itself succeeded; only the header lookup failed
        logger.warning(f"Could not read the safetensors headers of {pretrained_model_name_or_path} ({error}).")
        return
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    bad = []
    for file in files:
        for name, dtype in _safetensors_dtypes(file).items():
            target = targets.get(name)
            if target is not None and dtype in _NON_FLOAT_SAFETENSORS_DTYPES and target.is_floating_point():
                bad.append(f"{name} ({dtype} -> {target.dtype})")
    if bad:
        raise ValueError(
            f"The checkpoint stores integer or bool tensors for floating parameters of {type(model).__name__}: "
            f"{', '.join(sorted(bad))}. Casting them would lose the information of trained weights (the checkpoint "
            "is corrupted or was converted wrongly); write the weights in a floating dtype."
        )


def checked_from_pretrained(load, pretrained_model_name_or_path, model_args, kwargs: dict, strict_prefixes=("",)):
    """`load(...)` (a `PreTrainedModel.from_pretrained`) followed by the key and dtype checks above.

    Returns what the caller asked for: the model, or `(model, loading_info)` with `output_loading_info=True`.
    Keys under `strict_prefixes` are refused even when mismatched sizes were allowed.
    """
    want_info = kwargs.pop("output_loading_info", False)
    model, info = load(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
    lenient = ()
    if kwargs.get("ignore_mismatched_sizes"):
        keys = info.get("mismatched_keys") if isinstance(info, dict) else getattr(info, "mismatched_keys", ())
        lenient = tuple(
            {key[0] for key in keys or () if not any(key[0].startswith(prefix) for prefix in strict_prefixes)}
        )
    check_loading_info(type(model).__name__, info, ignore_mismatched_prefixes=lenient)
    check_checkpoint_dtypes(model, pretrained_model_name_or_path, kwargs)
    return (model, info) if want_info else model


def resolve_device_map_strategy(cls, pretrained_model_name_or_path, kwargs: dict) -> None:
    """Turn `device_map="auto"` (or another accelerate strategy) into an explicit map, in `kwargs`.

    transformers sizes tied modules by matching module names as substrings, so a top-level module named `head`
    "contains" `autoencoder.lm_head.weight` and the sizing fails with an IndexError. Every tie of a CALM lies
    inside one module (the autoencoder's embedding / output projection): that module is kept whole on one
    device and the map is inferred without the tie groups, with the same memory rules transformers applies.
    """
    strategy = kwargs.get("device_map")
    if not isinstance(strategy, str) or strategy not in _DEVICE_MAP_STRATEGIES:
        return
    from transformers import PretrainedConfig
    from transformers.integrations.accelerate import get_balanced_memory, get_max_memory, infer_auto_device_map

    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        hub = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
        config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub)
    with torch.device("meta"):
        meta = cls(config)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "auto"))
    if dtype == "auto" or dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    meta.to(dtype)
    no_split = set(meta._no_split_modules or ())
    for target, source in meta.all_tied_weights_keys.items():
        common = os.path.commonprefix([target.split("."), source.split(".")])
        if common:
            no_split.add(type(meta.get_submodule(".".join(common))).__name__)
    max_memory = kwargs.get("max_memory")
    if strategy == "sequential":
        max_memory = get_max_memory(max_memory)
    else:
        max_memory = get_balanced_memory(
            meta, max_memory=max_memory, no_split_module_classes=list(no_split), low_zero=strategy == "balanced_low_0"
        )
    kwargs["device_map"] = infer_auto_device_map(
        meta, max_memory=max_memory, no_split_module_classes=list(no_split), tied_parameters=[[]]
    )
    logger.info(f"device_map={strategy!r} resolved to {kwargs['device_map']}")
