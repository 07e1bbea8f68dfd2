"""examples/evaluate_brierlm.py over two CPU processes (torchrun, gloo) against one process: the same BrierLM.

evaluate_brier seeds one generator per batch from (seed, batch index) and shards batches round-robin over the
processes, so the numbers of a seed must not depend on the number of processes; the per-batch sums are added in
batch order after the gather, so they are compared exactly.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_calm import CalmForCausalLM
from tests.utils import word_tokenizer
from tests.utils import tiny_calm_config


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "evaluate_brierlm.py"


@pytest.fixture(scope="module")
def models_and_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("brier_distributed")
    words = [f"w{i}" for i in range(60)]  # ids 3..62: inside both vocabularies (99 and 64)
    tokenizer = word_tokenizer(words)
    tokenizer.save_pretrained(folder / "tokenizer")
    rng = random.Random(0)
    text = folder / "eval.jsonl"
    with open(text, "w", encoding="utf-8") as f:
        for _ in range(12):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 40)))}) + "\n")
    torch.manual_seed(0)
    calm = CalmForCausalLM(tiny_calm_config())
    calm.save_pretrained(folder / "calm")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    llama.save_pretrained(folder / "llama")
    return folder, text


def evaluate(folder: Path, text: Path, model: str, output: Path, processes: int) -> tuple[dict, str]:
    args = [str(SCRIPT), "--model", str(folder / model), "--tokenizer", str(folder / "tokenizer"),
            "--eval_file", str(text), "--block_size", "32", "--batch_size", "2", "--seeds", "0", "1",
            "--max_blocks", "9", "--device", "cpu", "--output", str(output)]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # one process: no group
        env.pop(name, None)
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(output.read_text()), result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model", ["calm", "llama"])
def test_two_processes_give_the_brierlm_of_one(models_and_text, tmp_path, model):
    folder, text = models_and_text
    one, one_stdout = evaluate(folder, text, model, tmp_path / "one.json", processes=1)
    two, two_stdout = evaluate(folder, text, model, tmp_path / "two.json", processes=2)
    assert "1 process(es)" in one_stdout and "2 process(es)" in two_stdout
    assert two_stdout.count("wrote ") == 1  # only the main process reports
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    # 9 blocks in 5 batches of 2: process 0 scores batches 0, 2, 4 (one of 1 block), process 1 batches 1, 3.
    assert one["num_blocks"] == two["num_blocks"] == 9
    assert one["num_positions"] == two["num_positions"] > 0
    assert two["per_seed"] == one["per_seed"]  # exact: the same sums, added in the same order
    assert two["pooled"] == one["pooled"] and two["mean"] == one["mean"]
    if model == "llama":  # a random tiny CALM decodes both samples to the same tokens everywhere (Brier-n = -1)
        values = [{k: v for k, v in r.items() if k != "seed"} for r in one["per_seed"]]
        assert values[0] != values[1]  # the seeds give different samples, so the comparison can fail
