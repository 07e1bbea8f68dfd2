"""lm-evaluation-harness on a tiny CALM folder, offline: generate_until runs, likelihood tasks fail clearly."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from modeling_calm import CalmConfig, CalmForCausalLM
from modeling_calm.data_calm import save_tokenizer_with_model, train_bpe_tokenizer
from tests.utils import tiny_calm_config

pytest.importorskip("lm_eval")
REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
{extra}
metric_list:
  - metric: {metric}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    docs = [{"question": f"question {i}?", "answer": f"answer {i}", "choices": ["a", "b"], "gold": 0} for i in range(3)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "calm_gen.yaml").write_text(TASK.format(
        name="calm_gen", data=root / "docs.jsonl", output_type="generate_until", metric="exact_match",
        extra="generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: true\n  temperature: 1.0"))
    (tasks / "calm_mc.yaml").write_text(TASK.format(
        name="calm_mc", data=root / "docs.jsonl", output_type="multiple_choice", metric="acc",
        extra="doc_to_choice: \"{{choices}}\"").replace('doc_to_target: "{{answer}}"', "doc_to_target: gold"))
    texts = [f"{d['question']} {d['answer']}" for d in docs] * 10
    values = tiny_calm_config().to_dict()  # with a vocabulary that holds the trained tokenizer's 300 tokens
    values["autoencoder_config"]["vocab_size"] = values["backbone_config"]["vocab_size"] = 300
    model = CalmForCausalLM(CalmConfig.from_dict(values))
    model.save_pretrained(root / "calm")
    save_tokenizer_with_model(train_bpe_tokenizer(iter(texts), vocab_size=300), model, root / "calm")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("lm_eval_calm", REPO_ROOT / "benchmarks" / "lm_eval_calm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return root, tasks, script


def test_generate_until_task_runs_through_hflm(setup):
    root, tasks, script = setup
    report = script.main(["--model", str(root / "calm"), "--tasks", "calm_gen", "--include_path", str(tasks),
                          "--device", "cpu", "--output", str(root / "report.json")])
    metrics = report["results"]["calm_gen"]
    assert 0.0 <= metrics["exact_match,none"] <= 1.0
    assert json.loads((root / "report.json").read_text())["results"]["calm_gen"] == metrics


def test_likelihood_tasks_are_refused_with_the_reason(setup):
    root, tasks, script = setup
    with pytest.raises(ValueError, match=r"CALM has no token likelihoods: only generate_until tasks can run "
                                         r"\(task 'calm_mc' is a 'multiple_choice' task\)"):
        script.main(["--model", str(root / "calm"), "--tasks", "calm_gen,calm_mc", "--include_path", str(tasks)])


def test_lm_eval_reads_the_context_from_the_tokenizer(setup):
    from lm_eval.models.huggingface import HFLM

    root, _, _ = setup
    lm = HFLM(pretrained=str(root / "calm"), trust_remote_code=True, device="cpu")
    assert lm.max_length == 256  # 64 chunks x K=4, not lm-eval's default of 2048
