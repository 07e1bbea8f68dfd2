import pytest
import torch

from modeling_calm import CalmAutoencoder
from tests.utils import tiny_autoencoder_config


def test_shapes_encode_decode_forward():
    model = CalmAutoencoder(tiny_autoencoder_config()).eval()
    ids = torch.randint(0, 99, (3, 12))
    mean, log_std = model.encode(ids)
    assert mean.shape == log_std.shape == (3, 3, 8)
    assert model.decode(mean).shape == (3, 12, 99)
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 12, 99) and torch.isfinite(out.loss)
    assert 0.0 <= out.accuracy.item() <= 1.0


def test_context_free_chunks():
    # A chunk's code depends on its own K tokens only.
    model = CalmAutoencoder(tiny_autoencoder_config()).eval()
    ids = torch.randint(0, 99, (1, 8))
    other = ids.clone()
    other[0, 4:] = torch.randint(0, 99, (4,))
    torch.testing.assert_close(model.encode(ids)[0][:, 0], model.encode(other)[0][:, 0])


def test_training_loss_is_k_times_ce_plus_weighted_kl():
    model = CalmAutoencoder(tiny_autoencoder_config(ae_dropout=0.0, kl_weight=0.25)).train()
    ids = torch.randint(0, 99, (2, 8))
    out = model(ids, labels=ids, noise=torch.zeros(2, 2, 8))
    torch.testing.assert_close(out.loss, 4 * out.reconstruction_loss + 0.25 * out.kl_loss)
    # KL clipping: every dimension contributes at least kl_clamp.
    assert out.kl_loss.item() >= 8 * model.config.kl_clamp - 1e-6
    model.eval()
    out = model(ids, labels=ids, noise=torch.zeros(2, 2, 8))
    torch.testing.assert_close(out.loss, out.reconstruction_loss)


def test_eval_is_deterministic_with_posterior_mean_and_random_otherwise():
    model = CalmAutoencoder(tiny_autoencoder_config()).eval()
    ids = torch.randint(0, 99, (2, 8))
    a, b = model(ids, sample_latents=False), model(ids, sample_latents=False)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.latents, a.latent_mean)
    c = model(ids, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(c.latents, a.latents)


def test_token_and_latent_dropout_only_in_training():
    model = CalmAutoencoder(tiny_autoencoder_config(ae_dropout=0.5))
    ids = torch.randint(1, 99, (4, 32))
    model.train()
    a = model(ids, sample_latents=False, generator=torch.Generator().manual_seed(0)).latents
    b = model(ids, sample_latents=False, generator=torch.Generator().manual_seed(1)).latents
    assert not torch.allclose(a, b)
    assert (a == 0).float().mean() > 0.3  # latent dropout zeroes about half of z
    model.eval()
    torch.testing.assert_close(model(ids, sample_latents=False).latents, model(ids, sample_latents=False).latents)


def test_labels_minus_100_and_attention_mask_are_ignored():
    model = CalmAutoencoder(tiny_autoencoder_config()).eval()
    ids = torch.randint(0, 99, (1, 8))
    labels = ids.clone()
    labels[0, 4:] = -100
    out = model(ids, labels=labels, sample_latents=False)
    logits = out.logits[0, :4]
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, ids[0, :4]))
    masked = model(ids, labels=ids, attention_mask=(labels != -100).long(), sample_latents=False)
    torch.testing.assert_close(masked.loss, out.loss)


@pytest.mark.parametrize("length", [0, 6])
def test_bad_lengths_raise(length):
    model = CalmAutoencoder(tiny_autoencoder_config())
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.encode(torch.zeros(1, length, dtype=torch.long))


def test_bad_latent_size_raises():
    model = CalmAutoencoder(tiny_autoencoder_config())
    with pytest.raises(ValueError, match="latent_size"):
        model.decode(torch.zeros(1, 2, 5))


def test_learns_to_reconstruct_a_toy_corpus_to_100_percent():
    # A toy corpus of 64 distinct chunks; a few hundred CPU steps give perfect reconstruction with z sampled.
    torch.manual_seed(0)
    model = CalmAutoencoder(tiny_autoencoder_config(ae_dropout=0.0, hidden_size=64, intermediate_size=128))
    corpus = torch.randint(3, 99, (64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(300):
        batch = corpus[torch.randint(0, 64, (32,))].reshape(8, 16)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    all_ids = corpus.reshape(1, -1)
    assert model(all_ids, labels=all_ids, sample_latents=False).accuracy.item() == 1.0
    assert model(all_ids, labels=all_ids, generator=torch.Generator().manual_seed(0)).accuracy.item() == 1.0


def test_save_load_round_trip_ties_the_output_projection(tmp_path):
    model = CalmAutoencoder(tiny_autoencoder_config()).eval()
    assert model.lm_head.weight is model.encoder.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = CalmAutoencoder.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.encoder.embed_tokens.weight
    ids = torch.randint(0, 99, (2, 8))
    torch.testing.assert_close(model.encode(ids)[0], loaded.encode(ids)[0])
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # stored once


def test_split_argmax_projection_equals_the_full_argmax_with_its_tie_rule():
    """decode_tokens' CUDA path for unaligned vocabularies (two products, aligned rows and the rest)."""
    from modeling_calm.modeling_calm_autoencoder import split_argmax_projection

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(300, 16, generator=g), torch.randn(99, 16, generator=g)
    bias = torch.randn(99, generator=g)
    for split in (1, 64, 98):
        for b in (None, bias):
            full = torch.nn.functional.linear(hidden, weight, b).argmax(-1)
            assert torch.equal(split_argmax_projection(hidden, weight, b, split), full)
    # Ties across the split go to the lower index; a strictly larger rest row wins.
    weight = torch.zeros(5, 2)
    weight[1], weight[4] = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])
    assert split_argmax_projection(torch.tensor([[1.0, 0.0]]), weight, None, 3).tolist() == [1]
    weight[4, 0] = 2.0
    assert split_argmax_projection(torch.tensor([[1.0, 0.0]]), weight, None, 3).tolist() == [4]
