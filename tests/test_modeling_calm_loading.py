"""Checked loading (issue 16 item 7), device maps (issue 18 item 1) and batches without targets (issue 16 item 8)."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modeling_calm import CalmAutoencoder, CalmForCausalLM
from tests.utils import single_thread, tiny_autoencoder_config, tiny_calm_config  # noqa: F401


@pytest.fixture(scope="module")
def calm_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("calm")
    CalmForCausalLM(tiny_calm_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def autoencoder_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ae")
    CalmAutoencoder(tiny_autoencoder_config()).save_pretrained(folder)
    return folder


def _copy_with(folder, target, edit):
    """A copy of a saved model folder whose state dict went through `edit`."""
    target.mkdir()
    for path in folder.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    tensors = edit(load_file(folder / "model.safetensors"))
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_normal_load_passes_and_returns_what_was_asked(calm_folder):
    model = CalmForCausalLM.from_pretrained(calm_folder)
    assert isinstance(model, CalmForCausalLM)
    model, info = CalmForCausalLM.from_pretrained(calm_folder, output_loading_info=True)
    assert isinstance(model, CalmForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("prefix", ["autoencoder.", "head.", "chunk_proj."])
def test_a_calm_without_a_part_is_refused(calm_folder, tmp_path, prefix):
    broken = _copy_with(calm_folder, tmp_path / "broken", lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefix)})
    with pytest.raises(ValueError, match=rf"missing keys: {prefix}"):
        CalmForCausalLM.from_pretrained(broken)
    with pytest.raises(ValueError, match=rf"missing keys: {prefix}"):
        AutoModelForCausalLM.from_pretrained(broken, output_loading_info=True)


def test_an_unexpected_key_is_refused(calm_folder, tmp_path):
    broken = _copy_with(calm_folder, tmp_path / "extra", lambda sd: {**sd, "head.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys: head\.extra\.weight"):
        CalmForCausalLM.from_pretrained(broken)


def test_a_mismatched_autoencoder_key_is_refused_even_when_sizes_may_differ(calm_folder, tmp_path):
    name = "autoencoder.encoder.latent_proj.bias"
    broken = _copy_with(calm_folder, tmp_path / "shape", lambda sd: {**sd, name: torch.zeros(3)})
    with pytest.raises(ValueError, match=rf"mismatched keys: {name}"):
        CalmForCausalLM.from_pretrained(broken, ignore_mismatched_sizes=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_integer_or_bool_tensors_for_float_weights_are_refused(calm_folder, tmp_path, dtype):
    name = "chunk_proj.in_proj.bias"
    broken = _copy_with(calm_folder, tmp_path / "int", lambda sd: {**sd, name: sd[name].to(dtype)})
    header_length = struct.unpack("<Q", (broken / "model.safetensors").read_bytes()[:8])[0]
    assert json.loads((broken / "model.safetensors").read_bytes()[8 : 8 + header_length])[name]["dtype"] != "F32"
    with pytest.raises(ValueError, match=rf"{name} \(\w+ -> torch.float32\)"):
        CalmForCausalLM.from_pretrained(broken)


def test_fp16_tensors_load(calm_folder, tmp_path):
    halved = _copy_with(calm_folder, tmp_path / "fp16", lambda sd: {k: v.half() for k, v in sd.items()})
    model = CalmForCausalLM.from_pretrained(halved, dtype=torch.float16)
    assert model.chunk_proj.in_proj.weight.dtype == torch.float16


def test_the_autoencoder_alone_is_checked_and_from_autoencoder_too(autoencoder_folder, tmp_path):
    CalmAutoencoder.from_pretrained(autoencoder_folder)
    name = "decoder.norm.weight"
    broken = _copy_with(autoencoder_folder, tmp_path / "ae", lambda sd: {k: v for k, v in sd.items() if k != name})
    with pytest.raises(ValueError, match=rf"missing keys: {name}"):
        CalmAutoencoder.from_pretrained(broken)
    with pytest.raises(ValueError, match=rf"missing keys: {name}"):
        CalmForCausalLM.from_autoencoder(str(broken), backbone_config=tiny_calm_config().backbone_config.to_dict())
    ints = _copy_with(autoencoder_folder, tmp_path / "ae_int", lambda sd: {**sd, name: sd[name].long()})
    with pytest.raises(ValueError, match="integer or bool"):
        CalmAutoencoder.from_pretrained(ints)


def _outputs(model, ids):
    torch.manual_seed(0)
    out = model(ids, labels=ids, noise=torch.zeros(4, 3, 8), target_noise=torch.zeros(16, 3, 8))
    return out.last_hidden_state, out.loss, model.autoencoder.encode(ids)[0]


@pytest.mark.parametrize(
    "device_map",
    ["auto", "sequential", {"": "cpu"}, {"autoencoder": "cpu", "model": "cpu", "chunk_proj": "cpu", "head": "cpu"}],
    ids=["auto", "sequential", "all-cpu", "per-module"],
)
def test_device_maps_load_the_same_model(calm_folder, device_map):
    reference = AutoModelForCausalLM.from_pretrained(calm_folder).eval()
    mapped = AutoModelForCausalLM.from_pretrained(calm_folder, device_map=device_map).eval()
    ids = torch.randint(3, 99, (1, 16))
    for a, b in zip(_outputs(reference, ids), _outputs(mapped, ids)):
        torch.testing.assert_close(a, b)
    assert mapped.autoencoder.lm_head.weight is mapped.autoencoder.encoder.embed_tokens.weight


def test_the_autoencoder_alone_loads_with_device_map_auto(autoencoder_folder):
    model = CalmAutoencoder.from_pretrained(autoencoder_folder, device_map="auto")
    ids = torch.randint(3, 99, (2, 8))
    torch.testing.assert_close(model.encode(ids)[0], CalmAutoencoder.from_pretrained(autoencoder_folder).encode(ids)[0])


def test_a_one_chunk_batch_with_labels_gives_a_zero_attached_loss():
    model = CalmForCausalLM(tiny_calm_config()).train()
    ids = torch.randint(3, 99, (2, 4))  # one chunk: no next-chunk target at all
    out = model(ids, labels=ids)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()


def test_a_batch_whose_labels_are_all_ignored_gives_a_zero_attached_loss():
    model = CalmForCausalLM(tiny_calm_config()).train()
    ids = torch.randint(3, 99, (2, 12))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()


def test_the_autoencoder_encodes_zero_rows():
    model = CalmAutoencoder(tiny_autoencoder_config())
    mean, log_std = model.encode(torch.zeros(0, 4, dtype=torch.long))
    assert mean.shape == log_std.shape == (0, 1, 8)


@pytest.mark.parametrize("training", [True, False])
def test_the_autoencoder_loss_without_targets_is_zero_not_nan(training):
    model = CalmAutoencoder(tiny_autoencoder_config()).train(training)
    ids = torch.randint(3, 99, (2, 8))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out = model(ids, labels=ids, attention_mask=torch.zeros_like(ids))
    assert out.loss.item() == 0.0 and out.loss.requires_grad


def test_the_autoencoder_kl_leaves_padding_chunks_out():
    # No KL floor: with it every dimension of a fresh model sits at the clamp and all chunks would look alike.
    model = CalmAutoencoder(tiny_autoencoder_config(kl_clamp=0.0)).eval()
    ids = torch.randint(3, 99, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    padded = model(ids, labels=ids, attention_mask=mask, sample_latents=False)
    alone = model(ids[:, :4], labels=ids[:, :4], sample_latents=False)
    torch.testing.assert_close(padded.kl_loss, alone.kl_loss)
    torch.testing.assert_close(padded.loss, alone.loss)
