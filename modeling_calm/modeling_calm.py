"""CALM: a Transformer that predicts the next continuous vector instead of the next token (arXiv 2510.27688).

Shape legend of the package (other modules add only letters that are not used here):
    B batch, T tokens, K tokens per chunk (`patch_size`), L = T / K chunks (autoregressive steps), V vocabulary,
    D backbone hidden size, H autoencoder hidden size, Z latent size, E head noise size (`noise_size` of the
    energy head; Z for the flow head, whose noise is its start point x0), S head samples per position
    (`num_samples`), M target samples per position (`num_target_samples`), P target positions flattened over
    (batch, step) and Q the valid ones among them, N candidates per row (temperature sampling), C prompt chunks
    after layout and G decoding steps (generation), R head steps per sample and U scored positions (BrierLM).

One step (the paper's "Next-Vector Prediction" and "Likelihood-Free Language Modeling" sections): the K tokens of
chunk i-1 are embedded by the backbone's token embedding, concatenated and compressed to one D-vector
(`chunk_proj`); the backbone (any transformers decoder, Llama by default) runs over the L compressed positions;
the generative head samples the latent of chunk i from h_{i-1}; the frozen autoencoder decodes it into K tokens.
Training targets are the autoencoder posteriors of chunks 1..L-1 (`next_chunk_targets`). Prompts of any length
are laid out as whole chunks by `layout_prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_calm import CalmConfig
from .modeling_calm_autoencoder import (
    CalmAutoencoder,
    check_token_ids,
    checked_from_pretrained,
    resolve_device_map_strategy,
)
from .modeling_calm_brier import (
    BRIER_LM_MAX_N,
    IGNORE_INDEX,
    brier_indicators,
    score_calm_brier,
    score_calm_brier_seeds,
)
from .modeling_calm_compat import OUTPUT_CACHE_FIELD, backbone_cache_kwarg, output_cache, with_cache_field
from .modeling_calm_generation import CalmGenerationMixin
from .modeling_calm_heads import CALM_HEADS, CalmZeroInitLinear


logger = logging.get_logger(__name__)

__all__ = [
    "CalmCausalLMOutput",
    "CalmChunkProjection",
    "CalmForCausalLM",
    "CalmPreTrainedModel",
    "layout_prompts",
    "next_chunk_targets",
]


# Said when token ids do not fill whole chunks.
_OTHER_LENGTHS = " (generate() handles other lengths)"

# Said to clients that ask for token likelihoods (lm-eval's loglikelihood and multiple-choice requests).
NO_TOKEN_LIKELIHOODS = "CALM has no token likelihoods: only generate_until tasks can run"

# Said when the backbone is called on token ids instead of chunk embeddings.
BACKBONE_READS_CHUNKS = (
    "The CALM backbone reads chunk embeddings (inputs_embeds), not token ids: it was called directly, e.g. by TRL's "
    "SFTTrainer fused LM head, which needs token logits a CALM does not have. Train with CalmTrainer (see "
    "modeling_calm.sft_calm for instruction data)."
)


def _refuse_token_ids(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the backbone: the CALM forward passes chunk embeddings only (`inputs_embeds=`)."""
    if kwargs.get("input_ids") is not None or (args and isinstance(args[0], torch.Tensor)):
        raise ValueError(BACKBONE_READS_CHUNKS)
    return None


