"""Issue 16 ("Nothing silent"), "Also": push_calm_to_hub pushes a Trainer checkpoint's model files only, never its
optimizer state or pickled training arguments. The Hub is replaced by a recorder: nothing touches the network."""

import os
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import HfApi
from transformers import TrainingArguments

from modeling_calm import CalmForCausalLM, CalmTrainer
from modeling_calm.card_calm import push_calm_to_hub
from modeling_calm.data_calm import CalmDataCollator
from tests.utils import tiny_calm_config


def test_a_trainer_checkpoint_is_pushed_without_its_training_state(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pushed = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: pushed.extend(
        op.path_in_repo for op in operations))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 99, (16,), generator=g).tolist()} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, save_steps=1,
                             report_to="none", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False)
    CalmTrainer(model=CalmForCausalLM(tiny_calm_config()), args=args, train_dataset=data,
                data_collator=CalmDataCollator()).train()
    checkpoint = Path(tmp_path) / "checkpoint-1"
    assert {"optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json"} <= set(os.listdir(checkpoint))

    push_calm_to_hub(checkpoint, "calm-org/calm-tiny", validate_card=False)
    assert {"config.json", "model.safetensors", "modeling_calm.py", "README.md"} <= set(pushed)
    assert not {n for n in pushed if n.endswith((".pt", ".pth", ".bin")) or n == "trainer_state.json"}, pushed
