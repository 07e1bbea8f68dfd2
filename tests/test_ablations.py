"""Issue 19's ablations (benchmarks/real_results/ablations.py, ablations.sh, plot_ablations.py): argument checks,
one change per arm, and the tiny end-to-end run on the CPU (every arm, FLOP accounting, resumed second call)."""

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl

from modeling_calm.data_calm import train_bpe_tokenizer
from tests.utils import WORDS, write_word_corpus


ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks/real_results"


def _module(name):
    spec = importlib.util.spec_from_file_location(f"real_results_{name}", FOLDER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablations():
    return _module("ablations")


@pytest.fixture
def fake_data(tmp_path):
    """A folder with the names validate() looks for (their content is never read by the checks)."""
    for name in ("train_ids.npy", "heldout.jsonl"):
        (tmp_path / name).write_text("")
    (tmp_path / "data.json").write_text("{}")
    (tmp_path / "tokenizer").mkdir()
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0."),
    (["--parallel", "0"], "--parallel must be an integer >= 1, got 0."),
    (["--steps", "40", "--curve_every", "50"], "--curve_every must be at most --steps (40), got 50."),
    (["--limit", "-5"], "--limit must be a number of seconds > 0, got -5.0."),
    (["--seeds", "1", "1"], "--seeds must be distinct integers (at least one), got [1, 1]."),
    (["--arms", "calm", "lr_3e-4"], "unknown arm 'lr_3e-4': an arm must be one of transformer, calm, lr_2.5e-4"),
    (["--arms", "calm", "calm"], "--arms must name each arm once, got ['calm', 'calm']."),
    (["--arms", "ae_finetune"], "arm 'ae_finetune' cannot run: not supported by the model"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
])
def test_bad_arguments_are_refused_with_the_value_and_the_rule(ablations, fake_data, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ablations.parse_args(["--data", str(fake_data), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_data_folder_without_heldout_text_is_refused(ablations, fake_data, capsys):
    (fake_data / "heldout.jsonl").unlink()
    with pytest.raises(SystemExit):
        ablations.parse_args(["--data", str(fake_data)])
    assert f"--data {str(fake_data)!r} lacks heldout.jsonl: it must be a folder written by" in capsys.readouterr().err


def test_every_arm_changes_one_thing_against_the_pipeline_calm(ablations, fake_data):
    args = ablations.parse_args(["--data", str(fake_data)])
    assert args.steps == 400 and args.parallel == 8 and args.limit == 450 and args.lm_batch == 16  # the defaults
    assert set(args.arms) == {
        "transformer", "calm", "lr_2.5e-4", "lr_1e-3", "warmup_400", "samples_16", "samples_32", "targets_25",
        "targets_400", "head_layers_2", "head_layers_8", "noise_32", "noise_128", "k2", "flow", "diffusion",
    }
    pipeline = _module("pipeline")
    baseline = ablations.arm_settings("calm", args)
    assert baseline == {"model": "calm", "lr": 5e-4, "warmup": pipeline.LM_WARMUP, "patch_size": 4,
                        "head": {"head_type": "energy", **pipeline.CALM_HEAD}}
    for arm in ablations.ARMS:
        changes = ablations.arm_changes(arm, args)
        assert len(changes) == (0 if arm in ("calm", "transformer") else 1), (arm, changes)
    assert ablations.arm_changes("samples_32", args) == {"num_samples": 32}
    assert ablations.arm_changes("k2", args) == {"patch_size": 2}
    order = ablations.job_order(args)
    assert order[:4] == ["ae_k4", "ae_k2", "transformer", "calm"] and sorted(order[4:]) == sorted(
        set(args.arms) - {"transformer", "calm"})
    assert ablations.job_requires("k2", args) == "ae_k2" and ablations.job_requires("flow", args) == "ae_k4"
    assert ablations.job_requires("transformer", args) is None


def test_an_arm_near_the_deadline_stops_with_a_last_checkpoint(ablations):
    probed, updates = [], []
    callback = ablations.StepCheckpoints(steps=100, curve_every=10, probe=lambda m, step, t: probed.append(step),
                                         deadline=time.time() + 60, on_update=lambda s, t: updates.append(s),
                                         first_probe_guess=1.0)
    state, control = SimpleNamespace(global_step=0), TrainerControl()
    callback.on_train_begin(None, state, control)
    for step in (1, 10, 11):
        state.global_step = step
        assert not callback.on_step_end(None, state, control, model=None).should_training_stop
    assert probed == [10] and not callback.truncated
    callback.deadline = time.time() + 2.5  # too close for another step and checkpoint (1.5 x the longest + 2 s)
    state.global_step = 12
    assert callback.on_step_end(None, state, control, model=None).should_training_stop
    assert callback.truncated and probed == [10, 12] and updates[-1] == 12  # the stopping step is scored
    assert 0 <= callback.train_seconds() and callback.eval_seconds >= 0


def test_the_final_merge_marks_unfinished_jobs(ablations, fake_data, tmp_path):
    args = ablations.parse_args(["--data", str(fake_data), "--work", str(tmp_path / "w"), "--arms", "calm", "k2"])
    work = Path(args.work)
    jobs = ablations.job_order(args)
    assert jobs == ["ae_k4", "ae_k2", "calm", "k2"]
    ablations.write_record(work, "ae_k4", {"name": "ae_k4", "status": "done", "started_epoch": 0.0,
                                           "finished_epoch": 10.0})
    ablations.write_record(work, "calm", {"name": "calm", "status": "running", "started_epoch": 5.0, "curve": []})
    results = ablations.merge(work, args, jobs, started=0.0, final=True)
    assert results["arms"]["calm"]["status"] == "killed" and "hard stop" in results["arms"]["calm"]["error"]
    assert ablations.read_record(work, "calm")["status"] == "killed"
    assert results["arms"]["k2"] == {"name": "k2", "status": "not_started", "model": "calm", "changes": {"patch_size": 2},
                                     "settings": ablations.arm_settings("k2", args), "steps_requested": 400}
    assert results["autoencoders"]["ae_k2"]["status"] == "not_started"
    assert results["autoencoders"]["ae_k4"]["mean_concurrency"] == pytest.approx(1.5)  # calm ran for its last 5 s
    assert json.loads((work / "ablations.json").read_text()) == json.loads(json.dumps(results))
    assert "| k2 | patch_size 2 | not_started |" in _module("plot_ablations").markdown_table(results)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("abl_data")
    rng = random.Random(0)
    corpus = write_word_corpus(root / "train.jsonl", rng)
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(300))}) + "\n"
                                 for _ in range(4)))
    train_bpe_tokenizer(corpus, vocab_size=300, min_frequency=2, output_dir=root / "tokenizer")
    result = subprocess.run(
        [sys.executable, str(FOLDER / "prepare_data.py"), "--train_file", str(corpus), "--tokenizer",
         str(root / "tokenizer"), "--eval_file", str(eval_file), "--output_dir", str(root / "data"),
         "--holdout_every", "10"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "data"


def run_ablations(data, work, out):
    environment = {**os.environ, "PYTHON": sys.executable, "TINY": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(FOLDER / "ablations.sh"), str(data), str(work), str(out)], env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ablations_tiny_end_to_end(ablations, data, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    result = run_ablations(data, work, out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert {"ablations.json", "ablations.md", "ablations.log", "logs"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "ablations.json").read_text())
    assert results == json.loads((work / "ablations.json").read_text()) and results["finished"]
    setup = results["setup"]
    assert setup["arguments"]["steps"] == 4 and setup["arguments"]["parallel"] == 2  # --tiny's budget
    assert list(results["arms"]) == list(ablations.DEFAULT_ARMS)
    assert {name: r["status"] for name, r in results["autoencoders"].items()} == {"ae_k4": "done", "ae_k2": "done"}
    for name, autoencoder in results["autoencoders"].items():  # the pipeline's ae and ae_eval stages
        assert autoencoder["patch_size"] == int(name[-1]) and 0 < autoencoder["steps"] <= 10
        assert 0 <= autoencoder["heldout_eval"]["accuracy_posterior_sample"] <= 1
    assert set(results["skipped_arms"]) == {"ae_finetune"}

    tokens_per_step = setup["arguments"]["lm_batch"] * setup["arguments"]["block_size"]
    for name, arm in results["arms"].items():
        assert arm["status"] == "done" and arm["steps"] == arm["steps_requested"] == 4, name
        assert arm["tokens_per_step"] == tokens_per_step
        assert arm["train_flops"] == pytest.approx(4 * tokens_per_step * arm["flops_per_token"])
        assert arm["train_seconds"] > 0 and arm["wall_seconds"] >= arm["train_seconds"]
        assert 1 <= arm["mean_concurrency"] <= 2 + 1e-6  # two jobs at a time
        assert [p["step"] for p in arm["curve"]] == [2, 4]  # every --curve_every steps, the last one included
        for point in arm["curve"]:
            assert point["seeds"] == [0, 1] and point["flops"] == pytest.approx(
                point["step"] * tokens_per_step * arm["flops_per_token"])
            assert set(point["std"]) == {"brier_1", "brier_2", "brier_3", "brier_4", "brier_lm"}
        assert [entry["step"] for entry in arm["loss_log"]] == [1, 2, 3, 4]
    arms = results["arms"]
    # The pipeline's FLOP count: the energy head once per sample (linear in N), the flow/diffusion heads once.
    per_sample = (arms["samples_16"]["flops_per_token"] - arms["calm"]["flops_per_token"]) / 8
    assert per_sample > 0
    assert arms["samples_32"]["flops_per_token"] - arms["samples_16"]["flops_per_token"] == pytest.approx(16 * per_sample)
    assert arms["flow"]["flops_per_token"] == arms["diffusion"]["flops_per_token"] < arms["calm"]["flops_per_token"]
    assert arms["targets_400"]["flops_per_token"] == arms["calm"]["flops_per_token"] == arms["lr_1e-3"]["flops_per_token"]
    assert arms["k2"]["settings"]["patch_size"] == 2 and arms["calm"]["settings"]["patch_size"] == 4

    table = (out / "ablations.md").read_text()
    for name in ablations.DEFAULT_ARMS:
        assert f"| {name} |" in table
    assert "| samples_32 | num_samples 32 | done | 4 |" in table
    plot = _module("plot_ablations")
    assert plot.markdown_table(results) == table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        plot.main([str(out / "ablations.json"), "--figure", str(tmp_path / "ablations.png")])
        assert (tmp_path / "ablations.png").stat().st_size > 10_000

    # A second call finds every job finished with the same settings and runs none.
    again = run_ablations(data, work, tmp_path / "out2")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "18 jobs (0 to run), 0 workers" in again.stdout
    second = json.loads((tmp_path / "out2" / "ablations.json").read_text())
    assert {n: r["curve"] for n, r in second["arms"].items()} == {n: r["curve"] for n, r in arms.items()}