def _check_token_values(ids: torch.Tensor, vocab_size: int, name: str, allow_ignore: bool) -> None:
    """Token ids must be integers in [0, V) (labels may also be -100). The range is checked eagerly only: inside a
    compiled graph it would be a host sync that splits the graph."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of token ids, got {type(ids).__name__}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}.")
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if allow_ignore:
        bad &= ids != IGNORE_INDEX
    if bool(bad.any()):
        values = sorted({int(v) for v in ids[bad].unique()[:8].tolist()})
        rule = f"[0, {vocab_size})" + (f" or {IGNORE_INDEX} (not a target)" if allow_ignore else "")
        raise ValueError(f"`{name}` holds {values}: every entry must be a token id in {rule}, V={vocab_size} the vocabulary size.")


def nonfinite_parameters(model: nn.Module, limit: int = 5) -> list[str]:
    """Names of the first `limit` parameters or buffers holding NaN or infinity (floating-point tensors only)."""
    bad = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor.detach()).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def next_chunk_targets(
    labels: torch.LongTensor, patch_size: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """The next-chunk target rule, shared by the forward and the trainer's weighting: h_i predicts chunk i+1.

    Args:
        labels: `[B, T]`, T a multiple of K.
        patch_size: K.
        attention_mask: `[B, T]` token mask or `[B, L]` chunk mask, optional.
    Returns:
        `(target_chunks [B, L-1, K], valid [B, L-1] bool)`: target chunk i+1 of every h_i (labels as given, -100
        included), valid where none of its labels is -100 and neither it nor the conditioning chunk i is padding.
    """
    label_chunks = labels.reshape(labels.shape[0], -1, patch_size)[:, 1:]  # [B, L-1, K] targets of h_0..h_{L-2}
    valid = (label_chunks != IGNORE_INDEX).all(-1)  # [B, L-1]
    if attention_mask is not None:
        chunk_mask = attention_mask
        if chunk_mask.shape[-1] != label_chunks.shape[1] + 1:  # a token mask: a chunk is padding if all of it is
            chunk_mask = chunk_mask.reshape(chunk_mask.shape[0], -1, patch_size).amax(-1)
        # Neither the conditioning chunk nor the target chunk may be padding.
        valid &= chunk_mask[:, :-1].bool() & chunk_mask[:, 1:].bool()
    return label_chunks, valid


def layout_prompts(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    patch_size: int,
    bos_token_id: int | None,
    filler_id: int,
) -> tuple[torch.LongTensor, torch.BoolTensor, torch.LongTensor, torch.LongTensor]:
    """Right-aligned whole-chunk layout of a batch of prompts, the first step of `generate`.

    The model reads whole chunks, so every row is aligned on the RIGHT: its last full chunk ends where its
    prompt ends and the first generated chunk follows directly. The r = len % K leading tokens of a row form
    a partial first chunk, which is completed on the LEFT with the BOS token when the config has one
    (training data puts BOS at document starts, so BOS is the least surprising filler); without BOS those r
    tokens are dropped with a logged warning. Rows shorter than the longest one start with whole pad chunks,
    masked out with the chunk attention mask; positions count from each row's first real chunk, so a row's
    result does not depend on how much padding it got. The attention mask only selects the content tokens
    (in order): left padding is the usual case, but padding anywhere is read the same way.

    Args:
        input_ids: `[B, T]` prompts; attention_mask: `[B, T]`, nonzero on content tokens.
        patch_size: K. bos_token_id: left filler of a partial first chunk (None: drop those tokens).
        filler_id: id written into whole pad chunks (never seen: they are masked).
    Returns:
        `(chunk_ids [B, C*K], chunk_mask [B, C] bool, num_chunks [B], dropped [B])`: the laid-out prompts, which
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
    q = torch.arange(total, device=device)[None] - (total - laid_lengths)[:, None]  # [B, C*K]
    source = (q - fill[:, None] + dropped[:, None]).clamp(0, width - 1)
    chunk_ids = stream.gather(1, source)
    if bos_token_id is not None:
        chunk_ids = torch.where((q >= 0) & (q < fill[:, None]), bos_token_id, chunk_ids)
    chunk_ids = torch.where(q >= 0, chunk_ids, filler_id)
    chunk_mask = (q >= 0).view(batch, -1, k)[:, :, 0]  # [B, C]
    return chunk_ids, chunk_mask, num_chunks, dropped


