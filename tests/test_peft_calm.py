"""PEFT on CALM: adapters only on the backbone, the input compression and the head (never the autoencoder),
training, adapter save/reload, merge_and_unload, AutoPeftModelForCausalLM, and remote-code loads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from modeling_calm import CalmConfig, CalmForCausalLM
from modeling_calm.data_calm import train_bpe_tokenizer
from modeling_calm.modeling_calm_heads import zero_init_layers
from modeling_calm.peft_calm import (
    CALM_PEFT_METHODS,
    calm_lora_config,
    calm_peft_config,
    calm_target_modules,
    calm_targetable_modules,
)
from tests.utils import (
    SHIPPED_CALM_FILES, run_without_package, single_thread, tiny_autoencoder_config, tiny_calm_config,
)


BATCH, TOKENS = 2, 16  # K=4: 4 chunks per row, 3 next-chunk targets per row




def _base_model(head_type: str = "energy") -> CalmForCausalLM:
    torch.manual_seed(0)
    model = CalmForCausalLM(tiny_calm_config(head_type=head_type))
    # A fresh head's zero-initialised layers (the last layer; the flow head's adaLN modulations) would leave the
    # adapters upstream of them without a gradient at the first step; a "pretrained" base has non-zero ones.
    for layer in zero_init_layers(model.head):
        nn.init.normal_(layer.weight, std=0.1)
    return model


def _fixed_inputs(config):
    """Token ids and every random draw of a forward pass, so that two models can be compared exactly."""
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(3, 99, (BATCH, TOKENS), generator=generator)
    positions = BATCH * (TOKENS // config.patch_size - 1)
    noise = torch.rand(config.num_samples, positions, config.noise_size, generator=generator) - 0.5
    target_noise = torch.randn(config.num_target_samples, positions, config.latent_size, generator=generator)
    return ids, dict(noise=noise, target_noise=target_noise)


@torch.no_grad()
def _outputs(model, config) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    ids, draws = _fixed_inputs(config)
    out = model(input_ids=ids, labels=ids, return_brier=False, **draws)
    return out.last_hidden_state, out.loss


def _train(model, steps: int = 3, lr: float = 1e-2) -> None:
    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, 99, (BATCH, TOKENS), generator=generator)
        model(input_ids=ids, labels=ids, generator=generator).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _adapted_module_names(peft_model) -> set[str]:
    # PEFT layers carry the adapter dicts (lora_A, hada_w1, ia3_l, ...) listed in `adapter_layer_names`.
    return {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if getattr(module, "adapter_layer_names", None) and hasattr(module, "base_layer")
    }


# ------------------------------------------------------------------------------------------------------------------
# Target selection
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_type", ["energy", "flow"])
def test_targets_are_every_linear_outside_the_autoencoder(head_type):
    model = _base_model(head_type)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    outside = [name for name in linears if not name.startswith("autoencoder.")]
    assert len(outside) < len(linears)  # the autoencoder has linears with the backbone's names (gate_proj, ...)
    assert calm_targetable_modules(model) == outside
    assert calm_targetable_modules(model, "all") == outside

    layers = model.config.backbone_config.num_hidden_layers
    attention = calm_targetable_modules(model, "attention")
    assert len(attention) == 4 * layers and all(re.search(r"self_attn\.[qkvo]_proj$", n) for n in attention)
    mlp = calm_targetable_modules(model, "mlp")
    assert len(mlp) == 3 * layers and all(n.startswith("model.layers.") for n in mlp)
    assert calm_targetable_modules(model, "compression") == ["chunk_proj.in_proj", "chunk_proj.out_proj"]
    head = calm_targetable_modules(model, "head")
    assert head == [n for n in outside if n.startswith("head.")]
    assert sorted(calm_targetable_modules(model, "backbone")) == sorted(attention + mlp + ["chunk_proj.in_proj",
                                                                                          "chunk_proj.out_proj"])
    # The regex is for re.fullmatch: a name that merely contains a target is not selected.
    regex = calm_target_modules()
    assert re.fullmatch(regex, "model.layers.3.mlp.down_proj")
    assert not re.fullmatch(regex, "autoencoder.decoder.layers.0.mlp.down_proj")
    assert not re.fullmatch(regex, "model.layers.3.mlp.down_proj.lora_A")


def test_config_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="autoencoder"):
        calm_lora_config(target="backbone+autoencoder")
    with pytest.raises(ValueError, match="target"):
        calm_lora_config(target="")
    with pytest.raises(ValueError, match="modules_to_save"):
        calm_lora_config(modules_to_save=["autoencoder"])
    with pytest.raises(ValueError, match="target_modules"):
        calm_lora_config(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="method"):
        calm_peft_config("prefix_tuning")
    with pytest.raises(ValueError, match="`r`"):
        calm_lora_config(r=0)
    config = calm_lora_config(r=4, alpha=8, dropout=0.1, target="attention")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert config.task_type == "CAUSAL_LM" and config.target_modules == calm_target_modules("attention")
    assert config.exclude_modules is not None and re.fullmatch(config.exclude_modules, "autoencoder.lm_head")


# ------------------------------------------------------------------------------------------------------------------
# LoRA: wrapping, training
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_type", ["energy", "flow"])
def test_lora_adapts_only_targets_and_trains_only_lora(head_type):
    base = _base_model(head_type)
    expected = set(calm_targetable_modules(base))
    model = get_peft_model(base, calm_lora_config(r=4, alpha=8))
    assert _adapted_module_names(model) == expected
    assert not any(name.startswith("autoencoder.") for name in _adapted_module_names(model))

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * len(expected)

    ids, _ = _fixed_inputs(base.config)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name in trainable and ".lora_B." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name  # B starts at 0: A's grad is 0 at step 1
        elif name not in trainable:
            assert p.grad is None, name
    assert all(p.grad is None for p in base.autoencoder.parameters())
    assert not base.autoencoder.training  # model.train() must not switch on the autoencoder's dropout
    model.zero_grad(set_to_none=True)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, steps=3)
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), name


# ------------------------------------------------------------------------------------------------------------------
# LoRA: save, reload, merge, Auto classes
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A base saved to disk, LoRA-trained for 3 steps from a fresh load of it, its adapter and its merged model."""
    root = tmp_path_factory.mktemp("peft")
    base_dir, adapter_dir = root / "base", root / "adapter"
    _base_model().save_pretrained(base_dir)
    base = CalmForCausalLM.from_pretrained(base_dir)  # so adapter_config.json points at base_dir
    model = get_peft_model(base, calm_lora_config(r=4, alpha=8))
    _train(model)
    expected = _outputs(model, base.config)
    model.save_pretrained(adapter_dir)
    return dict(base_dir=base_dir, adapter_dir=adapter_dir, model=model, expected=expected, config=base.config)


