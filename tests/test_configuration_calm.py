import json
from pathlib import Path

import pytest
import torch

from modeling_calm import CalmAutoencoderConfig, CalmConfig, CalmForCausalLM
from tests.utils import tiny_autoencoder_config, tiny_calm_config

PRESETS = Path(__file__).resolve().parents[1] / "configuration"


def test_round_trip_keeps_nested_configs(tmp_path):
    config = tiny_calm_config(beta=1.5, head_type="flow")
    config.save_pretrained(tmp_path)
    loaded = CalmConfig.from_pretrained(tmp_path)
    assert loaded.autoencoder_config.model_type == "calm_autoencoder"
    assert loaded.autoencoder_config.hidden_size == 32
    assert loaded.backbone_config.model_type == "llama"
    assert loaded.backbone_config.num_key_value_heads == 2
    assert (loaded.beta, loaded.head_type, loaded.patch_size, loaded.latent_size) == (1.5, "flow", 4, 8)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "hidden_size" not in saved and "vocab_size" not in saved  # backbone's, never duplicated


def test_k_and_latent_default_to_the_autoencoder():
    config = CalmConfig(autoencoder_config=tiny_autoencoder_config(patch_size=2, latent_size=6),
                        backbone_config=dict(model_type="llama", vocab_size=99, hidden_size=32,
                                             num_attention_heads=4, intermediate_size=64, num_hidden_layers=1))
    assert (config.patch_size, config.latent_size) == (2, 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch_size=2), "patch_size"),
        (dict(latent_size=7), "latent_size"),
        (dict(head_type="score"), "head_type"),
        (dict(beta=2.0), "beta"),
        (dict(beta=0.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(num_samples=1), "num_samples"),
        (dict(num_target_samples=0), "num_target_samples"),
        (dict(noise_size=0), "noise_size"),
        (dict(backbone=dict(vocab_size=100)), "vocab_size"),
    ],
)
def test_invalid_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_calm_config(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(num_encoder_layers=3), "even"), (dict(ae_dropout=1.0), "ae_dropout"), (dict(patch_size=0), "patch_size"),
     (dict(kl_weight=-1.0), "kl_weight")],
)
def test_invalid_autoencoder_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_autoencoder_config(**kwargs)


def test_unknown_backbone_family_raises():
    with pytest.raises(ValueError, match="model_type"):
        CalmConfig(autoencoder_config=tiny_autoencoder_config(), backbone_config=dict(model_type="not_a_model"))


@pytest.mark.parametrize(
    "name, params_without_ae",
    [("calm-m", 371.7e6), ("calm-l", 735.3e6), ("calm-xl", 1829.8e6)],
)
def test_official_presets_have_the_papers_sizes(name, params_without_ae):
    config = CalmConfig.from_json_file(PRESETS / f"{name}.json")
    with torch.device("meta"):
        model = CalmForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    autoencoder = sum(p.numel() for p in model.autoencoder.parameters())
    # CALM.md section 2 gives the sizes to 0.1M; the autoencoder is "75M" with the 128k vocabulary.
    assert abs((total - autoencoder) - params_without_ae) < 0.05e6
    assert abs(autoencoder - 75.8e6) < 0.1e6
    assert (config.patch_size, config.latent_size, config.noise_size, config.num_mlp_layers) == (4, 128, 64, 4)
    assert config.vocab_size == 128257


def test_autoencoder_and_tiny_presets_load():
    ae = CalmAutoencoderConfig.from_json_file(PRESETS / "autoencoder.json")
    assert (ae.hidden_size, ae.intermediate_size, ae.latent_size, ae.kl_clamp, ae.kl_weight) == (512, 1280, 128, 0.5, 1e-3)
    tiny = CalmConfig.from_json_file(PRESETS / "tiny.json")
    assert tiny.hidden_size <= 64 and tiny.backbone_config.num_hidden_layers <= 2
    CalmForCausalLM(tiny)  # builds
    small = CalmConfig.from_json_file(PRESETS / "small.json")  # the quickstart's CPU model
    assert small.latent_size == small.autoencoder_config.latent_size == 32 and small.patch_size == 4
    assert small.hidden_size == small.autoencoder_config.hidden_size == 128
    assert 1e6 < CalmForCausalLM(small).num_parameters() < 1e7
