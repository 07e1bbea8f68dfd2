"""CalmTrainer / CalmAutoencoderTrainer in TRL's shape: parameters that must move and must not, logged metrics,
gradient-accumulation equivalence, checkpoints with remote code and exact resume, two-process DDP (gloo), and the
training examples end to end. Tiny models and data throughout; nothing touches the network."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, TrainingArguments

from modeling_calm import CalmAutoencoder, CalmAutoencoderTrainer, CalmForCausalLM, CalmTrainer
from modeling_calm.modeling_calm_brier import brier_lm
from modeling_calm.data_calm import CalmDataCollator
from tests.utils import SHIPPED_CALM_FILES, tiny_autoencoder_config, tiny_calm_config


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
REPO_ROOT = Path(__file__).resolve().parents[1]


def token_blocks(n: int, length: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 99, (length,), generator=g).tolist()} for _ in range(n)]


def make_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-2, max_steps=4, logging_steps=2, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=0, use_cpu=True, dataloader_pin_memory=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def values_of(history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in history if key in entry]


# ---------------------------------------------------------------------------------------------------------------
# CalmTrainer
# ---------------------------------------------------------------------------------------------------------------


def test_calm_trainer_moves_every_trainable_parameter_keeps_the_autoencoder_frozen_and_logs(tmp_path):
    torch.manual_seed(0)
    # At hidden size 32, the default init (std 0.02) shrinks the head's path from the backbone so much that the
    # backbone's gradients are ~1e-13 and AdamW's steps on weights of 1.0 round away in float32: a larger init
    # for the CALM layers (head, input compression) makes every update visible.
    model = CalmForCausalLM(tiny_calm_config(initializer_range=0.2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes = []  # (model.training, autoencoder.training) at every autoencoder call during training
    model.autoencoder.encoder.register_forward_hook(
        lambda *_: modes.append((model.training, model.autoencoder.training))
    )
    args = make_args(tmp_path, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=4)
    trainer = CalmTrainer(
        model=model, args=args, train_dataset=token_blocks(32), eval_dataset=token_blocks(8, seed=1),
        data_collator=CalmDataCollator(patch_size=4),
    )
    trainer.train()

    # Zero-initialised output layer: step 1 moves only it; the later steps move everything else.
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed != name.startswith("autoencoder."), name
    training_calls = [autoencoder for training, autoencoder in modes if training]
    assert len(training_calls) == 8 and not any(training_calls)  # 4 steps x 2 micro-batches, all in eval mode
    assert not any(p.requires_grad for p in model.autoencoder.parameters())

    history = trainer.state.log_history
    train_logs = [entry for entry in history if "loss" in entry]
    assert len(train_logs) == 2
    for entry in train_logs:
        for key in ("loss", "fidelity", "diversity", "grad_norm", "learning_rate"):
            assert math.isfinite(entry[key]), (key, entry)
        # The window means of the terms reproduce the Trainer's own window-mean loss (loss = 2 fid - div per
        # micro-batch): this also pins the loss scale under gradient accumulation (an unscaled loss is 2x).
        assert entry["loss"] == pytest.approx(2 * entry["fidelity"] - entry["diversity"], rel=1e-5)
    (metrics,) = [entry for entry in history if "eval_loss" in entry]
    briers = [metrics[f"eval_brier_{n}"] for n in range(1, 5)]
    assert all(-1.0 <= b <= 2.0 for b in briers)
    assert metrics["eval_brier_lm"] == pytest.approx(brier_lm(briers))
    # Equal-length blocks: every example has the same weight, so the weighted means obey the same identity.
    assert metrics["eval_loss"] == pytest.approx(2 * metrics["eval_fidelity"] - metrics["eval_diversity"], rel=1e-5)


def test_brier_metrics_for_short_chunks_and_switch(tmp_path):
    model = CalmForCausalLM(tiny_calm_config(k=2))
    data = token_blocks(8, length=16)
    trainer = CalmTrainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=CalmDataCollator())
    metrics = trainer.evaluate()
    assert {"eval_brier_1", "eval_brier_2"} <= set(metrics)
    assert "eval_brier_3" not in metrics and "eval_brier_lm" not in metrics  # K=2: BrierLM needs 4 tokens
    trainer = CalmTrainer(
        model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=CalmDataCollator(), eval_brier=False
    )
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_fidelity" in metrics
    assert not any(key.startswith("eval_brier") for key in metrics)


def test_calm_trainer_trains_the_flow_head(tmp_path):
    torch.manual_seed(0)
    model = CalmForCausalLM(tiny_calm_config(head_type="flow"))
    before = model.head.output.fc2.weight.detach().clone()
    trainer = CalmTrainer(
        model=model, args=make_args(tmp_path, max_steps=2, logging_steps=1), train_dataset=token_blocks(16),
        eval_dataset=token_blocks(4, seed=1), data_collator=CalmDataCollator(),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert not any("fidelity" in entry for entry in logs)  # energy-score terms only exist for the energy head
    assert not torch.equal(before, model.head.output.fc2.weight)
    metrics = trainer.evaluate()
    assert "eval_brier_lm" in metrics and "eval_fidelity" not in metrics


def with_fixed_noise(blocks: list[dict], config, seed: int = 0) -> list[dict]:
    """Give every example its own head noise [S, L-1, E] and target eps [M, L-1, Z] (the energy loss's randomness)."""
    g = torch.Generator().manual_seed(seed)
    steps = len(blocks[0]["input_ids"]) // config.patch_size - 1
    for block in blocks:
        block["noise"] = torch.rand(config.num_samples, steps, config.noise_size, generator=g) - 0.5
        block["target_noise"] = torch.randn(config.num_target_samples, steps, config.latent_size, generator=g)
    return blocks


def collate_with_noise(features: list[dict]) -> dict:
    # Concatenating along the position axis keeps the (batch, step) order of the forward's valid positions.
    batch = CalmDataCollator(patch_size=4)(features)
    batch["noise"] = torch.cat([f["noise"] for f in features], dim=1)
    batch["target_noise"] = torch.cat([f["target_noise"] for f in features], dim=1)
    return batch


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    config = tiny_calm_config(initializer_range=0.2)
    data = with_fixed_noise(token_blocks(8), config)

    def fresh_model():
        torch.manual_seed(0)
        model = CalmForCausalLM(config)
        # Start with distinct head samples: near-coincident samples make the diversity gradient (unit vectors
        # between samples) amplify float rounding, which would blur the comparison.
        torch.nn.init.normal_(model.head.output.fc2.weight, std=0.2)
        return model

    runs = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = fresh_model()
        args = make_args(
            tmp_path, optim="sgd", learning_rate=0.5, max_steps=2, logging_steps=1,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        )
        trainer = CalmTrainer(model=model, args=args, train_dataset=data, data_collator=collate_with_noise)
        trainer.train()
        runs.append((model, trainer.state.log_history))
    (full, full_log), (accumulated, accumulated_log) = runs
    for key in ("loss", "grad_norm", "fidelity", "diversity"):
        assert values_of(accumulated_log, key) == pytest.approx(values_of(full_log, key), rel=1e-5), key
    for (name, p), q in zip(full.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
    initial = fresh_model()
    assert not torch.allclose(full.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)


def test_compiled_training_matches_eager(tmp_path):
    """`TrainingArguments(torch_compile=True)` (the path to CUDA graphs on a GPU) trains the same model: with the
    energy loss's noise given explicitly, the logged terms and the final weights match the eager run."""
    config = tiny_calm_config(initializer_range=0.2)
    data = with_fixed_noise(token_blocks(8), config)
    runs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = CalmForCausalLM(config)
        torch.nn.init.normal_(model.head.output.fc2.weight, std=0.2)  # distinct head samples (see above)
        args = make_args(tmp_path, optim="sgd", learning_rate=0.5, max_steps=3, logging_steps=1,
                         torch_compile=compile_)
        trainer = CalmTrainer(model=model, args=args, train_dataset=data, data_collator=collate_with_noise)
        trainer.train()
        assert hasattr(trainer.model_wrapped, "_orig_mod") == compile_  # really compiled (torch.compile wrapper)
        runs.append((model, trainer.state.log_history))
    (eager, eager_log), (compiled, compiled_log) = runs
    assert len(values_of(eager_log, "loss")) == 3
    for key in ("loss", "grad_norm", "fidelity", "diversity"):
        assert values_of(compiled_log, key) == pytest.approx(values_of(eager_log, key), rel=1e-4), key
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)


def test_checkpoints_are_hub_ready_and_resume_gives_the_same_next_losses(tmp_path):
    data = token_blocks(32)
    args = make_args(tmp_path, logging_steps=1, save_strategy="steps", save_steps=2)
    torch.manual_seed(0)
    trainer = CalmTrainer(
        model=CalmForCausalLM(tiny_calm_config()), args=args, train_dataset=data, data_collator=CalmDataCollator()
    )
    trainer.train()
    losses = values_of(trainer.state.log_history, "loss")
    assert len(losses) == 4

    checkpoint = Path(args.output_dir) / "checkpoint-2"
    assert SHIPPED_CALM_FILES <= {p.name for p in checkpoint.glob("*.py")}
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_calm.CalmForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    final = AutoModelForCausalLM.from_pretrained(Path(args.output_dir) / "checkpoint-4", trust_remote_code=True)
    assert not torch.equal(reloaded.head.output.fc2.weight, final.head.output.fc2.weight)

    torch.manual_seed(123)  # a different initialisation and RNG state: everything must come from the checkpoint
    resumed = CalmTrainer(
        model=CalmForCausalLM(tiny_calm_config()), args=args, train_dataset=data, data_collator=CalmDataCollator()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_losses = values_of(resumed.state.log_history, "loss")
    assert resumed_losses[-2:] == pytest.approx(losses[2:], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# CalmAutoencoderTrainer
# ---------------------------------------------------------------------------------------------------------------


def test_autoencoder_trainer_reports_accuracy_noisy_accuracy_and_kl(tmp_path):
    torch.manual_seed(0)
    model = CalmAutoencoder(tiny_autoencoder_config())
    evaluation = token_blocks(8, seed=1)
    args = make_args(tmp_path, learning_rate=3e-3, max_steps=10, logging_steps=5, gradient_accumulation_steps=2)
    trainer = CalmAutoencoderTrainer(
        model=model, args=args, train_dataset=token_blocks(32), eval_dataset=evaluation,
        data_collator=CalmDataCollator(), latent_noise_stds=[0.3, 10.0],
    )
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 2
    k, kl_weight = model.config.patch_size, model.config.kl_weight
    for entry in train_logs:
        for key in ("loss", "reconstruction_loss", "kl", "accuracy", "grad_norm"):
            assert math.isfinite(entry[key]), (key, entry)
        # Training loss = K * CE + kl_weight * KL per micro-batch, hence also for the window means (and this pins
        # the loss scale under gradient accumulation).
        assert entry["loss"] == pytest.approx(k * entry["reconstruction_loss"] + kl_weight * entry["kl"], rel=1e-5)

    # Spy on what the decoder receives: the noisy evaluations must really perturb the latents.
    spreads = []
    model.decoder.register_forward_hook(lambda module, inputs, output: spreads.append(inputs[0].std().item()))
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_accuracy", "eval_accuracy_noise_0.3", "eval_accuracy_noise_10", "eval_kl"):
        assert 0.0 <= metrics[key] <= (1.0 if "accuracy" in key else math.inf), key
    assert len(spreads) == 2 * 3  # two eval batches x (plain, noise 0.3, noise 10)
    plain, small, large = spreads[0::3], spreads[1::3], spreads[2::3]
    assert all(l > 5.0 > p for l, p in zip(large, plain))  # std-10 noise on latents of scale ~1
    assert all(abs(s**2 - p**2 - 0.09) < 0.05 for s, p in zip(small, plain))
    # The KL involves no sampling: recompute it directly over the two eval batches.
    model.eval()
    with torch.no_grad():
        batches = [CalmDataCollator()(evaluation[i : i + 4]) for i in (0, 4)]
        kl = sum(model(**b).kl_loss.item() for b in batches) / 2
    assert metrics["eval_kl"] == pytest.approx(kl, rel=1e-5)


def test_push_to_hub_keeps_a_calm_card_in_the_output_folder(tmp_path):
    """`Trainer.push_to_hub` (hence `save_model` with push_to_hub) calls `create_model_card`, which writes the
    Trainer's draft over README.md: a CALM card must survive it, any other README.md is still replaced."""
    from modeling_calm.card_calm import build_autoencoder_card

    model = CalmAutoencoder(tiny_autoencoder_config())
    trainer = CalmAutoencoderTrainer(model=model, args=make_args(tmp_path), train_dataset=token_blocks(4),
                                     data_collator=CalmDataCollator())
    readme = Path(trainer.args.output_dir) / "README.md"
    card = build_autoencoder_card(model, model_name="ae", accuracy={"sampled": 0.5, "dataset": "d"})
    card.save(str(readme))
    trainer.create_model_card(model_name="ae")
    assert readme.read_text() == str(card)
    readme.write_text("---\nlicense: mit\n---\n\nsome other card\n")
    trainer.create_model_card(model_name="ae")
    assert "some other card" not in readme.read_text() and "generated_from_trainer" in readme.read_text()


def test_autoencoder_trainer_rejects_bad_noise_levels(tmp_path):
    with pytest.raises(ValueError, match="latent_noise_stds"):
        CalmAutoencoderTrainer(
            model=CalmAutoencoder(tiny_autoencoder_config()), args=make_args(tmp_path), latent_noise_stds=[0.0]
        )


# ---------------------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo on the CPU)
# ---------------------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import gc
import torch, torch.distributed as dist
from transformers import TrainingArguments
from modeling_calm import CalmForCausalLM, CalmTrainer
from modeling_calm.data_calm import CalmDataCollator
from tests.utils import tiny_calm_config

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
data = [{"input_ids": torch.randint(3, 99, (32,), generator=g).tolist()} for _ in range(40)]
model = CalmForCausalLM(tiny_calm_config())
args = TrainingArguments(output_dir="OUT", use_cpu=True, ddp_backend="gloo", max_steps=3, logging_steps=1,
                         per_device_train_batch_size=2, per_device_eval_batch_size=3, eval_strategy="steps",
                         eval_steps=3, save_strategy="no", report_to="none", disable_tqdm=True,
                         learning_rate=1e-2, dataloader_pin_memory=False)
trainer = CalmTrainer(model=model, args=args, train_dataset=data[:32], eval_dataset=data[32:],
                      data_collator=CalmDataCollator())
trainer.train()
assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
gathered = [torch.zeros_like(params) for _ in range(2)]
dist.all_gather(gathered, params)
histories = [None, None]
dist.all_gather_object(histories, [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
                                   for e in trainer.state.log_history])
if dist.get_rank() == 0:
    print("SAME_PARAMS", torch.equal(gathered[0], gathered[1]))
    print("SAME_LOGS", histories[0] == histories[1])
    print("LOGS", histories[0])
# Free the DDP wrapper (it holds the process group) before destroying the group: a group left to interpreter
# teardown sometimes aborts the process ("terminate called without an active exception" from gloo's threads).
del trainer, model
gc.collect()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_ddp_training_with_gloo(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT).replace("OUT", str(tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SAME_PARAMS True" in result.stdout  # gradients were averaged across the processes
    # Metrics are reduced across processes: both processes log the same fidelity, diversity and eval metrics.
    assert "SAME_LOGS True" in result.stdout
    logs = result.stdout.split("LOGS", 2)[-1]
    assert "'fidelity'" in logs and "'eval_brier_lm'" in logs


@pytest.mark.parametrize("head_type", ["energy", "flow"])
def test_fsdp_and_deepspeed_settings_fit_the_model(head_type):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils.dataclasses import get_module_class_from_name

    fsdp = ClusterConfig.from_yaml_file(str(REPO_ROOT / "configuration" / "accelerate" / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_use_orig_params"] is True
    # Without a class list, accelerate wraps `_no_split_modules` and fails on any name the model does not contain.
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp.fsdp_config
    model = CalmForCausalLM(tiny_calm_config(head_type=head_type))
    assert {"LlamaDecoderLayer", "CalmAutoencoderBlock"} <= set(model._no_split_modules)
    for name in model._no_split_modules:
        assert get_module_class_from_name(model, name) is not None, name
    for stage in (2, 3):
        settings = json.loads((REPO_ROOT / "configuration" / "deepspeed" / f"zero{stage}.json").read_text())
        assert settings["zero_optimization"]["stage"] == stage and settings["bf16"]["enabled"] == "auto"
    assert settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # Hub-ready saves


# ---------------------------------------------------------------------------------------------------------------
# The examples, end to end on the CPU
# ---------------------------------------------------------------------------------------------------------------


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_load_into_training_arguments_and_flags_override_them(tmp_path):
    example = load_example("train_calm")
    common = ["--autoencoder", "x", "--train_file", "y", "--output_dir", str(tmp_path), "--use_cpu", "true"]
    _, data_args, args = example.parse_args(common + ["--recipe", "calm", "--learning_rate", "1e-4"])
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.1, 1.0)
    assert args.lr_scheduler_type == "constant_with_warmup" and args.warmup_steps == 2000
    assert args.bf16 and args.learning_rate == 1e-4  # the command line wins over the recipe's 3e-4
    assert data_args.block_size == 8192
    _, _, args = load_example("train_autoencoder").parse_args(
        ["--tokenizer", "t", "--train_file", "y", "--output_dir", str(tmp_path), "--recipe", "tiny"]
    )
    assert args.learning_rate == 3e-3 and not args.bf16
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rat": 1.0}))
    with pytest.raises(ValueError, match="learning_rat"):
        example.parse_args(common + ["--recipe", str(bad)])


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    from modeling_calm.data_calm import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("examples")
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran to the park and then slept in the sun".split()
    corpus = folder / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))}) + "\n")
    train_bpe_tokenizer(corpus, vocab_size=300, output_dir=str(folder / "tokenizer"))
    return folder, corpus


# Runs an example with the Hub replaced: HfApi.create_repo answers, HfApi.upload_folder (every Trainer push ends
# there, on transformers 5.17 and 5.23) records the README.md it would upload into uploads.json.
_RECORDING_HUB = """
import concurrent.futures, json, runpy, sys, types
from pathlib import Path
from huggingface_hub import HfApi

uploads = []
def upload_folder(self, **kwargs):
    readme = Path(kwargs["folder_path"]) / "README.md"
    uploads.append({"repo_id": kwargs["repo_id"], "readme": readme.read_text() if readme.exists() else None})
    done = concurrent.futures.Future()
    done.set_result(None)
    return done if kwargs.get("run_as_future") else None
HfApi.create_repo = lambda self, repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id)
HfApi.upload_folder = upload_folder
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    Path("uploads.json").write_text(json.dumps(uploads))
"""


def run_example(name: str, args: list[str], folder: Path, recording_hub: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_DATASETS_CACHE": str(folder / "datasets_cache")}
    command = [sys.executable, str(REPO_ROOT / "examples" / f"{name}.py"), *args]
    if recording_hub:
        command[1:1] = ["-c", _RECORDING_HUB]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_examples_run_as_two_processes_under_torchrun(corpus_and_tokenizer, tmp_path):
    """Both training examples as `torchrun --nproc_per_node 2 ... --use_cpu true --ddp_backend gloo` (the multi-GPU
    command with CPU processes): tokenising once under main_process_first, DDP training, evaluation, one model card
    and a Hub-ready folder written by the main process."""
    folder, corpus = corpus_and_tokenizer
    common = ["--preset", "tiny", "--recipe", "tiny", "--train_file", str(corpus), "--max_steps", "2",
              "--block_size", "32", "--per_device_train_batch_size", "2", "--eval_steps", "2", "--save_steps", "2",
              "--validation_blocks", "4", "--disable_tqdm", "true", "--use_cpu", "true", "--ddp_backend", "gloo"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}

    def torchrun(name, args):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(REPO_ROOT / "examples" / f"{name}.py"), *common, *args]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    ae_dir, calm_dir = tmp_path / "autoencoder", tmp_path / "calm"
    stdout = torchrun("train_autoencoder", ["--tokenizer", str(folder / "tokenizer"), "--output_dir", str(ae_dir)])
    assert "2 process(es)" in stdout
    assert "eval_accuracy" in json.loads((ae_dir / "eval_results.json").read_text())
    stdout = torchrun("train_calm", ["--autoencoder", str(ae_dir), "--output_dir", str(calm_dir)])
    assert "2 process(es)" in stdout
    state = json.loads((calm_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2  # per process; 2 processes
    metrics = json.loads((calm_dir / "eval_results.json").read_text())
    assert {"eval_loss", "eval_brier_lm"} <= set(metrics)
    assert ModelCard.load(calm_dir / "README.md").data.eval_results[0].metric_type == "brier_lm"
    model = AutoModelForCausalLM.from_pretrained(calm_dir, trust_remote_code=True)
    autoencoder = CalmAutoencoder.from_pretrained(ae_dir)
    for name, tensor in autoencoder.state_dict().items():  # stage 2 left the autoencoder untouched
        torch.testing.assert_close(model.autoencoder.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_examples_train_an_autoencoder_then_a_calm_on_it(corpus_and_tokenizer):
    folder, corpus = corpus_and_tokenizer
    common = ["--preset", "tiny", "--recipe", "tiny", "--train_file", str(corpus), "--max_steps", "3",
              "--block_size", "32", "--per_device_train_batch_size", "4", "--eval_steps", "3", "--save_steps", "3",
              "--validation_blocks", "4", "--disable_tqdm", "true"]
    ae_dir, calm_dir = folder / "autoencoder", folder / "calm"
    stdout = run_example("train_autoencoder", common + ["--tokenizer", str(folder / "tokenizer"),
                                                        "--output_dir", str(ae_dir)], folder)
    assert "1 process(es)" in stdout
    metrics = json.loads((ae_dir / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_accuracy_noise_0.3", "eval_kl"} <= set(metrics)
    assert (ae_dir / "tokenizer.json").exists()
    # The model card: the final evaluation in the model-index, on the held-out blocks of the training file.
    card = ModelCard.load(ae_dir / "README.md")
    results = {r.metric_config: r for r in card.data.eval_results}
    assert results["latent_sample"].metric_value == metrics["eval_accuracy"]
    assert results["latent_noise_0.3"].metric_value == metrics["eval_accuracy_noise_0.3"]
    assert {r.dataset_type for r in results.values()} == {"corpus.jsonl"}
    assert card.data.pipeline_tag == "feature-extraction" and "corpus.jsonl" in card.text
    assert "| K (tokens per chunk, `patch_size`) | 4 |" in card.text and "3 steps" in card.text

    push = ["--push_to_hub", "true", "--hub_model_id", "calm-org/calm"]  # to the recording Hub above
    run_example("train_calm", common + ["--autoencoder", str(ae_dir), "--output_dir", str(calm_dir), *push], folder,
                recording_hub=True)
    metrics = json.loads((calm_dir / "eval_results.json").read_text())
    assert {"eval_loss", "eval_fidelity", "eval_diversity", "eval_brier_4", "eval_brier_lm"} <= set(metrics)
    card = ModelCard.load(calm_dir / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"brier_lm", "brier_1", "brier_2", "brier_3", "brier_4"}
    for name, result in results.items():
        assert result.metric_value == metrics[f"eval_{name}"] and result.metric_config == "trainer_eval"
        assert result.dataset_type == "corpus.jsonl"
    assert "quick estimate" in card.text and "examples/evaluate_brierlm.py" in card.text
    assert 'from_pretrained("calm-org/calm", trust_remote_code=True)' in card.text
    assert card.data.model_name == "calm" and "| K (tokens per step, `patch_size`) | 4 |" in card.text
    # save_model pushed the folder with this card, not the Trainer's generic one.
    uploads = json.loads((folder / "uploads.json").read_text())
    assert uploads[-1] == {"repo_id": "calm-org/calm", "readme": (calm_dir / "README.md").read_text()}
    assert SHIPPED_CALM_FILES <= {p.name for p in (calm_dir / "checkpoint-3").glob("*.py")}
    model = AutoModelForCausalLM.from_pretrained(calm_dir, trust_remote_code=True)
    autoencoder = CalmAutoencoder.from_pretrained(ae_dir)
    for name, tensor in autoencoder.state_dict().items():  # stage 2 left the autoencoder untouched
        torch.testing.assert_close(model.autoencoder.state_dict()[name], tensor, rtol=0, atol=0)