def _merge_and_save(lora_run, folder) -> CalmForCausalLM:
    model = PeftModel.from_pretrained(CalmForCausalLM.from_pretrained(lora_run["base_dir"]), lora_run["adapter_dir"])
    merged = model.merge_and_unload()
    merged.save_pretrained(folder)
    return merged


def test_adapter_files_and_config(lora_run):
    adapter_dir = lora_run["adapter_dir"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == calm_target_modules()
    assert config["base_model_name_or_path"] == str(lora_run["base_dir"])
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights)
    assert not any("autoencoder" in key for key in weights)
    # Every trained adapter weight is stored (names lose the adapter name "default").
    assert len(weights) == 2 * len(calm_targetable_modules(lora_run["model"]))


def test_reloaded_adapter_gives_identical_outputs(lora_run):
    hidden, loss = lora_run["expected"]
    base = CalmForCausalLM.from_pretrained(lora_run["base_dir"])
    reloaded = PeftModel.from_pretrained(base, lora_run["adapter_dir"])
    new_hidden, new_loss = _outputs(reloaded, lora_run["config"])
    assert torch.equal(new_hidden, hidden) and torch.equal(new_loss, loss)
    # Without the adapter the base differs: the comparison above is not vacuous.
    with reloaded.disable_adapter():
        assert not torch.allclose(_outputs(reloaded, lora_run["config"])[0], hidden, atol=1e-4)

    auto = AutoPeftModelForCausalLM.from_pretrained(lora_run["adapter_dir"], trust_remote_code=True)
    assert isinstance(auto, PeftModel) and isinstance(auto.get_base_model(), CalmForCausalLM)
    auto_hidden, auto_loss = _outputs(auto, lora_run["config"])
    assert torch.equal(auto_hidden, hidden) and torch.equal(auto_loss, loss)


def test_merge_and_unload_gives_plain_model_with_same_outputs(lora_run, tmp_path):
    hidden, loss = lora_run["expected"]
    merged = _merge_and_save(lora_run, tmp_path / "merged")
    assert type(merged) is CalmForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_hidden, merged_loss = _outputs(merged, lora_run["config"])
    torch.testing.assert_close(merged_hidden, hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_loss, loss, atol=1e-5, rtol=0)

    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert SHIPPED_CALM_FILES <= files and {"config.json", "model.safetensors"} <= files
    assert "auto_map" in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = CalmForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(_outputs(reloaded, lora_run["config"])[0], merged_hidden)


