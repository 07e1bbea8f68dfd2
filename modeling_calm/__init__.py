"""CALM (Continuous Autoregressive Language Models) for the Hugging Face ecosystem.

Importing the package registers the classes with the Auto* factories, so `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM` resolve `model_type` "calm" and "calm_autoencoder" locally, and marks them for
`save_pretrained` to write their code and `auto_map` (remote code for users who never install the package).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_calm import CalmAutoencoderConfig, CalmConfig
from .modeling_calm import CalmCausalLMOutput, CalmForCausalLM, CalmPreTrainedModel
from .modeling_calm_generation import CalmGenerateOutput, CalmGenerationMixin
from .modeling_calm_autoencoder import CalmAutoencoder, CalmAutoencoderOutput
from .modeling_calm_heads import CalmEnergyHead, CalmFlowHead, energy_score


__version__ = "0.1.0"

AutoConfig.register("calm_autoencoder", CalmAutoencoderConfig, exist_ok=True)
AutoConfig.register("calm", CalmConfig, exist_ok=True)
AutoModel.register(CalmAutoencoderConfig, CalmAutoencoder, exist_ok=True)
AutoModel.register(CalmConfig, CalmForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(CalmConfig, CalmForCausalLM, exist_ok=True)

# save_pretrained / push_to_hub write the modeling files and `auto_map` for trust_remote_code loading.
CalmAutoencoderConfig.register_for_auto_class()
CalmAutoencoder.register_for_auto_class("AutoModel")
CalmConfig.register_for_auto_class()
CalmForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def __getattr__(name: str):
    # The trainers import `transformers.Trainer` (and through it accelerate): loaded on first use only, so that
    # importing the package stays light.
    if name in ("CalmTrainer", "CalmAutoencoderTrainer"):
        from .trainer_calm import CalmAutoencoderTrainer, CalmTrainer

        return {"CalmTrainer": CalmTrainer, "CalmAutoencoderTrainer": CalmAutoencoderTrainer}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CalmAutoencoder",
    "CalmAutoencoderTrainer",
    "CalmAutoencoderConfig",
    "CalmAutoencoderOutput",
    "CalmCausalLMOutput",
    "CalmConfig",
    "CalmEnergyHead",
    "CalmFlowHead",
    "CalmForCausalLM",
    "CalmGenerateOutput",
    "CalmGenerationMixin",
    "CalmPreTrainedModel",
    "CalmTrainer",
    "energy_score",
]
