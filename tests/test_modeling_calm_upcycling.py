"""`CalmForCausalLM.from_causal_lm`: a CALM whose backbone is copied from a trained causal LM (upcycling)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_calm import CalmAutoencoder, CalmForCausalLM
from tests.utils import run_without_package, tiny_autoencoder_config

FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=2, rms_norm_eps=1e-6),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, rms_norm_eps=1e-6),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, rms_norm_eps=1e-6, sliding_window=None),
}


def tiny_donor(family: str, vocab_size: int = 99):
    values = dict(FAMILIES[family])
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, **values,
    )
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backbone_is_copied_exactly_and_computes_the_same(family):
    donor = tiny_donor(family)
    autoencoder = CalmAutoencoder(tiny_autoencoder_config())
    calm = CalmForCausalLM.from_causal_lm(donor, autoencoder=autoencoder, noise_size=8, num_mlp_layers=1).eval()
    assert calm.config.backbone_config.model_type == family
    donor_state = donor.model.state_dict()
    calm_state = calm.model.state_dict()
    assert set(donor_state) == set(calm_state)
    for name, tensor in donor_state.items():
        assert torch.equal(calm_state[name], tensor), name
    # The copied layers compute what the donor's do, on the same input vectors.
    embeds = torch.randn(2, 5, 32)
    expected = donor.model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(calm.model(inputs_embeds=embeds).last_hidden_state, expected, rtol=0, atol=0)
    # The input compression reads the donor's token embedding; the head is new; the autoencoder is the given one.
    assert torch.equal(calm.get_input_embeddings().weight, donor.get_input_embeddings().weight)
    for name, tensor in autoencoder.state_dict().items():
        assert torch.equal(calm.autoencoder.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in calm.autoencoder.parameters())


def test_vocabulary_mismatch_is_refused():
    donor = tiny_donor("llama", vocab_size=120)
    with pytest.raises(ValueError, match=r"vocab_size \(120\) must equal the autoencoder's \(99\)"):
        CalmForCausalLM.from_causal_lm(donor, autoencoder=CalmAutoencoder(tiny_autoencoder_config()))
    with pytest.raises(ValueError, match="must be a transformers causal LM"):
        CalmForCausalLM.from_causal_lm(torch.nn.Linear(2, 2), autoencoder=CalmAutoencoder(tiny_autoencoder_config()))
    with pytest.raises(ValueError, match="do not pass `backbone_config`"):
        CalmForCausalLM.from_causal_lm(tiny_donor("llama"), autoencoder=CalmAutoencoder(tiny_autoencoder_config()),
                                       backbone_config={"model_type": "llama"})


def test_upcycled_model_from_paths_trains_saves_and_loads_as_remote_code(tmp_path):
    donor = tiny_donor("llama")
    donor.save_pretrained(tmp_path / "donor")
    CalmAutoencoder(tiny_autoencoder_config()).save_pretrained(tmp_path / "ae")
    calm = CalmForCausalLM.from_causal_lm(str(tmp_path / "donor"), autoencoder=str(tmp_path / "ae"),
                                          noise_size=8, num_mlp_layers=1, num_samples=4, num_target_samples=8)
    ids = torch.randint(3, 99, (2, 16))
    calm.train()
    optimizer = torch.optim.AdamW([p for p in calm.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in calm.named_parameters()}
    for _ in range(2):
        loss = calm(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    changed = {n for n, p in calm.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("model.layers.") for n in changed) and any(n.startswith("head.") for n in changed)
    assert not any(n.startswith("autoencoder.") for n in changed)
    calm.eval().save_pretrained(tmp_path / "calm")
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(calm(ids).last_hidden_state, tmp_path / "expected.pt")
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'calm')!r}, trust_remote_code=True).eval()
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        assert torch.equal(model(ids).last_hidden_state, torch.load({str(tmp_path / 'expected.pt')!r}))
        out = model.generate(ids[:, :5], max_new_tokens=8, seed=0)
        assert out.shape == (2, 13), out.shape
        print("OK")
    """
    assert "OK" in run_without_package(script, cwd=tmp_path)
