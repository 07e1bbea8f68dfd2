"""Backbone families: only causal decoders are accepted, each checked for causality; unknown config keys are
reported; the context length is exposed in tokens where transformers and lm-eval look for it."""

import logging

import pytest
import torch

from modeling_calm import CalmAutoencoderConfig, CalmConfig, CalmForCausalLM
from modeling_calm.configuration_calm import CAUSAL_BACKBONE_TYPES
from tests.utils import tiny_autoencoder_config, tiny_calm_config

EXTRA = {"gemma": dict(head_dim=8), "gemma2": dict(head_dim=8), "mistral": dict(sliding_window=None),
         "qwen2": dict(), "qwen3": dict(head_dim=8), "phi3": dict(), "olmo2": dict(), "llama": dict()}


@pytest.mark.parametrize("family", CAUSAL_BACKBONE_TYPES)
def test_every_accepted_family_is_causal_over_chunks_and_decodes_with_its_cache(family):
    torch.manual_seed(0)
    model = CalmForCausalLM(tiny_calm_config(backbone=dict(model_type=family, **EXTRA[family]))).eval()
    ids = torch.randint(3, 99, (2, 24))
    changed = ids.clone()
    changed[:, -4:] = torch.randint(3, 99, (2, 4))  # only the last chunk differs
    changed[:, -4:] = torch.where(changed[:, -4:] == ids[:, -4:], (ids[:, -4:] + 1) % 96 + 3, changed[:, -4:])
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
        assert torch.equal(a[:, :-1], b[:, :-1]), family  # chunks 0..L-2 never see the last one
        assert not torch.allclose(a[:, -1], b[:, -1])
        prefix = model(ids[:, :16], use_cache=True)
        step = model(ids[:, 16:], past_key_values=prefix.past_key_values, use_cache=True)
        torch.testing.assert_close(step.last_hidden_state, a[:, 4:], rtol=1e-4, atol=1e-4)
        out = model.generate(ids[:, :9], max_new_tokens=8, seed=0)
    assert out.shape == (2, 17)


@pytest.mark.parametrize("family", ["bert", "t5", "roberta", "not_a_model"])
def test_encoders_and_encoder_decoders_are_refused(family):
    with pytest.raises(ValueError, match=rf"{family!r} is not an accepted causal decoder.*llama"):
        tiny_calm_config(backbone=dict(model_type=family))
    from transformers import AutoConfig

    if family != "not_a_model":
        with pytest.raises(ValueError, match="not an accepted causal decoder"):
            CalmConfig(autoencoder_config=tiny_autoencoder_config(), backbone_config=AutoConfig.for_model(family))


def _warnings(caplog, make):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers").propagate = True  # so caplog sees the library's records
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        make()
    return [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]


def test_unknown_config_keys_are_reported_with_a_suggestion(caplog):
    messages = _warnings(caplog, lambda: tiny_calm_config(patchsize=4))
    assert len(messages) == 1 and "`patchsize`" in messages[0] and "Did you mean `patch_size`?" in messages[0]
    messages = _warnings(caplog, lambda: tiny_autoencoder_config(latent_dim=8))
    assert len(messages) == 1 and "CalmAutoencoderConfig" in messages[0] and "`latent_dim`" in messages[0]


def test_saved_configs_load_back_without_unknown_key_warnings(tmp_path, caplog):
    config = tiny_calm_config()
    config.save_pretrained(tmp_path / "calm")
    tiny_autoencoder_config().save_pretrained(tmp_path / "ae")
    assert _warnings(caplog, lambda: CalmConfig.from_pretrained(tmp_path / "calm")) == []
    assert _warnings(caplog, lambda: CalmAutoencoderConfig.from_pretrained(tmp_path / "ae")) == []
    assert _warnings(caplog, lambda: CalmForCausalLM(config).save_pretrained(tmp_path / "model")) == []
    assert _warnings(caplog, lambda: CalmForCausalLM.from_pretrained(tmp_path / "model")) == []


def test_context_length_is_exposed_in_tokens_and_not_saved_twice(tmp_path):
    config = tiny_calm_config()
    assert config.max_position_embeddings == config.backbone_config.max_position_embeddings * config.patch_size == 256
    config.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "config.json").read_text())
    assert "max_position_embeddings" not in saved and saved["backbone_config"]["max_position_embeddings"] == 64
    assert CalmConfig.from_pretrained(tmp_path).max_position_embeddings == 256
    # A stray top-level value (older tools wrote one) never overrides the backbone's.
    assert tiny_calm_config(max_position_embeddings=7).max_position_embeddings == 256
