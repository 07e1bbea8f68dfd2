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


def test_train_calm_example_upcycles_a_causal_lm(tmp_path):
    """`examples/train_calm.py --from_causal_lm DONOR`: the backbone starts from the donor (its shape, its family),
    trains with CalmTrainer and the folder loads."""
    import json
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from modeling_calm.data_calm import load_tokenizer, train_bpe_tokenizer
    from tests.utils import write_word_corpus

    root = Path(__file__).resolve().parents[1]
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", random.Random(0), documents=120)
    train_bpe_tokenizer(corpus, vocab_size=300, output_dir=str(tmp_path / "tokenizer"))
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    vocab = len(tokenizer)
    ae = CalmAutoencoder(tiny_autoencoder_config(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    ae.save_pretrained(tmp_path / "ae")
    tokenizer.save_pretrained(tmp_path / "ae")
    donor = tiny_donor("qwen2", vocab_size=vocab)
    donor.save_pretrained(tmp_path / "donor")
    command = [sys.executable, str(root / "examples" / "train_calm.py"), "--preset", "tiny", "--recipe", "tiny",
               "--autoencoder", str(tmp_path / "ae"), "--from_causal_lm", str(tmp_path / "donor"),
               "--train_file", str(corpus), "--max_steps", "2", "--block_size", "32", "--per_device_train_batch_size", "2",
               "--validation_blocks", "0", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "calm")]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "calm" / "config.json").read_text())
    assert saved["backbone_config"]["model_type"] == "qwen2" and saved["backbone_config"]["hidden_size"] == 32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "calm", trust_remote_code=True)
    # Two optimizer steps move the copied weights only a little: still close to the donor's (an independent
    # initialisation of the same scale would be about 1.4 x its norm away).
    copied = donor.model.layers[0].mlp.down_proj.weight
    trained = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(trained, copied)
    assert (trained - copied).norm() < 0.5 * copied.norm()
