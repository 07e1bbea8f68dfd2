"""The README's main job, examples/quickstart.py, end to end with a few steps per stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.utils import SHIPPED_CALM_FILES


ROOT = Path(__file__).resolve().parents[1]


def run_quickstart(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output_dir", str(tmp_path / "out"), *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_writes_a_hub_ready_folder(tmp_path):
    result = run_quickstart(tmp_path, "--max_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.json"} <= names
    assert SHIPPED_CALM_FILES <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_calm.CalmForCausalLM"
    card = ModelCard.load(out / "README.md")
    metrics = {result.metric_type for result in card.data.eval_results}
    assert "brier_lm" in metrics
    assert "trust_remote_code=True" in card.text
    assert (out / "autoencoder" / "model.safetensors").exists() and (out / "autoencoder" / "README.md").exists()
    summary = result.stdout
    for line in ("autoencoder accuracy", "BrierLM (held-out)", "sample T=1.0", "sample T=0.5", "reloaded, T=0.5"):
        assert line in summary, summary[-2000:]


@pytest.mark.slow
def test_quickstart_trains_on_a_users_file(tmp_path):
    text = tmp_path / "mine.txt"
    sentences = [f"Line {i} of my own corpus says that chunk {i % 7} follows chunk {i % 5}." for i in range(400)]
    text.write_text("\n\n".join(sentences))  # one document per paragraph
    result = run_quickstart(tmp_path, "--max_steps", "2", "--train_file", str(text), "--vocab_size", "300")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mine.txt" in result.stdout and "BrierLM (held-out)" in result.stdout


@pytest.mark.slow
def test_quickstart_rejects_an_empty_train_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_quickstart(tmp_path, "--max_steps", "2", "--train_file", str(empty))
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "empty.txt" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "lines, args, message",
    [
        (400, ("--max_steps", "0"), "--max_steps must be >= 1"),
        (400, ("--block_size", "30"), "must be a multiple of the preset's K=4"),
        (19, (), "has 19 non-empty documents"),
    ],
)
def test_quickstart_rejects_bad_sizes(tmp_path, lines, args, message):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Line {i} of a corpus says that chunk {i % 7} follows chunk {i % 5}." for i in range(lines)))
    result = run_quickstart(tmp_path, "--train_file", str(text), "--vocab_size", "300", *args)
    assert result.returncode != 0
    assert "ValueError" in result.stderr and message in result.stderr
    assert not (tmp_path / "out" / "config.json").exists()  # nothing half-written
