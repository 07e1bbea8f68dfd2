"""The common checks (a slim home-grown mixin): shapes, loss, gradients, freezing, round trip, batching, bf16,
gradient checkpointing, for both heads."""

import pytest
import torch

from modeling_calm import CalmAutoencoder, CalmForCausalLM
from modeling_calm.modeling_calm_heads import zero_init_layers
from tests.utils import tiny_autoencoder_config, tiny_calm_config

HEADS = ["energy", "flow", "diffusion"]


def unblock(model):
    for layer in zero_init_layers(model):
        torch.nn.init.normal_(layer.weight, std=0.02)


def make_model(head_type="energy", **kwargs):
    return CalmForCausalLM(tiny_calm_config(head_type=head_type, **kwargs))


@pytest.mark.parametrize("head_type", HEADS)
def test_forward_shapes_and_finite_loss(head_type):
    model = make_model(head_type).eval()
    ids = torch.randint(3, 99, (2, 16))
    out = model(ids, labels=ids)
    assert out.last_hidden_state.shape == (2, 4, 32)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.brier.shape == (4,)
    if head_type == "energy":
        torch.testing.assert_close(out.loss, 2 * out.fidelity - out.diversity)
    assert model(ids).loss is None


@pytest.mark.parametrize("head_type", HEADS)
def test_gradients_on_every_trainable_parameter_and_none_on_the_autoencoder(head_type):
    model = make_model(head_type).train()
    # Zero-initialised layers (the heads' output layer, the flow head's adaLN modulations) block gradients to
    # the layers before them on the first step: give them weights so every gradient shows up at once.
    unblock(model)
    ids = torch.randint(3, 99, (2, 16))
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("autoencoder."):
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_autoencoder_stays_frozen_and_in_eval_mode():
    model = make_model()
    model.train()
    assert model.training and not model.autoencoder.training
    assert not any(m.training for m in model.autoencoder.modules())
    model.autoencoder.requires_grad_(True)
    model.train()  # as the Trainer does every step
    assert not any(p.requires_grad for p in model.autoencoder.parameters())


def test_few_training_steps_change_every_trainable_parameter_and_no_autoencoder_parameter():
    model = make_model().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ids = torch.randint(3, 99, (4, 16))
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed != name.startswith("autoencoder."), name


def test_labels_minus_100_mask_whole_target_chunks():
    model = make_model().eval()
    ids = torch.randint(3, 99, (1, 16))
    labels = ids.clone()
    labels[0, 8] = -100  # one token of chunk 2: the target of step 1 is dropped
    noise = torch.rand(4, 2, 8) - 0.5
    eps = torch.randn(16, 2, 8)
    masked = model(ids, labels=labels, noise=noise, target_noise=eps)
    # Same as scoring targets 1 and 3 alone: compare against the head loss computed by hand.
    hidden = model(ids).last_hidden_state[0, [0, 2]]
    mean, log_std = model.autoencoder.encode(ids[:, 4:].reshape(3, 4)[[0, 2]])
    expected = model.head.loss(hidden, mean[:, 0], log_std[:, 0], noise=noise, target_noise=eps).loss.mean()
    torch.testing.assert_close(masked.loss, expected)
    all_masked = torch.full_like(ids, -100)
    out = model(ids, labels=all_masked)
    assert out.loss.item() == 0.0 and out.loss.requires_grad is False or out.loss.item() == 0.0


def test_batching_equivalence_with_left_padding():
    model = make_model().eval()
    short = torch.randint(3, 99, (1, 8))
    long = torch.randint(3, 99, (1, 16))
    batch = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :8] = 0
    out = model(batch, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0, 2:], model(short).last_hidden_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(long).last_hidden_state[0], atol=1e-5, rtol=1e-5)


def test_partial_chunk_padding_and_odd_lengths_raise():
    model = make_model()
    ids = torch.randint(3, 99, (1, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="part of a chunk"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randint(3, 99, (1, 7)))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :4])


