"""Issue 19's upcycling experiment (benchmarks/real_results/upcycle_experiment.sh and the pipeline's `upcycle` and
`summary` stages) end to end at tiny sizes on the CPU: result keys, FLOP accounting, and that the upcycled CALM
started from the Transformer's X-second checkpoint."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from modeling_calm import CalmAutoencoder, CalmForCausalLM
from modeling_calm.data_calm import train_bpe_tokenizer


ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "benchmarks/real_results/pipeline.py"
SCRIPT = ROOT / "benchmarks/real_results/upcycle_experiment.sh"
WORDS = "the a of river city was born in and to film album song team war king church station school is".split()


def _pipeline_module():
    spec = importlib.util.spec_from_file_location("real_results_pipeline", PIPELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("upx_data")
    rng = random.Random(0)
    corpus = root / "train.jsonl"
    corpus.write_text("".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))}) + "\n"
        for _ in range(400)
    ))
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(300))}) + "\n"
                                 for _ in range(4)))
    train_bpe_tokenizer(corpus, vocab_size=300, min_frequency=2, output_dir=root / "tokenizer")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/real_results/prepare_data.py"), "--train_file", str(corpus),
         "--tokenizer", str(root / "tokenizer"), "--eval_file", str(eval_file), "--output_dir", str(root / "data"),
         "--holdout_every", "10"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "data"


def run_experiment(data, work, out, **env):
    environment = {**os.environ, "PYTHON": sys.executable, "TINY": "1", "X": "3", "Y": "3", "SEEDS": "0 1",
                   "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), str(data), str(work), str(out)], env=environment,
                          capture_output=True, text=True, timeout=900)


def test_upcycle_experiment_tiny(data, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    result = run_experiment(data, work, out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "upcycle_experiment.log"]
    results = json.loads((out / "results.json").read_text())
    log = (out / "upcycle_experiment.log").read_text()
    assert "(c) Transformer X -> upcycled CALM Y" in log and "pipeline exit status 0" in log

    arguments = results["setup"]["arguments"]
    tokens_per_step = arguments["lm_batch"] * arguments["block_size"]
    assert arguments["donor_seconds"] == 3 and arguments["lm_seconds"] == 6  # --tiny's budget, X = 3
    baseline, calm, upcycle = (results[f"{n}_training"] for n in ("baseline", "calm", "upcycle"))
    donor = json.loads((work / "baseline" / "donor" / "donor.json").read_text())
    assert upcycle["donor"] == donor == baseline["donor"]

    # The donor is the baseline at X seconds, during the same run: fewer steps, its own FLOPs.
    assert 3 <= donor["train_seconds"] < baseline["train_seconds"] and 0 < donor["steps"] < baseline["steps"]
    transformer = LlamaForCausalLM.from_pretrained(work / "baseline" / "donor")
    config = transformer.config
    matmul = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    llama_per_token = 6 * matmul + 12 * config.num_hidden_layers * arguments["block_size"] * config.hidden_size
    assert donor["flops_per_token"] == baseline["flops_per_token"] == llama_per_token
    assert donor["train_flops"] == donor["steps"] * tokens_per_step * llama_per_token
    # Equal training time: the upcycled CALM trains for what the donor left of --lm_seconds.
    assert upcycle["train_seconds"] >= 6 - donor["train_seconds"]
    assert upcycle["flops_per_token"] == calm["flops_per_token"]  # the same CALM, only its start differs

    summary = results["upcycling"]
    assert summary["x_seconds"] == donor["train_seconds"] and summary["y_seconds"] == upcycle["train_seconds"]
    arms = summary["arms"]
    assert set(arms) == {"a_transformer", "b_calm_scratch", "c_upcycled"}
    for key, training in (("a_transformer", baseline), ("b_calm_scratch", calm)):
        assert arms[key]["train_flops"] == training["steps"] * tokens_per_step * training["flops_per_token"]
        assert arms[key]["steps"] == training["steps"] and arms[key]["train_seconds"] >= 6
    c = arms["c_upcycled"]
    assert c["train_flops"] == donor["train_flops"] + upcycle["steps"] * tokens_per_step * upcycle["flops_per_token"]
    assert c["steps"] == donor["steps"] + upcycle["steps"] and c["calm"]["steps"] == upcycle["steps"]
    assert c["train_seconds"] == pytest.approx(donor["train_seconds"] + upcycle["train_seconds"])
    assert c["train_seconds"] >= 6
    for name, row in arms.items():
        for label in ("heldout", "wikitext103"):
            score = row[f"brier_lm_{label}"]
            assert score["seeds"] == [0, 1] and score["std"] >= 0 and score["mean"] >= 0, (name, label)
        assert set(row["samples"]) == {"T1.0", "T0.5"} and all(len(v) == 2 for v in row["samples"].values())
    assert c["brier_lm_heldout"]["mean"] == results["brier_lm_heldout"]["upcycle"]["mean"]["brier_lm"]
    assert arms["a_transformer"]["brier_lm_wikitext103"]["mean"] == results["brier_lm"]["baseline"]["mean"]["brier_lm"]

    # The upcycled CALM's backbone started as the saved X-second Transformer's (checksum taken before training),
    # which is not the finished Transformer; training then moved it; the autoencoder is the trained one, frozen.
    checksum = _pipeline_module().state_checksum
    assert upcycle["start"]["backbone_checksum"] == donor["backbone_checksum"] == checksum(transformer.model)
    final = LlamaForCausalLM.from_pretrained(work / "baseline" / "model")
    assert checksum(final.model) != donor["backbone_checksum"]
    upcycled = CalmForCausalLM.from_pretrained(work / "upcycle" / "model")
    assert checksum(upcycled.model) != donor["backbone_checksum"]
    assert upcycled.config.backbone_config.max_position_embeddings == config.max_position_embeddings  # the donor's
    autoencoder = CalmAutoencoder.from_pretrained(work / "ae" / "model")
    for name, tensor in autoencoder.state_dict().items():
        assert torch.equal(upcycled.autoencoder.state_dict()[name], tensor), name

    # Resumable: a second call finds every training stage done and only re-prints the summary.
    again = run_experiment(data, work, tmp_path / "out2")
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("already done") == 8
    assert json.loads((tmp_path / "out2" / "results.json").read_text())["upcycling"] == summary


def test_upcycle_stage_and_flags_refuse_what_cannot_work(data, tmp_path):
    def pipeline(*args):
        return subprocess.run([sys.executable, str(PIPELINE), "--data", str(data), "--work", str(tmp_path / "w"),
                               "--tiny", *args], capture_output=True, text=True, timeout=300)

    result = pipeline("--stages", "upcycle")
    assert result.returncode != 0 and "no donor checkpoint" in result.stderr
    result = pipeline("--donor_seconds", "6", "--stages", "baseline")
    assert result.returncode != 0 and "--donor_seconds must be > 0 and below --lm_seconds (6" in result.stderr
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "w", "o"], capture_output=True, text=True)
    assert result.returncode == 2 and "train_ids.npy is missing" in result.stderr
