"""Configurations of CALM (Continuous Autoregressive Language Models, Shao et al. 2025).

Two configs, one repository:

* :class:`CalmAutoencoderConfig` (``model_type="calm_autoencoder"``): the context-free autoencoder that maps a
  chunk of K tokens to one latent vector and back. It can be saved and used on its own.
* :class:`CalmConfig` (``model_type="calm"``): the language model. It nests the autoencoder's config
  (``autoencoder_config``) and a real transformers decoder config (``backbone_config``, Llama by default), so
  ``config.json`` describes the whole model and one Hub repository holds all of its weights.

Field names follow the authors' configs (``patch_size``, ``latent_size``, ``noise_size``, ``num_mlp_layers``,
``num_samples``, ``beta``) so that their values copy across unchanged.
"""

from __future__ import annotations

import difflib
import inspect
import math

from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["CalmAutoencoderConfig", "CalmConfig", "HEAD_TYPES"]

HEAD_TYPES = ("energy", "flow", "diffusion")
# Noise levels of the diffusion head's training schedule (its sampler visits a subset of them).
DIFFUSION_TRAIN_STEPS = 1000

# Decoder families accepted as the backbone: causal decoders whose state at chunk i depends only on chunks <= i
# (each is tested for that, and for the forward, cache and generation paths, in the test suite). Encoders
# (bert) and encoder-decoders (t5) would let training and BrierLM see the future.
CAUSAL_BACKBONE_TYPES = ("gemma", "gemma2", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3")

# Keys every saved config carries or that transformers passes to a config's __init__ (not unknown fields).
_TRANSFORMERS_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "_experts_implementation", "chunk_size_feed_forward", "id2label", "label2id", "num_labels",
    "is_encoder_decoder", "model_type", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
    "use_cache", "tie_word_embeddings", "tokenizer_class", "task_specific_params", "keys_to_ignore_at_inference",
    "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "base_model_tp_plan", "base_model_pp_plan",
    "_from_model_config", "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss", "_output_attentions",
    "pad_token_id", "bos_token_id", "eos_token_id",
})


