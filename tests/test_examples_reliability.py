"""Issue 16 ("Nothing silent"), items 6 and "Also" of the examples: a model folder's own code runs only with
--trust_remote_code (evaluate_brierlm.py, finetune_lora.py), and evaluate_brierlm.py checks --output before the
evaluation. Tiny folders written here; nothing touches the network."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM


ROOT = Path(__file__).resolve().parents[1]
MARKER_CODE = """
import pathlib
pathlib.Path(MARKER).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class MarkerConfig(LlamaConfig):
    model_type = "markerlm"
class MarkerLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def remote_code_model(tmp_path) -> tuple[Path, Path]:
    """A causal-LM folder whose config names its own code (auto_map), which writes a marker file when run."""
    folder, marker = tmp_path / "marker-model", tmp_path / "RAN"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="markerlm", auto_map={"AutoConfig": "marker.MarkerConfig",
                                                   "AutoModelForCausalLM": "marker.MarkerLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "marker.py").write_text(MARKER_CODE.replace("MARKER", repr(str(marker))))
    (tmp_path / "eval.txt").write_text("some text " * 50)
    return folder, marker


def test_evaluate_brierlm_runs_no_remote_code_without_the_flag(remote_code_model, tmp_path):
    folder, marker = remote_code_model
    example = load_script("evaluate_brierlm")
    argv = ["--model", str(folder), "--eval_file", str(tmp_path / "eval.txt"), "--device", "cpu", "--seeds", "0"]
    with pytest.raises(ValueError, match="ships its own modeling code, .*pass --trust_remote_code if you trust"):
        example.main(argv)
    assert not marker.exists()
    with pytest.raises(Exception):  # with the flag the code runs (the folder has no tokenizer: it then fails)
        example.main([*argv, "--trust_remote_code"])
    assert marker.exists()


def test_finetune_lora_runs_no_remote_code_without_the_flag(remote_code_model, tmp_path, monkeypatch):
    folder, marker = remote_code_model
    example = load_script("finetune_lora")
    monkeypatch.setattr(sys, "argv", ["finetune_lora.py", "--model", str(folder), "--train_file",
                                      str(tmp_path / "eval.txt"), "--output_dir", str(tmp_path / "out"),
                                      "--use_cpu", "--report_to", "none"])
    with pytest.raises(ValueError, match="pass --trust_remote_code"):
        example.main()
    assert not marker.exists()


def test_evaluate_brierlm_checks_output_before_the_evaluation(tmp_path, monkeypatch):
    example = load_script("evaluate_brierlm")
    loaded = []
    monkeypatch.setattr(example, "load_pretrained", lambda *args, **kwargs: loaded.append(args) or 1 / 0)
    base = ["--model", str(tmp_path / "any"), "--eval_file", str(tmp_path / "eval.txt"), "--device", "cpu"]
    (tmp_path / "results").mkdir()
    with pytest.raises(ValueError, match="--output .*results' is a directory; give the path of the JSON file"):
        example.main([*base, "--output", str(tmp_path / "results")])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="a-file/report.json': cannot create its folder"):
        example.main([*base, "--output", str(tmp_path / "a-file" / "report.json")])
    assert loaded == []  # refused before the model was even loaded
