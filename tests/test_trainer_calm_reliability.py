"""Issue 16 ("Nothing silent"), trainer side: divergence is caught at the step that meets it and never saved,
batches and epochs without a scored target are reported, a checkpoint without its optimizer state is not resumed
silently. Tiny models, a few CPU steps each; nothing touches the network."""

import logging as std_logging
import os
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments
from transformers.utils import logging

from modeling_calm import CalmAutoencoder, CalmAutoencoderTrainer, CalmForCausalLM, CalmTrainer
from modeling_calm.data_calm import CalmDataCollator
from tests.utils import tiny_autoencoder_config, tiny_calm_config


os.environ["HF_HUB_OFFLINE"] = "1"


def blocks(n: int, length: int = 32, seed: int = 0, labels=None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(3, 99, (length,), generator=g).tolist()} for _ in range(n)]
    if labels is not None:
        for row in rows:
            row["labels"] = [labels] * length
    return rows


def args_for(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
        dataloader_pin_memory=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def make_trainer(kind: str, tmp_path, data=None, **kwargs):
    if kind == "calm":
        model, trainer_class = CalmForCausalLM(tiny_calm_config()), CalmTrainer
    else:
        model, trainer_class = CalmAutoencoder(tiny_autoencoder_config()), CalmAutoencoderTrainer
    args = args_for(tmp_path, **kwargs.pop("args", {}))
    return trainer_class(model=model, args=args, train_dataset=data or blocks(16), data_collator=CalmDataCollator(),
                         **kwargs)


def poison_after(trainer, step: int) -> None:
    """From optimizer step `step` on (1-based), the model's first trainable weight is NaN in the forward: a
    deterministic divergence (the same as a huge learning rate, which gives NaN a step or two later)."""
    model = trainer.model
    weight = next(p for p in model.parameters() if p.requires_grad)

    def hook(module, inputs):
        if module.training and trainer.state.global_step + 1 >= step:
            with torch.no_grad():
                weight.fill_(float("nan"))

    model.register_forward_pre_hook(hook)


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


@pytest.fixture
def caplog_hf(caplog):
    logging.enable_propagation()
    caplog.set_level(std_logging.WARNING)
    yield caplog
    logging.disable_propagation()


# -- item 2: divergence -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["calm", "autoencoder"])
def test_huge_learning_rate_raises_at_the_step_and_is_never_saved(kind, tmp_path):
    # The reported fault, as a user meets it: lr 1e10 logged `loss 0.0`, train() returned and save_model wrote NaN.
    trainer = make_trainer(kind, tmp_path, args={"learning_rate": 1e10})
    with pytest.raises(FloatingPointError, match=r"Non-finite .* at optimizer step [0-9]+: .*on_nonfinite='stop'"):
        trainer.train()
    if not all_finite(trainer.model):
        with pytest.raises(ValueError, match="Refusing to save a model with non-finite weights"):
            trainer.save_model(str(tmp_path / "saved"))
        assert not (tmp_path / "saved" / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["calm", "autoencoder"])
def test_nonfinite_loss_raises_naming_the_step_before_the_update(kind, tmp_path):
    trainer = make_trainer(kind, tmp_path)
    poison_after(trainer, 3)
    with pytest.raises(FloatingPointError, match="Non-finite loss at optimizer step 3:"):
        trainer.train()
    assert trainer.state.global_step == 2 and trainer.nonfinite_steps == [3]


def test_stop_ends_training_with_a_logged_error_and_skip_drops_the_update(tmp_path, caplog_hf):
    trainer = make_trainer("calm", tmp_path, on_nonfinite="stop")
    poison_after(trainer, 2)
    trainer.train()  # returns, but says so
    assert trainer.state.global_step == 2 and trainer.nonfinite_steps == [2]
    assert "Non-finite loss at optimizer step 2" in caplog_hf.text and "Training stopped" in caplog_hf.text

    caplog_hf.clear()
    trainer = make_trainer("autoencoder", tmp_path, on_nonfinite="skip")
    weight = next(p for p in trainer.model.parameters() if p.requires_grad)
    # Every update's gradients are NaN from step 3 on (a gradient hook on one weight).
    weight.register_hook(lambda g: torch.full_like(g, float("nan")) if trainer.state.global_step + 1 >= 3 else g)
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.nonfinite_steps == [3, 4]
    assert "Non-finite gradients at optimizer step 3" in caplog_hf.text and "skipped" in caplog_hf.text
    assert all_finite(trainer.model)


def test_checkpoints_and_save_model_refuse_nonfinite_weights(tmp_path):
    trainer = make_trainer("calm", tmp_path, args={"max_steps": 1})
    trainer.train()
    with torch.no_grad():
        trainer.model.head.output.fc2.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite weights .*head\.output\.fc2\.weight"):
        trainer.save_model()
    assert not (Path(trainer.args.output_dir) / "model.safetensors").exists()
    with pytest.raises(ValueError, match="non-finite weights"):
        trainer._save_checkpoint(trainer.model, trial=None)
    assert not list(Path(trainer.args.output_dir).glob("checkpoint-*/model.safetensors"))


def test_on_nonfinite_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('raise', 'stop', 'skip'\), got 'ignore'"):
        make_trainer("calm", tmp_path, on_nonfinite="ignore")


# -- item 10: no valid target -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["calm", "autoencoder"])
def test_an_epoch_without_any_target_is_an_error(kind, tmp_path):
    # Both models give a zero loss (attached to the graph, not 0/0 = NaN) for a batch without targets, so with the
    # default settings the epoch's end reports that nothing was trained.
    with pytest.raises(ValueError, match=r"No training batch had a scored target in the 2 optimizer steps"):
        make_trainer(kind, tmp_path, data=blocks(8, labels=-100), args={"max_steps": -1, "num_train_epochs": 1}).train()
    # The same with on_nonfinite="skip".
    trainer = make_trainer(kind, tmp_path, data=blocks(8, labels=-100), args={"max_steps": -1, "num_train_epochs": 1},
                           on_nonfinite="skip")
    with pytest.raises(ValueError, match=r"No training batch had a scored target in the 2 optimizer steps of the "
                                         r"epoch up to epoch 1\.00 .*every label is -100 or padding"):
        trainer.train()
    # With max_steps inside the first epoch, its (partial) end says the same.
    trainer = make_trainer(kind, tmp_path, data=blocks(16, labels=-100), args={"max_steps": 2}, on_nonfinite="skip")
    with pytest.raises(ValueError, match=r"in the 2 optimizer steps of the epoch up to epoch 0\.50"):
        trainer.train()


def test_a_batch_without_a_target_warns_once(tmp_path, caplog_hf):
    # Batches 1 and 3 (sequential order) have every label -100; the others train.
    data = blocks(16)
    for i in (*range(4), *range(8, 12)):
        data[i]["labels"] = [-100] * 32
    for row in data:
        row.setdefault("labels", row["input_ids"])
    trainer = make_trainer("calm", tmp_path, data=data)
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(data)
    trainer.train()
    warnings = [r.getMessage() for r in caplog_hf.records if "had no scored target" in r.getMessage()]
    assert warnings == ["Optimizer step 1: 1 training batch(es) had no scored target (every label -100 or padding, "
                        "or sequences of a single chunk); they add nothing to the loss. (Warned once.)"]
    assert trainer.state.global_step == 4


# -- "Also": resuming without the optimizer state --------------------------------------------------------------

def test_resume_without_optimizer_or_scheduler_state_is_refused_unless_asked(tmp_path, caplog_hf):
    data = blocks(16)
    args = {"save_strategy": "steps", "save_steps": 2}
    make_trainer("calm", tmp_path, data=data, args=args).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-2, which has no optimizer.pt: .*resume_without_optimizer=True"):
        make_trainer("calm", tmp_path, data=data, args=args).train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / "scheduler.pt").unlink()
    trainer = make_trainer("calm", tmp_path, data=data, args=args, resume_without_optimizer=True)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    assert "has no optimizer.pt and no scheduler.pt" in caplog_hf.text