def test_incremental_forward_with_cache_matches_full_forward():
    from transformers import DynamicCache

    model = make_model().eval()
    ids = torch.randint(3, 99, (2, 24))
    full = model(ids).last_hidden_state
    cache = DynamicCache(config=model.config.backbone_config)
    first = model(ids[:, :12], past_key_values=cache, use_cache=True)
    steps = [first.last_hidden_state]
    for i in range(3, 6):
        steps.append(model(ids[:, 4 * i : 4 * i + 4], past_key_values=first.past_key_values, use_cache=True).last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_type", HEADS)
def test_save_load_round_trip(tmp_path, head_type):
    model = make_model(head_type).eval()
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 99, (2, 16))
    kwargs = dict(labels=ids, generator=None)
    torch.manual_seed(1)
    a = model(ids, **kwargs)
    torch.manual_seed(1)
    b = loaded(ids, **kwargs)
    torch.testing.assert_close(a.loss, b.loss)
    assert loaded.autoencoder.lm_head.weight is loaded.autoencoder.encoder.embed_tokens.weight
    assert not any(p.requires_grad for p in loaded.autoencoder.parameters())


def test_bf16_forward_and_save_load(tmp_path):
    model = make_model().to(torch.bfloat16).eval()
    ids = torch.randint(3, 99, (2, 16))
    out = model(ids, labels=ids)
    assert out.last_hidden_state.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(loaded(ids).last_hidden_state, out.last_hidden_state)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model().train()
    unblock(model)
    ids = torch.randint(3, 99, (2, 16))
    noise, eps = torch.rand(4, 6, 8) - 0.5, torch.randn(16, 6, 8)
    model(ids, labels=ids, noise=noise, target_noise=eps).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # transformers 5.24 renamed the method (the old name warns); 5.17 has only the old one.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing and model.is_gradient_checkpointing
    model(ids, labels=ids, noise=noise, target_noise=eps).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


def test_from_autoencoder_starts_stage_two(tmp_path):
    autoencoder = CalmAutoencoder(tiny_autoencoder_config())
    autoencoder.save_pretrained(tmp_path)
    backbone = tiny_calm_config().backbone_config.to_dict()
    model = CalmForCausalLM.from_autoencoder(str(tmp_path), backbone_config=backbone, noise_size=8, num_samples=4)
    for key, value in autoencoder.state_dict().items():
        torch.testing.assert_close(model.autoencoder.state_dict()[key], value)
    assert (model.config.patch_size, model.config.latent_size) == (4, 8)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_decoder_families_work_as_backbone(family):
    config = tiny_calm_config(backbone=dict(model_type=family))
    model = CalmForCausalLM(config).eval()
    assert model.model.config.model_type == family
    ids = torch.randint(3, 99, (1, 8))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_attention_implementation_reaches_the_backbone(tmp_path):
    model = make_model()
    model.set_attn_implementation("eager")
    assert model.model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert model.model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert loaded.model.config._attn_implementation == "eager"
    ids = torch.randint(3, 99, (1, 8))
    torch.testing.assert_close(loaded(ids).last_hidden_state, model.eval()(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_type", ["energy", "flow"])
def test_training_forward_is_one_graph_without_host_sync(head_type):
    """The loss weights positions instead of selecting them (no nonzero / .item()): torch.compile sees one graph, so
    a compiled training step needs no host sync and can use CUDA graphs."""
    model = CalmForCausalLM(tiny_calm_config(head_type)).train()
    ids = torch.randint(3, 99, (2, 32))
    labels = ids.clone()
    labels[0, 5] = -100
    mask = torch.ones_like(ids)

    def step(ids, mask, labels):  # as the Trainer calls it: no torch.Generator (dynamo cannot trace one)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    explanation = torch._dynamo.explain(step)(ids, mask, labels)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