@pytest.mark.slow
def test_merged_and_adapter_load_as_remote_code_in_fresh_process(lora_run, tmp_path):
    _merge_and_save(lora_run, tmp_path / "merged")
    ids, draws = _fixed_inputs(lora_run["config"])
    torch.save(dict(ids=ids, **draws, hidden=lora_run["expected"][0]), tmp_path / "fixture.pt")
    script = f"""
        import torch
        try:
            import modeling_calm
            raise SystemExit("the package must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM
        from peft import AutoPeftModelForCausalLM
        f = torch.load({str(tmp_path / 'fixture.pt')!r})
        def hidden(model):
            with torch.no_grad():
                return model.eval()(input_ids=f["ids"], labels=f["ids"], noise=f["noise"],
                                    target_noise=f["target_noise"], return_brier=False).last_hidden_state
        merged = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}, trust_remote_code=True)
        assert "transformers_modules" in type(merged).__module__
        torch.testing.assert_close(hidden(merged), f["hidden"], atol=1e-5, rtol=0)
        adapter = AutoPeftModelForCausalLM.from_pretrained({str(lora_run['adapter_dir'])!r}, trust_remote_code=True)
        assert "transformers_modules" in type(adapter.get_base_model()).__module__
        assert torch.equal(hidden(adapter), f["hidden"])
        print("OK")
    """
    assert "OK" in run_without_package(script, cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------------------------------------
# Other PEFT methods on linear layers
# ------------------------------------------------------------------------------------------------------------------

# Small settings that fit the tiny model (hidden 32); each method's own defaults are for real widths.
_METHOD_KWARGS = {
    "lora": dict(r=4, lora_alpha=8, use_dora=True),
    "ia3": dict(),
    "loha": dict(r=4, alpha=8),
    "lokr": dict(r=4, alpha=8),
    "vera": dict(r=4),
    "boft": dict(boft_block_size=4),
    "oft": dict(r=0, oft_block_size=4),
    "fourierft": dict(n_frequency=16, scaling=10.0),
    "hra": dict(r=4),
    "vblora": dict(r=4, vector_length=4, num_vectors=32),
}


def test_every_listed_method_has_a_test():
    assert set(_METHOD_KWARGS) == set(CALM_PEFT_METHODS)


@pytest.mark.parametrize("method", sorted(CALM_PEFT_METHODS))
def test_peft_method_trains_reloads_and_merges(method, tmp_path):
    _base_model().save_pretrained(tmp_path / "base")
    base = CalmForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, calm_peft_config(method, **_METHOD_KWARGS[method]))
    assert _adapted_module_names(model) == set(calm_targetable_modules(base))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("autoencoder" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, steps=3)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable  # frozen weights (the autoencoder's included) never move
    hidden, loss = _outputs(model, base.config)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(CalmForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(_outputs(reloaded, base.config)[0], hidden)
    merged = reloaded.merge_and_unload()
    assert type(merged) is CalmForCausalLM
    merged_hidden, merged_loss = _outputs(merged, base.config)
    torch.testing.assert_close(merged_hidden, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_loss, loss, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# examples/finetune_lora.py
# ------------------------------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "CALM predicts the next vector instead of the next token.",
    "Each vector stands for a chunk of K tokens.",
    "The autoencoder maps a chunk to a vector and back.",
    "An energy head is trained without likelihoods.",
]


@pytest.mark.slow
def test_finetune_lora_example_script(tmp_path):
    tokenizer = train_bpe_tokenizer(iter(SENTENCES * 5), vocab_size=300, min_frequency=1)
    vocab = len(tokenizer)
    config = CalmConfig(
        autoencoder_config=tiny_autoencoder_config(vocab_size=vocab),
        backbone_config=dict(tiny_calm_config().backbone_config.to_dict(), vocab_size=vocab),
        noise_size=8, num_mlp_layers=2, num_samples=4, num_target_samples=16,
    )
    torch.manual_seed(0)
    base = CalmForCausalLM(config)
    nn.init.normal_(base.head.output.fc2.weight, std=0.1)  # a "trained" head: gradients reach the backbone
    model_dir = tmp_path / "calm"
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(SENTENCES * 10) + "\n", encoding="utf-8")
    out = tmp_path / "lora"

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "finetune_lora.py"), "--model", str(model_dir),
         "--train_file", str(train_file), "--output_dir", str(out), "--block_size", "16",
         "--per_device_train_batch_size", "2", "--max_steps", "2", "--lora_r", "4", "--lora_alpha", "8",
         "--learning_rate", "1e-2", "--merge"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 2 steps" in result.stdout

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == str(model_dir)
    assert adapter_config["target_modules"] == calm_target_modules("backbone+head")

    merged_dir = out / "merged"
    assert SHIPPED_CALM_FILES | {"README.md", "tokenizer.json"} <= {p.name for p in merged_dir.iterdir()}
    card = ModelCard.load(merged_dir / "README.md")
    assert card.data.model_name == "lora" and "LoRA (r=4, alpha=8, backbone+head) for 2 steps" in card.text
    merged = CalmForCausalLM.from_pretrained(merged_dir)
    base_weights, merged_weights = base.state_dict(), merged.state_dict()
    assert base_weights.keys() == merged_weights.keys()
    targets = calm_target_modules()
    for name, weight in merged_weights.items():
        same = torch.equal(weight, base_weights[name])
        if name.endswith(".weight") and re.fullmatch(targets, name.removesuffix(".weight")):
            assert not same, name  # two steps moved every LoRA B, so every merged target changed
        else:
            assert same, name  # the autoencoder, biases, norms and embeddings are not adapted