@dataclass
@with_cache_field
class CalmCausalLMOutput(ModelOutput):
    """Output of :meth:`CalmForCausalLM.forward`.

    Args:
        loss: mean head loss over valid next-chunk targets (the negative energy score for the energy head).
        fidelity: mean of `E||x - y||^beta` (energy head; logged).
        diversity: mean of `E||x - x'||^beta` (energy head; logged).
        brier: `[min(K, 4)]` Brier-1.. estimates from the first two head samples (eval mode, labels given).
        last_hidden_state: `[B, L, D]` backbone output.
        past_key_values: the backbone's cache when `use_cache` (the field is named `cache` on transformers
            releases whose outputs use that name; `out.past_key_values` works on every release).
        hidden_states, attentions: the backbone's, when asked for.
    """

    loss: torch.FloatTensor | None = None
    fidelity: torch.FloatTensor | None = None
    diversity: torch.FloatTensor | None = None
    brier: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None

    @property
    def logits(self):
        # Not a field: clients that read token logits (lm-eval's loglikelihood requests) get the reason, not a
        # generic AttributeError (which `hasattr` would turn into False and ModelOutput's lookup into a KeyError).
        raise ValueError(NO_TOKEN_LIKELIHOODS)


class CalmChunkProjection(nn.Module):
    """Input compression: K token embeddings `[.., K*D]` -> Linear(K*D, 2D) -> SiLU -> Linear(2D, D) -> LayerNorm."""

    def __init__(self, config: CalmConfig):
        super().__init__()
        hidden = config.hidden_size
        self.in_proj = nn.Linear(config.patch_size * hidden, 2 * hidden)
        self.act = nn.SiLU()
        self.out_proj = nn.Linear(2 * hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.head_norm_eps)

    def forward(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        return self.norm(self.out_proj(self.act(self.in_proj(token_embeddings))))


class CalmPreTrainedModel(PreTrainedModel):
    config_class = CalmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CalmAutoencoderBlock", "CalmEnergyBlock", "CalmFlowBlock"]
    # The forward computes its own per-batch mean loss: the Trainer must scale it for gradient accumulation
    # (a `**kwargs` forward would otherwise make it pass `num_items_in_batch` and skip that).
    accepts_loss_kwargs = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, checked (the loading rules of `modeling_calm_autoencoder`).

        A key of the checkpoint that the model lacks, or one of the model that the checkpoint lacks (the frozen
        autoencoder, the head, the input compression or the backbone would keep random weights), or one with
        another shape, is a ValueError naming the keys; integer/bool tensors for floating weights too.
        `ignore_mismatched_sizes=True` re-initialises mismatched keys except the autoencoder's. `device_map`
        strategies ("auto", ...) keep the autoencoder whole on one device. Returns the model, or
        `(model, loading_info)` with `output_loading_info=True`.
        """
        resolve_device_map_strategy(cls, pretrained_model_name_or_path, kwargs)
        return checked_from_pretrained(
            super().from_pretrained, pretrained_model_name_or_path, model_args, kwargs, strict_prefixes=("autoencoder.",)
        )

    @property
    def is_gradient_checkpointing(self) -> bool:
        # The name PEFT reads when wrapping a model; transformers 5.24 deprecates it (FutureWarning) in favour of
        # `is_activation_checkpointing`. The same test as transformers', without the warning, on every release.
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' default initialisation, plus zeros for the heads' `CalmZeroInitLinear` layers:

        | module                                  | weight                  | bias |
        |-----------------------------------------|-------------------------|------|
        | Linear, Embedding                       | N(0, initializer_range) | 0    |
        | LayerNorm, RMSNorm                      | 1                       | 0    |
        | CalmZeroInitLinear (head output, adaLN) | 0                       | 0    |

        The backbone and the autoencoder are transformers sub-models: each is initialised by its own
        `_init_weights` (the autoencoder is then overwritten by its checkpoint anyway).
        """
        if isinstance(module, CalmZeroInitLinear):
            # Zeroed instead of drawn (not drawn, then zeroed): the layers after it get the same random weights
            # from a seed as they always did.
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)