def _warn_unknown_keys(config_class: type, kwargs: dict) -> None:
    """Log (as transformers does for unused kwargs) the keys that no field of `config_class` reads, e.g. a typo."""
    own = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(k for k in kwargs if k not in own and k not in _TRANSFORMERS_CONFIG_KEYS and not k.startswith("_"))
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(own), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        logger.warning(
            f"{config_class.__name__} got the unknown key `{key}`: it is kept as an attribute but nothing reads it.{hint}"
        )


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_probability(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")


class CalmAutoencoderConfig(PretrainedConfig):
    r"""Configuration of :class:`CalmAutoencoder`, the chunk autoencoder of CALM (arXiv 2510.27688, section
    "Autoencoder").

    Args:
        vocab_size (`int`): V, size of the token vocabulary.
        hidden_size (`int`): H, width of the autoencoder's residual stream.
        intermediate_size (`int`): width of the SwiGLU MLPs.
        latent_size (`int`): Z, dimension of the latent vector of one chunk.
        patch_size (`int`): K, tokens per chunk (per latent vector).
        num_encoder_layers (`int`): residual MLP blocks of the encoder; half run per token before the K
            positions are squeezed into one, half after. Must be even.
        num_decoder_layers (`int`): the decoder's blocks, split the same way around the expansion.
        rms_norm_eps (`float`): epsilon of the RMSNorms.
        hidden_act (`str`): activation of the SwiGLU gate.
        ae_dropout (`float`): probability of the input token dropout and of the latent dropout (training only).
        kl_clamp (`float`): per-dimension lower clamp of the KL term ("KL clipping", free bits).
        kl_weight (`float`): weight of the KL term in the training loss.
        initializer_range (`float`): std of the normal initialisation of linear and embedding weights.
        tie_word_embeddings (`bool`): tie the output projection to the token embedding (the paper does).
    """

    model_type = "calm_autoencoder"

    def __init__(
        self,
        vocab_size: int = 128257,
        hidden_size: int = 512,
        intermediate_size: int = 1280,
        latent_size: int = 128,
        patch_size: int = 4,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        rms_norm_eps: float = 1e-6,
        hidden_act: str = "silu",
        ae_dropout: float = 0.15,
        kl_clamp: float = 0.5,
        kl_weight: float = 1e-3,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.latent_size = latent_size
        self.patch_size = patch_size
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.ae_dropout = ae_dropout
        self.kl_clamp = kl_clamp
        self.kl_weight = kl_weight
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        _warn_unknown_keys(type(self), kwargs)
        super().__init__(**kwargs)
        self.validate_calm()

    def validate_calm(self) -> None:
        """Raise a `ValueError` naming the field and the rule for any inconsistent value."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            _check_positive_int(name, value, minimum=0)
            if value % 2:
                raise ValueError(
                    f"`{name}` must be even (half of the blocks run before the squeeze/expansion, half after), "
                    f"got {value}."
                )
        _check_probability("ae_dropout", self.ae_dropout)
        if not isinstance(self.kl_weight, (int, float)) or self.kl_weight < 0 or not math.isfinite(self.kl_weight):
            raise ValueError(f"`kl_weight` must be a finite number >= 0, got {self.kl_weight!r}.")
        if not isinstance(self.kl_clamp, (int, float)) or self.kl_clamp < 0 or not math.isfinite(self.kl_clamp):
            raise ValueError(f"`kl_clamp` must be a finite number >= 0, got {self.kl_clamp!r}.")
        if not isinstance(self.rms_norm_eps, (int, float)) or not self.rms_norm_eps > 0:
            raise ValueError(f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps!r}.")


# CALM-M's backbone (the paper's model table), used when no backbone is given.
DEFAULT_BACKBONE = dict(
    hidden_size=1024, intermediate_size=2752, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def _build_backbone_config(backbone_config, vocab_size: int) -> PretrainedConfig:
    """Turn a dict (as read from config.json) or None into a real transformers config, Llama by default."""
    if backbone_config is None:
        return AutoConfig.for_model("llama", vocab_size=vocab_size, **DEFAULT_BACKBONE)
    if isinstance(backbone_config, PretrainedConfig):
        _check_causal_backbone(backbone_config.model_type)
        return backbone_config
    if isinstance(backbone_config, dict):
        values = dict(backbone_config)
        model_type = values.pop("model_type", "llama")
        _check_causal_backbone(model_type)
        try:
            return AutoConfig.for_model(model_type, **values)
        except ValueError as error:
            raise ValueError(
                f"`backbone_config.model_type` must name a transformers decoder family (e.g. 'llama', 'qwen2', "
                f"'mistral'), got {model_type!r}."
            ) from error
    raise ValueError(
        f"`backbone_config` must be None, a dict or a transformers PretrainedConfig, got {type(backbone_config)}."
    )


def _check_causal_backbone(model_type) -> None:
    if model_type not in CAUSAL_BACKBONE_TYPES:
        raise ValueError(
            f"`backbone_config.model_type` {model_type!r} is not an accepted causal decoder: the backbone's state at "
            f"chunk i must depend only on chunks <= i (an encoder such as 'bert' or an encoder-decoder such as 't5' "
            f"would let training and BrierLM see the future). Accepted families: {', '.join(CAUSAL_BACKBONE_TYPES)}."
        )


class CalmConfig(PretrainedConfig):
    r"""Configuration of :class:`CalmForCausalLM` (arXiv 2510.27688, section "Next-Vector Prediction").

    Args:
        autoencoder_config (`dict` or `CalmAutoencoderConfig`): the frozen autoencoder's config (nested).
        backbone_config (`dict` or `PretrainedConfig`): the decoder that runs over compressed chunks; any family
            `AutoModel.from_config` can build (Llama by default). Its `vocab_size` is the token vocabulary and its
            `max_position_embeddings` counts chunks, not tokens.
        patch_size (`int`, *optional*): K, tokens per step. Defaults to the autoencoder's; must agree with it.
        latent_size (`int`, *optional*): Z, latent dimension. Defaults to the autoencoder's; must agree with it.
        noise_size (`int`): dimension of the uniform noise fed to the generative head.
        num_mlp_layers (`int`): residual blocks of the generative head.
        num_samples (`int`): N, head samples per position in the energy loss (>= 2: the diversity term needs
            pairs).
        num_target_samples (`int`): M, samples drawn from the autoencoder posterior of each target chunk.
        beta (`float`): exponent of the distances in the energy score; strictly proper for beta in (0, 2).
        head_type (`str`): "energy" (single-step energy head, the default), "flow" (flow matching) or
            "diffusion" (noise prediction with a DDIM sampler).
        flow_num_steps (`int`): Euler steps of the flow head's sampler.
        diffusion_num_steps (`int`): denoising steps of the diffusion head's (DDIM) sampler; it is trained on
            1,000 noise levels, any number of steps up to 1,000 can sample.
        head_norm_eps (`float`): epsilon of the LayerNorms of the head and of the input compression.
        initializer_range (`float`): std of the normal initialisation of the CALM-specific layers.
    """

    model_type = "calm"
    sub_configs = {"autoencoder_config": CalmAutoencoderConfig, "backbone_config": AutoConfig}
    # The Trainer's default prediction_step must not gather the KV cache (it would try to concatenate it).
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the KV cache under both names (5.24 renamed it)

    def __init__(
        self,
        autoencoder_config: dict | CalmAutoencoderConfig | None = None,
        backbone_config: dict | PretrainedConfig | None = None,
        patch_size: int | None = None,
        latent_size: int | None = None,
        noise_size: int = 64,
        num_mlp_layers: int = 4,
        num_samples: int = 8,
        num_target_samples: int = 100,
        beta: float = 1.0,
        head_type: str = "energy",
        flow_num_steps: int = 8,
        diffusion_num_steps: int = 25,
        head_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if autoencoder_config is None:
            autoencoder_config = CalmAutoencoderConfig()
        elif isinstance(autoencoder_config, dict):
            autoencoder_config = CalmAutoencoderConfig(
                **{k: v for k, v in autoencoder_config.items() if k != "model_type"}
            )
        elif getattr(autoencoder_config, "model_type", None) != CalmAutoencoderConfig.model_type:
            # Duck-typed: remote code loads config classes from different module hashes, so isinstance would fail.
            raise ValueError(
                f"`autoencoder_config` must be a dict or a CalmAutoencoderConfig, got {type(autoencoder_config)}."
            )
        self.autoencoder_config = autoencoder_config
        self.backbone_config = _build_backbone_config(backbone_config, autoencoder_config.vocab_size)
        self.patch_size = autoencoder_config.patch_size if patch_size is None else patch_size
        self.latent_size = autoencoder_config.latent_size if latent_size is None else latent_size
        self.noise_size = noise_size
        self.num_mlp_layers = num_mlp_layers
        self.num_samples = num_samples
        self.num_target_samples = num_target_samples
        self.beta = beta
        self.head_type = head_type
        self.flow_num_steps = flow_num_steps
        self.diffusion_num_steps = diffusion_num_steps
        self.head_norm_eps = head_norm_eps
        self.initializer_range = initializer_range
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if name not in kwargs:
                kwargs[name] = getattr(self.backbone_config, name, None)
        # Derived from the backbone (see the properties): never stored twice.
        for name in ("hidden_size", "vocab_size", "max_position_embeddings"):
            kwargs.pop(name, None)
        _warn_unknown_keys(type(self), kwargs)
        super().__init__(**kwargs)
        self.validate_calm()

    @property
    def hidden_size(self) -> int:
        """D, the backbone's width (read by DeepSpeed/FSDP helpers and by the head)."""
        return self.backbone_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.backbone_config.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        """The context in tokens: the backbone's `max_position_embeddings` counts chunks, each of K tokens. Where
        transformers, pipelines and lm-eval look for a model's context length."""
        return self.backbone_config.max_position_embeddings * self.patch_size

    def validate_calm(self) -> None:
        """Raise a `ValueError` naming the field and the rule for any inconsistent value."""
        ae = self.autoencoder_config
        if hasattr(ae, "validate_calm"):
            ae.validate_calm()
        for name in ("patch_size", "latent_size", "noise_size", "num_target_samples", "flow_num_steps",
                     "diffusion_num_steps"):
            _check_positive_int(name, getattr(self, name))
        if self.diffusion_num_steps > DIFFUSION_TRAIN_STEPS:
            raise ValueError(
                f"`diffusion_num_steps` ({self.diffusion_num_steps}) must be at most the {DIFFUSION_TRAIN_STEPS} noise "
                "levels the diffusion head is trained on."
            )
        _check_positive_int("num_mlp_layers", self.num_mlp_layers, minimum=0)
        _check_positive_int("num_samples", self.num_samples, minimum=2)
        if self.patch_size != ae.patch_size:
            raise ValueError(
                f"`patch_size` (K={self.patch_size}) must equal the autoencoder's patch_size (K={ae.patch_size}): "
                "the model predicts exactly one autoencoder latent per step."
            )
        if self.latent_size != ae.latent_size:
            raise ValueError(
                f"`latent_size` ({self.latent_size}) must equal the autoencoder's latent_size ({ae.latent_size})."
            )
        if self.vocab_size != ae.vocab_size:
            raise ValueError(
                f"The backbone's vocab_size ({self.vocab_size}) must equal the autoencoder's vocab_size "
                f"({ae.vocab_size}): both embed the same tokens."
            )
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"`head_type` must be one of {HEAD_TYPES}, got {self.head_type!r}.")
        beta = self.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < float(beta) < 2.0):
            raise ValueError(
                f"`beta` must lie in the open interval (0, 2), where the energy score is strictly proper; got {beta!r}."
            )
        if not isinstance(self.head_norm_eps, (int, float)) or not self.head_norm_eps > 0:
            raise ValueError(f"`head_norm_eps` must be > 0, got {self.head_norm_eps!r}.")
        for name in ("hidden_size", "vocab_size", "max_position_embeddings"):
            if not hasattr(self.backbone_config, name):
                raise ValueError(f"`backbone_config` ({self.backbone_config.model_type}) has no `{name}`.")

    def to_dict(self) -> dict:
        output = super().to_dict()
        # `hidden_size`/`vocab_size` are properties of the backbone: never write them twice.
        output.pop("hidden_size", None)
        output.pop("vocab_size", None)
        output.pop("max_position_embeddings", None)
        return output
