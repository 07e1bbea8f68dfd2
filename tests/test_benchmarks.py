"""The GPU scripts (benchmarks/) at tiny sizes on the CPU, run as on the GPU machine: from the checkout, with the
package not installed, so each script must find `modeling_calm` through its own path set-up.

A run on the H100 once failed at its first import because a script relied on the package being installed; these
tests catch that class of fault (and broken arguments, JSON fields, resumption) before device time is spent."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_calm.data_calm import train_bpe_tokenizer
from tests.utils import WORDS, word_tokenizer, write_word_corpus


ROOT = Path(__file__).resolve().parents[1]

# Runs argv[1] as __main__ with argv[2:], after removing every way the installed package could be found (the
# editable install's finder and any sys.path entry for the checkout); asserts that it is then not importable.
_BARE_CHECKOUT_RUNNER = """
import importlib.util, os, runpy, sys
root = os.path.realpath({root!r})
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != root]
sys.meta_path[:] = [
    f for f in sys.meta_path
    if "editable" not in (str(getattr(f, "__module__", "")) + type(f).__module__ + type(f).__name__).lower()
]
assert importlib.util.find_spec("modeling_calm") is None, "modeling_calm is still importable"
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # what `python script.py` puts first
runpy.run_path(script, run_name="__main__")
"""


def run_script(script: str, *args: str, cwd: Path, timeout: int = 600) -> str:
    code = _BARE_CHECKOUT_RUNNER.format(root=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_runner_really_hides_the_installed_package(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import modeling_calm\n")
    code = _BARE_CHECKOUT_RUNNER.format(root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code, str(probe)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "No module named 'modeling_calm'" in result.stderr


@pytest.mark.slow
def test_bench_generate_tiny(tmp_path):
    out = tmp_path / "generate.json"
    stdout = run_script("benchmarks/bench_generate.py", "--tiny", "--batch-sizes", "1", "3", "--new-tokens", "8",
                        "--output", out, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["errors"] == []
    rows = {(r["model"], r["batch_size"], r["temperature"]) for r in report["results"]}
    for batch in (1, 3):
        for temperature in (1.0, 0.5):
            assert ("CALM (cudagraph)", batch, temperature) in rows and ("CALM eager", batch, temperature) in rows
        assert ("Llama generate (default)", batch, None) in rows
        assert ("Llama generate (static+compiled)", batch, None) in rows
    assert all(r["tokens_per_second"] > 0 and len(r["all_seconds"]) == 1 for r in report["results"])
    checks = {c["check"] for c in report["checks"]}
    assert {"T=1 vs Llama default generate (batch 1)", "T=1 tokens/s at batch 1"} <= checks
    assert {"first call, CALM (cudagraph) batch 3 T=0.5 (s)", "T=0.5 tokens/s at batch 1 (CALM (cudagraph))"} <= checks
    assert "| target | value | needed | met |" in stdout and "first call s" in stdout


@pytest.mark.slow
def test_profile_decoding_tiny_times_every_part(tmp_path):
    out = tmp_path / "profile.json"
    stdout = run_script("benchmarks/profile_decoding.py", "--tiny", "--shapes", "1x1", "2x3", "--repeats", "2",
                        "--output", out, cwd=tmp_path)
    report = json.loads(out.read_text())
    parts = {(r["batch"], r["N"], r["part"]): r["ms"] for r in report["parts"]}
    for shape in ((1, 1), (2, 3)):
        for part in ("backbone + embed_chunks (one chunk)", "head sample", "decode_tokens", "whole step (_calm_step)"):
            assert parts[(*shape, part)] > 0
    assert (2, 3, "selection (multiplicities, probabilities, pick)") in parts
    assert (1, 1, "selection (multiplicities, probabilities, pick)") not in parts
    assert set(report["weights_bytes"]) == {"backbone", "head", "autoencoder decoder + projection"}
    assert "| batch | N | part | ms |" in stdout


@pytest.mark.parametrize("shape, message", [("2", "is not BATCHxN"), ("ax2", "is not BATCHxN"),
                                            ("0x3", "needs a positive batch and N")])
def test_profile_decoding_refuses_a_bad_shape(tmp_path, shape, message):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_decoding.py"), "--tiny", "--shapes",
                             shape], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and f"--shapes: {shape!r} {message}" in result.stderr, result.stderr


@pytest.mark.slow
def test_bench_brier_tiny(tmp_path):
    """BrierLM speed, CALM against the same-backbone Llama: a text tokenised into blocks (the last one padded),
    both CALM paths (same numbers) and the Llama timed over 3 seeds, ratios in the same run, the profile."""
    rng = random.Random(0)
    text = tmp_path / "eval.jsonl"
    text.write_text("".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))}) + "\n" for _ in range(8)
    ))
    word_tokenizer(WORDS).save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "brier.json"
    stdout = run_script("benchmarks/bench_brier.py", "--tiny", "--text", text, "--tokenizer", tmp_path / "tokenizer",
                        "--max-blocks", "3", "--repeats", "2", "--profile", "--output", out, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["results"]] == ["CALM", "CALM (per-seed, full decoding)", "Llama"]
    data = report["data"]
    assert data["num_blocks"] == 3 and data["block_size"] == 64 and data["blocks_in_source"] >= 3
    for row in report["results"]:
        assert row["tokens_per_second"] > 0 and row["seconds"] > 0
        assert row["tokens_per_second"] == pytest.approx(3 * data["tokens_scored_per_seed"] / row["seconds"])
    calm, baseline, llama = report["results"]
    assert len(calm["all_seconds"]) == len(baseline["all_seconds"]) == 2 and len(llama["all_seconds"]) == 1
    assert calm["num_positions_per_seed"] == baseline["num_positions_per_seed"] == 3 * (64 - 4) // 4
    assert llama["num_positions_per_seed"] == 3 * (64 - 4)
    assert calm["brier"] == baseline["brier"] and report["ratios"]["CALM paths give identical Brier numbers"]
    assert 0 < calm["vocab_projection_rows"] < baseline["vocab_projection_rows"]
    assert report["ratios"]["CALM / Llama tokens/s"] == pytest.approx(
        calm["tokens_per_second"] / llama["tokens_per_second"]
    )
    shares = report["profile"]["calm_module_seconds"]["seconds"]
    assert shares["backbone (transformer over chunks)"] > 0
    assert shares["vocabulary projection (lm_head + argmax input)"] > 0
    assert "| model | tokens/s |" in stdout and "| CALM / Llama tokens/s |" in stdout
    assert "Llama top operators" in stdout

    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_brier.py"), "--tiny", "--random-tokens",
                          "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "--random-tokens must be >= 1, got 0" in bad.stderr


@pytest.mark.slow
def test_bench_train_tiny(tmp_path):
    out = tmp_path / "train.json"
    run_script("benchmarks/bench_train.py", "--tiny", "--warmup", "1", "--steps", "2", "--json", out, cwd=tmp_path)
    summary = json.loads(out.read_text())
    results = {r["model"]: r for r in summary["results"]}
    assert set(results) == {"calm", "llama"} and not any("error" in r for r in results.values())
    for r in results.values():
        assert r["tokens_per_step"] == 2 * 256 and r["tokens_per_second"] > 0 and r["trainable_parameters"] > 0
    assert summary["calm_over_llama_tokens_per_second"] == pytest.approx(
        results["calm"]["tokens_per_second"] / results["llama"]["tokens_per_second"]
    )


@pytest.mark.slow
def test_bench_trainer_tiny(tmp_path):
    """The CalmTrainer benchmark runs from a bare checkout and records the energy loss's terms as the Trainer
    logged them (loss = 2 * fidelity - diversity at every logged step)."""
    out = tmp_path / "trainer.json"
    run_script("benchmarks/bench_trainer.py", "--tiny", "--compile-mode", "none", "--warmup", "1", "--steps", "3",
               "--json", out, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["tokens_per_step"] == 2 * 256 and result["tokens_per_second"] > 0
    assert result["environment"]["compile_mode"] == "none" and result["trainable_parameters"] > 0
    assert [entry["step"] for entry in result["logged"]] == [1, 2, 3, 4]
    for entry in result["logged"]:
        assert entry["loss"] == pytest.approx(2 * entry["fidelity"] - entry["diversity"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_real_results_pipeline_tiny_and_resumable(tmp_path):
    rng = random.Random(0)
    corpus = write_word_corpus(tmp_path / "train.jsonl", rng)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(300))}) + "\n" for _ in range(4)
    ))
    train_bpe_tokenizer(corpus, vocab_size=300, min_frequency=2, output_dir=tmp_path / "tokenizer")
    data, work = tmp_path / "data", tmp_path / "work"
    run_script("benchmarks/real_results/prepare_data.py", "--train_file", corpus, "--tokenizer",
               tmp_path / "tokenizer", "--eval_file", eval_file, "--output_dir", data, "--holdout_every", "10",
               cwd=tmp_path)
    meta = json.loads((data / "data.json").read_text())
    assert meta["documents"] == 360 and meta["heldout_documents"] == 40 and (data / "train_ids.npy").exists()
    heldout = [json.loads(line)["text"] for line in (data / "heldout.jsonl").read_text().splitlines()]
    documents = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert heldout == documents[9::10]  # every 10th document, kept out of training
    assert meta["tokens"] > 360

    run_script("benchmarks/real_results/pipeline.py", "--data", data, "--work", work, "--tiny", cwd=tmp_path)
    results = json.loads((work / "results.json").read_text())
    ae = results["autoencoder_eval"]
    assert set(ae["accuracy_mean_plus_noise"]) == {"0.0", "0.1", "0.2", "0.3", "0.5"}
    assert all(0 <= v <= 1 for v in ae["accuracy_mean_plus_noise"].values())
    assert 0 <= ae["active_dimensions"] <= ae["latent_size"] == 16
    for name in ("calm", "baseline"):
        training = results[f"{name}_training"]
        assert training["steps"] > 0 and training["train_flops"] > 0 and training["curve"]
        assert training["epochs"] == pytest.approx(training["tokens"] / meta["tokens"])
        assert [s["seed"] for s in results["brier_lm"][name]["per_seed"]] == [0, 1]
        assert [s["seed"] for s in results["brier_lm_heldout"][name]["per_seed"]] == [0, 1]
        for temperature in (1.0, 0.5, 0.33):
            assert len(results["samples"][f"{name}_T{temperature}"]) == 2

    out = tmp_path / "ngram.json"
    run_script("benchmarks/real_results/ngram_reference.py", "--data", data, "--block_size", 64, "--json", out,
               cwd=tmp_path)
    reference = json.loads(out.read_text())
    assert reference["positions"] > 0
    # On this bag-of-words text the bigram model knows no more than the unigram one: similar, positive Brier-1.
    assert 0 < reference["unigram"]["brier_1"] and 0 < reference["bigram"]["brier_1"]
    # The in-domain held-out text (every 10th document) is scored instead: other text, another number of positions.
    run_script("benchmarks/real_results/ngram_reference.py", "--data", data, "--block_size", 64, "--json", out,
               "--eval_file", "heldout.jsonl", cwd=tmp_path)
    heldout_reference = json.loads(out.read_text())
    assert 0 < heldout_reference["positions"] != reference["positions"]
    with pytest.raises(AssertionError, match="ValueError: --eval_file 'nothing.jsonl': no such file"):
        run_script("benchmarks/real_results/ngram_reference.py", "--data", data, "--eval_file", "nothing.jsonl",
                   cwd=tmp_path)

    # A second call resumes: every stage is found done, nothing is retrained.
    stamp = (work / "calm" / "done.json").stat().st_mtime_ns
    stdout = run_script("benchmarks/real_results/pipeline.py", "--data", data, "--work", work, "--tiny",
                        cwd=tmp_path)
    assert stdout.count("already done") == 7
    assert (work / "calm" / "done.json").stat().st_mtime_ns == stamp

    # A K = 2 CALM sharing the finished baseline: it is linked, not retrained, and scored next to the new CALM.
    work_k2 = tmp_path / "work_k2"
    run_script("benchmarks/real_results/pipeline.py", "--data", data, "--work", work_k2, "--tiny",
               "--patch_size", "2", "--reuse_baseline", work, "--stages", "ae", "calm", "baseline", "eval", cwd=tmp_path)
    results_k2 = json.loads((work_k2 / "results.json").read_text())
    assert (work_k2 / "baseline").resolve() == (work / "baseline").resolve()
    assert "baseline_training" not in results_k2 and set(results_k2["brier_lm"]) == {"calm", "baseline"}
    assert results_k2["brier_lm"]["baseline"]["mean"] == results["brier_lm"]["baseline"]["mean"]
    assert results_k2["setup"]["arguments"]["patch_size"] == 2


def _load_ngram_reference():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ngram_reference", ROOT / "benchmarks/real_results/ngram_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ngram_reference_matches_dense_expectation():
    """The sparse per-row sums give exactly the expected Brier-1/2 computed with dense distribution tables."""
    import numpy as np
    import torch

    ngram = _load_ngram_reference()
    rng = np.random.default_rng(0)
    vocab, alpha = 7, 0.5
    def corpus(size):  # skewed, with every third token following its predecessor: bigrams beat unigrams
        ids = rng.choice(6, size=size, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
        ids[1::3] = (ids[0::3][: len(ids[1::3])] + 1) % 6
        return ids

    train = corpus(600)  # token 6 never occurs in training: smoothing must still give it mass
    eval_ids = torch.from_numpy(corpus(36).reshape(3, 12))
    eval_ids[0, 5] = 6
    labels = eval_ids.clone()
    labels[2, 9:] = -100
    result = ngram.ngram_reference(train, {"input_ids": eval_ids, "labels": labels}, vocab, alpha=alpha)

    unigram = (np.bincount(train, minlength=vocab) + 0.1) / (len(train) + 0.1 * vocab)
    pairs = np.zeros((vocab, vocab))
    np.add.at(pairs, (train[:-1], train[1:]), 1)
    bigram = (pairs + alpha * unigram[None, :]) / (pairs.sum(1, keepdims=True) + alpha)
    assert np.allclose(bigram.sum(1), 1)
    b1u, b2u, b1b, b2b = [], [], [], []
    for row in range(3):
        for t in range(12 - 2):
            y1, y2 = labels[row, t + 1].item(), labels[row, t + 2].item()
            if y1 == -100 or y2 == -100:
                continue
            a = eval_ids[row, t].item()
            b1u.append(2 * unigram[y1] - (unigram**2).sum())
            b2u.append(2 * unigram[y1] * unigram[y2] - (unigram**2).sum() ** 2)
            joint = bigram[a][:, None] * bigram  # q(b c | a)
            b1b.append(2 * bigram[a, y1] - (bigram[a] ** 2).sum())
            b2b.append(2 * joint[y1, y2] - (joint**2).sum())
    assert result["positions"] == len(b1u) == 3 * 10 - 3
    assert result["unigram"]["brier_1"] == pytest.approx(np.mean(b1u), rel=1e-9)
    assert result["unigram"]["brier_2"] == pytest.approx(np.mean(b2u), rel=1e-9)
    assert result["bigram"]["brier_1"] == pytest.approx(np.mean(b1b), rel=1e-9)
    assert result["bigram"]["brier_2"] == pytest.approx(np.mean(b2b), rel=1e-9)
    assert result["bigram"]["brier_1"] > result["unigram"]["brier_1"]  # the structure is learnable

    with pytest.raises(ValueError, match="alpha"):
        ngram.ngram_reference(train, {"input_ids": eval_ids}, vocab, alpha=0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        ngram.ngram_reference(train, {"input_ids": eval_ids}, 5)


@pytest.mark.slow
@pytest.mark.parametrize("every", ["1", "-3"])
def test_prepare_data_rejects_a_bad_holdout_rate(tmp_path, every):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) + "\n" for i in range(20)))
    train_bpe_tokenizer(corpus, vocab_size=300, min_frequency=1, output_dir=tmp_path / "tokenizer")
    code = _BARE_CHECKOUT_RUNNER.format(root=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks/real_results/prepare_data.py"), "--train_file", corpus,
         "--tokenizer", tmp_path / "tokenizer", "--eval_file", corpus, "--output_dir", tmp_path / "data",
         "--holdout_every", every],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert f"ValueError: --holdout_every must be 0 (none) or >= 2, got {every}" in result.stderr
    assert not (tmp_path / "data" / "train_ids.npy").exists()


@pytest.mark.slow
def test_gpu_examples_script_on_the_cpu(tmp_path):
    """benchmarks/gpu_examples.sh with GPU=0: tokenizer, autoencoder and CALM examples, then loading the CALM with
    AutoModelForCausalLM and sampling it at two temperatures (the script puts the checkout on PYTHONPATH, as the GPU
    machine, where the package is not installed, needs)."""
    write_word_corpus(tmp_path / "text.jsonl", random.Random(1))
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(GPU="0", PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_examples.sh"), "text.jsonl", "out", "4"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:] + "".join(
        f"\n--- {log.name}\n{log.read_text()[-2000:]}" for log in out.glob("*.log"))
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"tokenizer_s", "autoencoder_s", "calm_s", "load_and_generate_s", "total_s"}
    generated = (out / "load_and_generate.log").read_text()
    assert "CalmForCausalLM" in generated and "T=1.0: 'The history of the city" in generated
    assert "T=0.5: 'The history of the city" in generated
    assert "eval_brier_lm" in (out / "train_calm.log").read_text()
    assert "brier_lm" in (out / "calm_card.md").read_text() and (out / "autoencoder_card.md").exists()
    assert (out / "work" / "calm" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, env, message", [
    ([], {}, "usage:"),
    (["missing.jsonl", "out"], {}, "'missing.jsonl' is not a file"),
    (["text.jsonl", "out", "0"], {}, "STEPS must be a whole number >= 1, got '0'"),
    (["text.jsonl", "out", "ten"], {}, "STEPS must be a whole number >= 1, got 'ten'"),
    (["text.jsonl", "out"], {"GPU": "yes"}, "GPU must be 0 (CPU, tiny presets) or 1, got 'yes'"),
])
def test_gpu_examples_script_rejects_bad_arguments(tmp_path, args, env, message):
    (tmp_path / "text.jsonl").write_text('{"text": "a"}\n')
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_examples.sh"), *args], cwd=tmp_path,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("args, message", [
    ([], "usage:"),
    (["missing.jsonl", "out"], "is not a file"),
    (["text.jsonl", "out", "3"], "STEPS must be an even whole number >= 2"),
    (["text.jsonl", "out", "x"], "STEPS must be an even whole number >= 2"),
])
def test_gpu_multi_sh_checks_its_arguments(tmp_path, args, message):
    (tmp_path / "text.jsonl").write_text('{"text": "a"}\n')
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_multi.sh"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "DRY_RUN": "1"})
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("script", ["gpu_versions.sh", "gpu_decoding.sh"])
@pytest.mark.parametrize("args, message", [
    ([], "usage: bash benchmarks/{script} OUT [WHEEL_DIR]"),
    (["out", "a", "b"], "usage: bash benchmarks/{script} OUT [WHEEL_DIR]"),
    (["out", "{tmp}/no-wheels"], "holds no .whl files"),
])
def test_gpu_scripts_with_wheels_check_their_arguments(tmp_path, script, args, message):
    (tmp_path / "no-wheels").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message.format(script=script) in result.stderr, result.stderr
    assert not (ROOT / "out").exists() and not (tmp_path / "out").exists()  # nothing written


def test_gpu_multi_sh_dry_run_lists_every_run_and_refuses_a_cpu(tmp_path):
    (tmp_path / "text.jsonl").write_text('{"text": "a"}\n')
    command = ["bash", str(ROOT / "benchmarks" / "gpu_multi.sh"), "text.jsonl", "out", "8"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    names = [line.split(":", 1)[0] for line in result.stdout.splitlines() if not line.startswith((" ", "\t"))
             and ": " in line and line.split(":", 1)[0].replace("_", "").isalnum()]
    assert names == ["tokenizer", "autoencoder", "ae_ddp1", "ae_ddp2", "calm_ddp1", "calm_ddp2", "fsdp_l",
                     "fsdp_l_resume", "fsdp_l_load", "calm_ddp2_reduce_overhead", "brier1", "brier2"]
    assert "checkpoint-4" in result.stdout and "--torch_compile_mode reduce-overhead" in result.stdout
    assert "--nproc_per_node 2" in result.stdout and "configuration/accelerate/fsdp.yaml" in result.stdout
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "needs 2 CUDA GPUs, found 0" in result.stderr, result.stderr