class CalmForCausalLM(CalmPreTrainedModel, CalmGenerationMixin, GenerationMixin):
    """CALM language model: frozen autoencoder + input compression + transformers decoder + generative head.

    Example:

    ```python
    >>> import torch
    >>> from modeling_calm import CalmConfig, CalmForCausalLM

    >>> config = CalmConfig(
    ...     autoencoder_config=dict(vocab_size=99, hidden_size=32, intermediate_size=48, latent_size=8, patch_size=4),
    ...     backbone_config=dict(model_type="llama", vocab_size=99, hidden_size=32, intermediate_size=64,
    ...                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ...     noise_size=8, num_samples=4,
    ... )
    >>> model = CalmForCausalLM(config)
    >>> ids = torch.randint(3, 99, (2, 16))  # 16 tokens = 4 chunks of K=4
    >>> out = model(ids, labels=ids)  # energy loss over the 3 next-chunk targets of each row
    >>> out.last_hidden_state.shape
    torch.Size([2, 4, 32])
    >>> model.generate(ids[:1, :6], max_new_tokens=8, seed=0).shape  # any prompt length; K tokens per step
    torch.Size([1, 14])
    ```
    """

    def __init__(self, config: CalmConfig):
        super().__init__(config)
        self.autoencoder = CalmAutoencoder(config.autoencoder_config)
        self.model = AutoModel.from_config(config.backbone_config)
        # The keyword the backbone takes for its KV cache (renamed in transformers 5.24): decided once, here, so a
        # backbone with neither name fails at construction instead of inside a forward.
        self._cache_kwarg = backbone_cache_kwarg(self.model)
        # A direct call on token ids (TRL's fused LM head) fails here with the reason, not deep inside the library.
        self.model.register_forward_pre_hook(_refuse_token_ids, with_kwargs=True)
        self.chunk_proj = CalmChunkProjection(config)
        self.head = CALM_HEADS[config.head_type](config)
        # Only classes this instance contains: FSDP's default wrap policy (accelerate) rejects names it cannot find,
        # e.g. the flow head's block in an energy-head model.
        present = {type(module).__name__ for module in self.modules()}
        candidates = list(self._no_split_modules) + list(getattr(self.model, "_no_split_modules", None) or [])
        self._no_split_modules = [name for name in dict.fromkeys(candidates) if name in present]
        self.post_init()
        self.freeze_autoencoder()
        self._init_calm_generation_config()

    # ----------------------------------------------------------------------------------------------------------
    # The frozen autoencoder
    # ----------------------------------------------------------------------------------------------------------
    def freeze_autoencoder(self) -> None:
        """No gradients and eval mode for the autoencoder (its dropout must never run in stage 2)."""
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

    def train(self, mode: bool = True):
        # Trainer calls model.train() every step and from_pretrained ends with eval(), after loading fresh
        # Parameters: both pass through here, so the autoencoder stays frozen and in eval mode whatever happens.
        super().train(mode)
        self.freeze_autoencoder()
        return self

    def save_pretrained(self, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, refusing weights that hold NaN or infinity (a diverged model, arXiv
        2510.27688's training is sensitive to it) with a ValueError naming the first such tensors; nothing is written."""
        bad = nonfinite_parameters(self)
        if bad:
            raise ValueError(
                f"Refusing to save a model with non-finite weights: {bad} hold NaN or infinity (the first "
                f"{len(bad)} found). The training probably diverged; save an earlier checkpoint instead."
            )
        # `register_for_auto_class` records one Auto class; the same class also serves AutoModel.
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}")
            self.config.auto_map = auto_map
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def from_autoencoder(
        cls, autoencoder: CalmAutoencoder | str, backbone_config=None, **config_kwargs
    ) -> CalmForCausalLM:
        """Start stage 2: a new CALM around a trained autoencoder (an instance or a path / Hub id).

        `backbone_config` and `config_kwargs` are passed to `CalmConfig`; its K and latent size come from the
        autoencoder. The autoencoder's weights are copied in and frozen; everything else is freshly initialised.
        """
        if isinstance(autoencoder, str):
            autoencoder = CalmAutoencoder.from_pretrained(autoencoder)
        config = CalmConfig(autoencoder_config=autoencoder.config.to_dict(), backbone_config=backbone_config, **config_kwargs)
        model = cls(config)
        model.autoencoder.load_state_dict(autoencoder.state_dict())
        model.to(next(autoencoder.parameters()).dtype)
        return model

    @classmethod
    def from_causal_lm(
        cls, model_or_path, autoencoder: CalmAutoencoder | str, **calm_kwargs
    ) -> CalmForCausalLM:
        """Upcycle a trained causal LM: a new CALM whose backbone is copied from it.

        The decoder layers, the final norm, the rotary settings and the token embedding (which the input
        compression reads) come from `model_or_path` (a transformers causal LM instance, or a path / Hub id loaded
        with `AutoModelForCausalLM`, any decoder family `AutoModel` can build). Its softmax head is dropped; the
        input compression and the generative head are newly initialised; the autoencoder (an instance or a path /
        Hub id) is copied in and frozen. `calm_kwargs` go to `CalmConfig` (head size, `num_samples`, ...).

        The autoencoder must speak the donor's vocabulary: a different `vocab_size` is refused.

        Example:
            >>> calm = CalmForCausalLM.from_causal_lm("my-org/llama-small", autoencoder="my-org/calm-ae-k4")
        """
        if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
            from transformers import AutoModelForCausalLM

            model_or_path = AutoModelForCausalLM.from_pretrained(model_or_path)
        if not isinstance(model_or_path, PreTrainedModel):
            raise ValueError(
                f"`model_or_path` must be a transformers causal LM or a path / Hub id of one, got {type(model_or_path)}."
            )
        if isinstance(autoencoder, (str, bytes)) or hasattr(autoencoder, "__fspath__"):
            autoencoder = CalmAutoencoder.from_pretrained(autoencoder)
        donor_config = model_or_path.config.get_text_config()
        donor_vocab, ae_vocab = donor_config.vocab_size, autoencoder.config.vocab_size
        if donor_vocab != ae_vocab:
            raise ValueError(
                f"The causal LM's vocab_size ({donor_vocab}) must equal the autoencoder's ({ae_vocab}): the CALM feeds "
                "the autoencoder's decoded tokens to the copied token embedding. Train the autoencoder with the "
                "donor's tokenizer."
            )
        donor = getattr(model_or_path, model_or_path.base_model_prefix, None)
        if donor is None or donor is model_or_path:
            raise ValueError(f"{type(model_or_path).__name__} has no decoder under `{model_or_path.base_model_prefix}`.")
        backbone = donor_config.to_dict()
        for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
            backbone.pop(key, None)
        if "backbone_config" in calm_kwargs:
            raise ValueError("`from_causal_lm` takes the backbone's config from the causal LM: do not pass `backbone_config`.")
        model = cls.from_autoencoder(autoencoder, backbone_config=backbone, **calm_kwargs)
        model.model.load_state_dict(donor.state_dict(), strict=True)  # every tensor, or a clear error
        return model.to(model_or_path.dtype)

    # ----------------------------------------------------------------------------------------------------------
    # Embeddings
    # ----------------------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return None  # no softmax head: tokens come from the autoencoder's decoder

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs):
        """Refused: the frozen autoencoder defines the vocabulary (its embedding and decoder are trained for V
        tokens), so neither the backbone's embedding nor the autoencoder can be resized alone. The model is left
        untouched. Train a new autoencoder for another tokenizer."""
        raise ValueError(
            f"resize_token_embeddings({new_num_tokens!r}) is not supported by a CALM: the frozen autoencoder defines "
            f"the vocabulary (V={self.config.vocab_size}) and cannot be resized; nothing was changed. Train an "
            "autoencoder for the new tokenizer and start a CALM from it (CalmForCausalLM.from_autoencoder)."
        )

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def embed_chunks(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Input compression: `[B, L*K]` token ids -> `[B, L, D]` chunk embeddings."""
        check_token_ids(input_ids, self.config.patch_size, hint=_OTHER_LENGTHS)
        batch, tokens = input_ids.shape
        embeddings = self.get_input_embeddings()(input_ids)  # [B, L*K, D]
        return self.chunk_proj(embeddings.reshape(batch, tokens // self.config.patch_size, -1))

    def chunk_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token mask `[B, T]` -> chunk mask `[B, T/K]`; a chunk must be all content or all padding."""
        chunks = attention_mask.reshape(attention_mask.shape[0], -1, self.config.patch_size)
        chunk_mask = chunks.amax(-1)
        # Checked eagerly; a compiled graph skips the check (a host sync that would split the graph).
        if not torch.compiler.is_compiling() and bool((chunks.amin(-1) != chunk_mask).any()):
            raise ValueError(
                "`attention_mask` masks part of a chunk: padding must come in whole chunks of "
                f"K={self.config.patch_size} tokens (pad to a multiple of K; generate() does this for prompts)."
            )
        return chunk_mask

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        return_brier: bool | None = None,
        noise: torch.Tensor | None = None,
        target_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CalmCausalLMOutput:
        r"""Run the backbone over chunks and, with labels, compute the head loss over next-chunk targets.

        Args:
            input_ids: `[B, T]` token ids, T a multiple of K.
            attention_mask: `[B, T]` token mask (or `[B, L]` chunk mask); padding comes in whole chunks. With a
                cache it covers the past chunks too.
            labels: `[B, T]` targets (usually `input_ids`). Target chunk i+1 is predicted from h_i; a chunk
                with any -100 label is left out.
            inputs_embeds: `[B, L, D]` already compressed chunk embeddings (instead of `input_ids`).
            return_brier: report Brier-1..min(K, 4) from two head samples (default: in eval mode with labels).
            noise: explicit head noise (energy head: uniform `[S, Q, E]` in [-0.5, 0.5); flow head: x0 `[Q, Z]`),
                Q the valid target positions in (batch, step) order. For reproducibility and parity tests.
            target_noise: explicit eps of the target samples (energy head `[M, Q, Z]`; flow head `[Q, Z]`).
            generator: torch.Generator for every random draw of the call.
            cache: the same as `past_key_values` (the name transformers uses from 5.24); pass one of the two.
        """
        if cache is not None:
            if past_key_values is not None:
                raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
            past_key_values = cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None:
            _check_token_values(input_ids, self.get_input_embeddings().num_embeddings, "input_ids", allow_ignore=False)
            if labels is None and input_ids.dim() == 2 and input_ids.shape[1] % self.config.patch_size:
                raise ValueError(
                    NO_TOKEN_LIKELIHOODS + f" (forward() reads whole chunks of K={self.config.patch_size} tokens "
                    "(a length that is a multiple of patch_size) and returns no token logits; use generate())."
                )
        if inputs_embeds is None:
            inputs_embeds = self.embed_chunks(input_ids)
        batch, steps = inputs_embeds.shape[:2]

        chunk_mask = None
        if attention_mask is not None:
            total = steps + self._past_length(past_key_values)  # chunks the mask must cover
            if attention_mask.shape[-1] == total * self.config.patch_size:
                chunk_mask = self.chunk_attention_mask(attention_mask)
            elif attention_mask.shape[-1] == total:
                chunk_mask = attention_mask
            else:
                raise ValueError(
                    f"`attention_mask` has {attention_mask.shape[-1]} columns; it must cover the past and current "
                    f"input as tokens ({total * self.config.patch_size}) or as chunks ({total})."
                )
            if position_ids is None:
                # Count positions from the first real chunk, so left padding does not shift them.
                position_ids = (chunk_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -steps:]

        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=chunk_mask,
            position_ids=position_ids,
            use_cache=use_cache if use_cache is not None else False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **{self._cache_kwarg: past_key_values},
        )
        hidden = outputs.last_hidden_state  # [B, L, D]

        loss = fidelity = diversity = brier = None
        if labels is not None:
            # With a cache the chunk mask covers past + current chunks; the targets are the current ones.
            current_mask = chunk_mask[:, -steps:] if chunk_mask is not None else None
            loss, fidelity, diversity, brier = self._next_chunk_loss(
                hidden, labels, current_mask, return_brier, noise, target_noise, generator
            )
        return CalmCausalLMOutput(
            loss=loss,
            fidelity=fidelity,
            diversity=diversity,
            brier=brier,
            last_hidden_state=hidden,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{OUTPUT_CACHE_FIELD: output_cache(outputs) if use_cache else None},
        )

    # ----------------------------------------------------------------------------------------------------------
    # BrierLM (the `score_brier` protocol of evaluation_calm; logic in modeling_calm_brier.py)
    # ----------------------------------------------------------------------------------------------------------
    def score_brier(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        max_n: int = BRIER_LM_MAX_N,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        lazy_decoding: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-chunk-boundary Brier-1..max_n estimates from two independent sampled continuations (arXiv 2510.27688,
        section "Likelihood-Free LM Evaluation").

        Entry i conditions on chunks 0..i and is compared with the next max_n tokens; while K < max_n each sample
        is continued on its own decoded chunks (batched over all boundaries with the KV cache). A CALM is scored
        at every K-th token, a token-level LM at every token: compare BrierLM values, and report the number of
        positions. Details in `modeling_calm_brier` and docs/brierlm.md.

        Args:
            input_ids: `[B, T]` blocks, T a multiple of K.
            labels: `[B, T]` targets (default `input_ids`); a boundary counts only if its max_n targets are inside
                the block and none is -100.
            max_n: largest n-gram order (BrierLM uses 4).
            generator: the only source of randomness; the head noise is drawn on its device (the CPU for a
                default `torch.Generator()`) and moved to the model, so a seed gives the same draws anywhere.
            attention_mask: `[B, T]` token mask (left or right padding). Padding is never scored, nor a boundary
                whose targets or context run into it (a partly padded chunk is read whole, so boundaries after one
                do not count); whole padding chunks are masked out, so they never change the other scores.
            lazy_decoding: project a sampled token onto the vocabulary only while it can still change an estimate
                (same estimates, fewer projections; `modeling_calm_brier.score_calm_brier_seeds`).
        Returns:
            `(brier [B, L, max_n] float32, mask [B, L] bool)`.
        """
        return score_calm_brier(
            self, input_ids, labels=labels, max_n=max_n, generator=generator, attention_mask=attention_mask,
            lazy_decoding=lazy_decoding,
        )

    def score_brier_seeds(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        max_n: int = BRIER_LM_MAX_N,
        generators=(None,),
        attention_mask: torch.Tensor | None = None,
        lazy_decoding: bool = True,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`score_brier` once per generator (e.g. one per seed of `evaluate_brier`), with one backbone forward over
        the blocks for all of them: entry g equals `score_brier(..., generator=generators[g])` (arXiv 2510.27688,
        section "Likelihood-Free LM Evaluation"; `modeling_calm_brier.score_calm_brier_seeds`)."""
        return score_calm_brier_seeds(
            self, input_ids, labels=labels, max_n=max_n, generators=generators, attention_mask=attention_mask,
            lazy_decoding=lazy_decoding,
        )

    def score_brier_ref(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        max_n: int = BRIER_LM_MAX_N,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`score_brier` through the slow loop-over-positions reference sampler (same draws, same output)."""
        return score_calm_brier(
            self, input_ids, labels=labels, max_n=max_n, generator=generator, reference=True,
            attention_mask=attention_mask,
        )

    @staticmethod
    def _scatter_explicit_noise(noise: torch.Tensor | None, valid: torch.Tensor, name: str) -> torch.Tensor | None:
        """Explicit noise is given for the Q valid positions only (dim 1 of `[S|M, Q, E|Z]`, dim 0 of the flow
        head's `[Q, Z]`): spread it over all P positions, zeros at the ignored ones."""
        if noise is None:
            return None
        dim = 1 if noise.dim() == 3 else 0
        index = valid.nonzero().squeeze(-1)
        if noise.dim() not in (2, 3) or noise.shape[dim] != index.numel():
            raise ValueError(
                f"`{name}` of shape {tuple(noise.shape)} must hold one entry per valid target position "
                f"({index.numel()}) along dimension {dim}."
            )
        shape = list(noise.shape)
        shape[dim] = valid.numel()
        return noise.new_zeros(shape).index_copy(dim, index.to(noise.device), noise)

    @staticmethod
    def _past_length(past_key_values) -> int:
        if past_key_values is None:
            return 0
        length = past_key_values.get_seq_length()
        return int(length)

    def _next_chunk_loss(self, hidden, labels, chunk_mask, return_brier, noise, target_noise, generator):
        k = self.config.patch_size
        check_token_ids(labels, k, "labels", hint=_OTHER_LENGTHS)
        _check_token_values(labels, self.config.vocab_size, "labels", allow_ignore=True)
        if labels.shape[0] != hidden.shape[0] or labels.shape[1] != hidden.shape[1] * k:
            raise ValueError(
                f"`labels` shape {tuple(labels.shape)} must match the input: [{hidden.shape[0]}, {hidden.shape[1] * k}]."
            )
        label_chunks, valid = next_chunk_targets(labels, k, chunk_mask)  # [B, L-1, K], [B, L-1]
        # Every position runs through the head and the loss is averaged over the valid ones with weights: no
        # data-dependent shapes and no host sync, so a compiled training step is one graph (CUDA graphs possible)
        # and the CPU can queue kernels ahead of the GPU. Packed pre-training has (almost) every position valid.
        valid = valid.flatten()  # [P], P = B*(L-1), in (batch, step) order
        hidden_all = hidden[:, :-1].flatten(0, 1)  # [P, D]
        targets = label_chunks.flatten(0, 1).clamp(min=0)  # [P, K]; -100 (the only negative label allowed) becomes some token, then weight 0
        noise = self._scatter_explicit_noise(noise, valid, "noise")
        target_noise = self._scatter_explicit_noise(target_noise, valid, "target_noise")
        weights = valid.float()
        count = weights.sum().clamp(min=1.0)

        def valid_mean(values: torch.Tensor) -> torch.Tensor:  # [P, ...] -> mean over the valid positions
            values = values.float()
            keep = valid.reshape(-1, *([1] * (values.dim() - 1)))
            return torch.where(keep, values, torch.zeros_like(values)).sum(0) / count

        with torch.no_grad():
            target_mean, target_log_std = self.autoencoder.encode(targets)  # [P, 1, Z]
        head_loss = self.head.loss(
            hidden_all,
            target_mean[:, 0],
            target_log_std[:, 0],
            noise=noise,
            target_noise=target_noise,
            generator=generator,
        )
        loss = valid_mean(head_loss.loss)  # 0 (and still attached to the graph) when no position is valid
        fidelity = valid_mean(head_loss.fidelity).detach() if head_loss.fidelity is not None else None
        diversity = valid_mean(head_loss.diversity).detach() if head_loss.diversity is not None else None

        brier = None
        if return_brier or (return_brier is None and not self.training):
            with torch.no_grad():
                samples = head_loss.samples
                if samples is None:
                    samples = self.head.sample(hidden_all.unsqueeze(0).expand(2, -1, -1), generator=generator)
                predictions = self.autoencoder.decode_tokens(samples[:2].unsqueeze(-2))  # [2, P, K]
                brier = valid_mean(
                    brier_indicators(predictions[0], predictions[1], targets, max_n=min(k, BRIER_LM_MAX_N))
                )
        return loss, fidelity, diversity, brier
