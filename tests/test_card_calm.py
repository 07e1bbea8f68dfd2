"""Model cards (huggingface_hub ModelCard / EvalResult) and pushing to the Hub up to the network boundary.

Pushes run with HF_HUB_OFFLINE=1 and `HfApi.create_repo` / `HfApi.create_commit` replaced by recorders, so the
exact files of every commit (and their bytes) are checked without a network. Every upload path of
huggingface_hub 1.x and 2.x (upload_file, upload_folder, transformers' push_to_hub) ends in `create_commit`.
"""

import json
import math
import os
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import get_peft_model
from safetensors.torch import load

from modeling_calm import CalmAutoencoder, CalmConfig, CalmForCausalLM
from modeling_calm.card_calm import (
    CALM_BIBTEX,
    accuracy_from_trainer_metrics,
    brier_from_trainer_metrics,
    build_autoencoder_card,
    build_model_card,
    calm_parameter_counts,
    push_calm_to_hub,
    source_names,
)
from modeling_calm.data_calm import train_bpe_tokenizer
from modeling_calm.peft_calm import calm_lora_config
from tests.utils import SHIPPED_CALM_FILES, run_without_package, tiny_autoencoder_config, tiny_calm_config


PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configuration")
BRIER = {"brier_1": 0.412, "brier_2": 0.1375, "brier_3": 0.0521, "brier_4": 0.0213, "brier_lm": 9.87,
         "dataset": "wikitext", "dataset_name": "WikiText-103", "split": "test"}


def _metrics(card) -> dict:
    """(task_type, metric_type, metric_config) -> value, read back from the card's text."""
    results = ModelCard(str(card)).data.eval_results or []
    return {(r.task_type, r.metric_type, r.metric_config): r.metric_value for r in results}


# ------------------------------------------------------------------------------------------------------------------
# CALM cards
# ------------------------------------------------------------------------------------------------------------------


def test_model_card_metadata_round_trips_and_text_says_how_to_load(tmp_path):
    model = CalmForCausalLM(tiny_calm_config())
    card = build_model_card(
        model, model_name="calm-tiny", repo_id="calm-org/calm-tiny", brier_lm=BRIER,
        autoencoder_accuracy={"sampled": 0.9931, "mean": 0.9987, "dataset": "wikitext", "split": "validation"},
        training_data=["monology/pile-uncopyrighted", str(tmp_path / "local.txt")], tokenizer_name="my-bpe",
        tokenizer_license="mit", base_model="calm-org/calm-ae",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.model_name == "calm-tiny"
    assert loaded.data.base_model == "calm-org/calm-ae" and loaded.data.pipeline_tag == "text-generation"
    assert loaded.data.datasets == ["monology/pile-uncopyrighted"]  # a local file is named in the text only
    assert "custom_code" in loaded.data.tags and loaded.data.license == "apache-2.0"

    metrics = _metrics(card)
    expected = {("text-generation", key, None): BRIER[key] for key in ("brier_lm", "brier_1", "brier_2", "brier_3",
                                                                       "brier_4")}
    expected[("feature-extraction", "accuracy", "latent_sample")] = 0.9931
    expected[("feature-extraction", "accuracy", "latent_mean")] = 0.9987
    assert metrics == expected
    results = loaded.data.eval_results
    assert {r.dataset_type for r in results} == {"wikitext"}
    assert {(r.task_type, r.dataset_split) for r in results} == {("text-generation", "test"),
                                                                 ("feature-extraction", "validation")}

    text = str(card)
    assert 'from_pretrained("calm-org/calm-tiny", trust_remote_code=True)' in text
    assert "model.generate(" in text and "| K (tokens per step, `patch_size`) | 4 |" in text
    assert "| latent size Z (`latent_size`) | 8 |" in text
    assert "perplexity" in text and "T <= 0.5" in text and "N = 200" in text and "frozen" in text
    assert "my-bpe (licence: mit" in text and str(tmp_path / "local.txt") in text
    assert CALM_BIBTEX in text and "2510.27688" in text and "Shao, Chenze" in text
    counts = calm_parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["without_autoencoder"] == counts["backbone"] + counts["head"] + counts["compression"]
    assert f"| parameters in total | {counts['total']:,} |" in text  # tiny: below 0.1M, written in full


def test_model_card_sizes_of_the_official_preset_match_the_paper():
    config = CalmConfig.from_json_file(os.path.join(PRESETS, "calm-m.json"))
    text = str(build_model_card(config, model_name="calm-m"))
    # CALM.md size table: CALM-M has 371.7M parameters without the 75.8M autoencoder.
    assert "| parameters without the autoencoder | 371.7M |" in text
    assert "| parameters of the frozen autoencoder | 75.8M |" in text
    assert "| backbone | llama, width 1024, depth 16, MLP 2752, 16 heads |" in text
    assert "2048 steps = 8192 tokens" in text
    assert "No evaluation reported." in text and ModelCard(text).data.eval_results is None


def test_model_card_reads_evaluate_brier_results():
    seeds_result = {
        "mean": {k: v for k, v in BRIER.items() if k.startswith("brier")},
        "std": {"brier_lm": 0.21, "brier_1": 0.001},
        "per_seed": [], "pooled": {}, "seeds": [0, 1, 2], "num_positions": 4321, "max_n": 4,
        "dataset": "wikitext", "split": "test",
    }
    card = build_model_card(tiny_calm_config(), model_name="m", brier_lm=seeds_result)
    assert _metrics(card)[("text-generation", "brier_lm", None)] == BRIER["brier_lm"]
    assert "**9.87** ± 0.21 (std over 3 seeds)" in str(card) and "4,321 scored positions" in str(card)
    one_seed = {**seeds_result, "std": {"brier_lm": math.nan}, "seeds": [0]}
    assert "±" not in str(build_model_card(tiny_calm_config(), model_name="m", brier_lm=one_seed))
    plain = build_model_card(tiny_calm_config(), model_name="m", brier_lm=4.5)
    assert _metrics(plain) == {("text-generation", "brier_lm", None): 4.5}


def test_model_card_conversion_and_extra_sections():
    card = build_model_card(
        tiny_calm_config(), model_name="m", conversion="Converted from org/original; max |diff| 2e-6.",
        extra_sections={"Training procedure": "3 steps on a CPU."},
    )
    text = str(card)
    assert "## Conversion\n\nConverted from org/original; max |diff| 2e-6." in text
    assert "The `license` field says `apache-2.0`: check it against the authors' release" in text
    assert text.index("## Training procedure") < text.index("## Citation")
    assert "check it against" not in str(build_model_card(tiny_calm_config(), model_name="m"))  # not converted


def test_conversion_facts_render_in_both_cards():
    facts = {"source": "org/CALM-M", "autoencoder_source": "org/CALM-AE", "script": "conversion/x.py",
             "date": "2025-01-02", "dtype": "bfloat16", "source_tensors": 1234, "mapped": 1200, "tied": 1,
             "dropped": {"second copy of the head": 33, "unused": 1}, "checks": "Reloaded and compared exactly."}
    text = str(build_model_card(tiny_calm_config(), model_name="m", conversion=facts, license="other",
                                base_model="org/CALM-M"))
    assert "Converted from org/CALM-M and org/CALM-AE (the authors' release" in text
    assert "- script: `conversion/x.py`, date: 2025-01-02, dtype: bfloat16" in text
    assert "- source tensors: 1,234; mapped: 1,200; tied (stored once): 1" in text
    assert "  - second copy of the head: 33 tensors\n  - unused: 1 tensor\n" in text
    assert "- Reloaded and compared exactly." in text and "The `license` field says `other`" in text
    assert ModelCard(text).data.base_model == "org/CALM-M"
    ae_text = str(build_autoencoder_card(tiny_autoencoder_config(), model_name="a", conversion={"source": "org/AE"}))
    assert "## Conversion\n\nConverted from org/AE (the authors' release" in ae_text
    with pytest.raises(ValueError, match="sourse"):
        build_model_card(tiny_calm_config(), model_name="m", conversion={"sourse": "org/CALM-M"})


def test_cards_from_trainer_metrics_say_what_was_measured(tmp_path):
    metrics = {"eval_loss": 1.0, "eval_brier_1": 0.5, "eval_brier_2": 0.25, "eval_brier_3": 0.125,
               "eval_brier_4": 0.0625, "eval_brier_lm": 17.68}
    brier = brier_from_trainer_metrics(metrics, dataset="valid.jsonl", split="validation", block_size=256)
    card = build_model_card(tiny_calm_config(), model_name="m", brier_lm=brier)
    assert _metrics(card) == {("text-generation", key, "trainer_eval"): metrics[f"eval_{key}"]
                              for key in ("brier_lm", "brier_1", "brier_2", "brier_3", "brier_4")}
    assert "A quick estimate" in str(card) and "blocks of 256 tokens" in str(card)
    assert "examples/evaluate_brierlm.py" in str(card) and "valid.jsonl (validation)" in str(card)
    assert brier_from_trainer_metrics({"eval_brier_1": 0.5}, dataset="d") is None  # K < 4: no BrierLM

    accuracy, robustness = accuracy_from_trainer_metrics(
        {"eval_accuracy": 0.9, "eval_accuracy_noise_0.3": 0.8, "eval_accuracy_noise_1": 0.5, "eval_kl": 3.0},
        dataset="valid.jsonl",
    )
    assert robustness == {0.3: 0.8, 1.0: 0.5}
    card = build_autoencoder_card(tiny_autoencoder_config(), model_name="a", accuracy=accuracy,
                                  noise_robustness=robustness)
    assert _metrics(card) == {("feature-extraction", "accuracy", "latent_sample"): 0.9,
                              ("feature-extraction", "accuracy", "latent_noise_0.3"): 0.8,
                              ("feature-extraction", "accuracy", "latent_noise_1"): 0.5}
    local = tmp_path / "train.jsonl"
    local.write_text("{}")
    assert source_names([str(local), "data/*.jsonl", "monology/pile-uncopyrighted", str(tmp_path) + "/"]) == [
        "train.jsonl", "*.jsonl", "monology/pile-uncopyrighted", tmp_path.name]


def test_card_builders_reject_bad_input():
    config = tiny_calm_config()
    with pytest.raises(ValueError, match="brier_lm"):
        build_model_card(config, model_name="m", brier_lm={"brier_1": 0.3})
    with pytest.raises(ValueError, match="brier_lm"):
        build_model_card(config, model_name="m", brier_lm=float("nan"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_model_card(config, model_name="m", autoencoder_accuracy=99.9)  # a percentage, not a fraction
    with pytest.raises(ValueError, match="model_name"):
        build_model_card(config, model_name="")
    with pytest.raises(ValueError, match="model_type"):
        build_model_card(tiny_autoencoder_config(), model_name="m")
    with pytest.raises(ValueError, match="model_type"):
        build_autoencoder_card(config, model_name="m")
    with pytest.raises(ValueError, match="merge"):
        build_model_card(get_peft_model(CalmForCausalLM(config), calm_lora_config(r=2)), model_name="m")


def test_autoencoder_card():
    model = CalmAutoencoder(tiny_autoencoder_config())
    card = build_autoencoder_card(
        model, model_name="calm-ae-tiny", repo_id="calm-org/calm-ae-tiny",
        accuracy={"sampled": 0.998, "mean": 0.9995, "dataset": "wikitext", "split": "validation"},
        noise_robustness={0.0: 0.9995, 0.3: 0.998, 1.0: 0.71},
    )
    data = ModelCard(str(card)).data
    assert data.model_name == "calm-ae-tiny" and data.pipeline_tag == "feature-extraction"
    assert _metrics(card) == {("feature-extraction", "accuracy", "latent_sample"): 0.998,
                              ("feature-extraction", "accuracy", "latent_mean"): 0.9995,
                              ("feature-extraction", "accuracy", "latent_noise_0"): 0.9995,
                              ("feature-extraction", "accuracy", "latent_noise_0.3"): 0.998,
                              ("feature-extraction", "accuracy", "latent_noise_1"): 0.71}
    assert {r.dataset_split for r in data.eval_results} == {"validation"}  # the noisy ones on accuracy's dataset
    text = str(card)
    assert 'AutoModel.from_pretrained("calm-org/calm-ae-tiny", trust_remote_code=True)' in text
    assert 'AutoTokenizer.from_pretrained("calm-org/calm-ae-tiny", trust_remote_code=True)' in text
    assert "| 0.3 | 99.800 % |" in text and "| 1 | 71.000 % |" in text
    assert "| K (tokens per chunk, `patch_size`) | 4 |" in text
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in text


# ------------------------------------------------------------------------------------------------------------------
# The card's snippet, where the package cannot be imported
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calm_folder_with_card(tmp_path_factory):
    """A saved tiny CALM with a word-level tokenizer that fits its 99-token vocabulary, and its card."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the history of city begins a an in on".split()
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}  # pad 0, bos 1, eos 2
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    folder = tmp_path_factory.mktemp("calm") / "calm-tiny"
    model = CalmForCausalLM(tiny_calm_config())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card = build_model_card(model, model_name="calm-tiny", repo_id=str(folder))
    card.save(folder / "README.md")
    return folder, str(card)


# Everything the child writes to stderr (warnings, the prompt) is read from stdout.
_STDERR_TO_STDOUT = "import os, sys\nsys.stdout.flush()\nos.dup2(1, 2)\n"


@pytest.mark.slow
def test_card_snippet_loads_the_tokenizer_without_a_remote_code_prompt(calm_folder_with_card, tmp_path):
    """AutoTokenizer on a CALM folder reads config.json, whose class is remote code: without
    trust_remote_code=True, transformers asks "[y/N]" on stdin where the package is not installed. The card's
    snippet passes it, so it runs as written (stdin closed), tokenizer and `generate` included."""
    folder, card = calm_folder_with_card
    snippet = card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert f'AutoTokenizer.from_pretrained("{folder}", trust_remote_code=True)' in snippet
    assert "model.generate(**tokenizer(text" in snippet
    env = {"HF_HUB_OFFLINE": "1"}
    output = run_without_package(_STDERR_TO_STDOUT + snippet + "print('SNIPPET OK', type(model).__module__)",
                                 cwd=tmp_path, env_extra=env)
    assert "SNIPPET OK transformers_modules" in output and "[y/N]" not in output

    # The control: the same load without trust_remote_code does prompt (so the check above can fail).
    untrusted = f"from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained({str(folder)!r})\n"
    assert "[y/N]" in run_without_package(_STDERR_TO_STDOUT + untrusted, cwd=tmp_path, env_extra=env)


# ------------------------------------------------------------------------------------------------------------------
# Pushing, up to the network boundary
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    """Offline Hub whose create_repo / create_commit / card validation record what they were given."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    record = types.SimpleNamespace(repos=[], commits=[], validated=[])

    def create_repo(self, repo_id, **kwargs):
        record.repos.append((repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:  # read now: the sources live in temporary folders
            source = op.path_or_fileobj
            if isinstance(source, (str, os.PathLike)):
                with open(source, "rb") as file:
                    files[op.path_in_repo] = file.read()
            else:
                files[op.path_in_repo] = source if isinstance(source, bytes) else source.read()
        record.commits.append(types.SimpleNamespace(repo_id=repo_id, files=files, kwargs=kwargs))
        return types.SimpleNamespace(oid="0" * 40, commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "validate", lambda self, repo_type=None: record.validated.append(str(self)))
    return record


@pytest.fixture(scope="module")
def tokenizer_and_files(tmp_path_factory):
    tokenizer = train_bpe_tokenizer(iter(["a tiny corpus for a tiny tokenizer"] * 4), vocab_size=270, min_frequency=1)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return tokenizer, set(os.listdir(folder))


def test_push_calm_to_hub_stages_model_code_tokenizer_and_card_in_one_commit(hub, tmp_path, tokenizer_and_files):
    tokenizer, tokenizer_files = tokenizer_and_files
    model = CalmForCausalLM(tiny_calm_config())
    folder = tmp_path / "calm"
    model.save_pretrained(folder)
    card = build_model_card(model, model_name="calm-tiny", repo_id="calm-org/calm-tiny", brier_lm=BRIER)
    info = push_calm_to_hub(folder, "calm-org/calm-tiny", tokenizer=tokenizer, card=card, private=True,
                            commit_message="first upload")

    assert info.oid == "0" * 40
    assert [(repo, kwargs["private"]) for repo, kwargs in hub.repos] == [("calm-org/calm-tiny", True)]
    (commit,) = hub.commits
    assert commit.repo_id == "calm-org/calm-tiny" and commit.kwargs["commit_message"] == "first upload"
    model_files = {"config.json", "generation_config.json", "model.safetensors"} | SHIPPED_CALM_FILES
    assert set(commit.files) == model_files | tokenizer_files | {"README.md"}
    config = json.loads(commit.files["config.json"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_calm.CalmForCausalLM"
    assert commit.files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    readme = ModelCard(commit.files["README.md"].decode())
    assert readme.data.model_name == "calm-tiny"
    assert _metrics(readme)[("text-generation", "brier_lm", None)] == BRIER["brier_lm"]
    assert hub.validated == [str(card)]


def test_push_calm_to_hub_from_a_model_writes_a_default_card(hub):
    push_calm_to_hub(CalmAutoencoder(tiny_autoencoder_config()), "calm-org/ae-tiny", validate_card=False)
    (commit,) = hub.commits
    assert set(commit.files) == {"config.json", "model.safetensors", "configuration_calm.py",
                                 "modeling_calm_autoencoder.py", "modeling_calm_kernels.py", "README.md"}
    readme = commit.files["README.md"].decode()
    assert ModelCard(readme).data.model_name == "ae-tiny"
    assert 'AutoModel.from_pretrained("calm-org/ae-tiny", trust_remote_code=True)' in readme
    assert hub.validated == []
    assert [kwargs["private"] for _, kwargs in hub.repos] == [False]


def test_push_calm_to_hub_refuses_folders_that_would_not_load(hub, tmp_path):
    folder = tmp_path / "calm"
    CalmForCausalLM(tiny_calm_config()).save_pretrained(folder)
    (folder / "modeling_calm_heads.py").unlink()
    with pytest.raises(ValueError, match="modeling_calm"):
        push_calm_to_hub(folder, "calm-org/broken")
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map"):
        push_calm_to_hub(folder, "calm-org/broken")
    with pytest.raises(ValueError, match="repo_id"):
        push_calm_to_hub(folder, "a/b/c")
    assert hub.commits == [] and hub.repos == []


def test_push_calm_to_hub_pushes_a_peft_adapter(hub, tmp_path):
    model = get_peft_model(CalmForCausalLM(tiny_calm_config()), calm_lora_config(r=2))
    model.save_pretrained(tmp_path / "adapter")
    push_calm_to_hub(tmp_path / "adapter", "calm-org/calm-lora", validate_card=False)
    (commit,) = hub.commits
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(commit.files)
    assert "config.json" not in commit.files


def test_standard_push_to_hub_calls_include_code_and_card(hub, tokenizer_and_files):
    tokenizer, tokenizer_files = tokenizer_and_files
    model = CalmForCausalLM(tiny_calm_config())
    model.push_to_hub("calm-org/calm-tiny")
    tokenizer.push_to_hub("calm-org/calm-tiny")
    card = build_model_card(model, model_name="calm-tiny", repo_id="calm-org/calm-tiny", brier_lm=4.25)
    card.push_to_hub("calm-org/calm-tiny")

    model_commit, tokenizer_commit, card_commit = hub.commits
    assert {c.repo_id for c in hub.commits} == {"calm-org/calm-tiny"}
    # transformers adds its own README.md (a generic card when the repo has none yet), hence: push the card last.
    assert set(model_commit.files) == {"config.json", "generation_config.json", "model.safetensors",
                                       "README.md"} | SHIPPED_CALM_FILES
    assert "auto_map" in json.loads(model_commit.files["config.json"])
    weights, staged = model.state_dict(), load(model_commit.files["model.safetensors"])
    assert staged and staged.keys() <= weights.keys() and all(torch.equal(staged[k], weights[k]) for k in staged)
    assert tokenizer_files <= set(tokenizer_commit.files)
    assert set(card_commit.files) == {"README.md"}
    assert _metrics(ModelCard(card_commit.files["README.md"].decode())) == {
        ("text-generation", "brier_lm", None): 4.25
    }
    assert hub.validated == [str(card)]


def test_card_templates_and_the_metric_are_package_data():
    """The card templates and the evaluate metric are no Python modules: setup.cfg must list them as package data,
    or the built wheel would lack them (the card builders and `evaluate.load` read them from the package)."""
    import configparser
    import fnmatch

    from modeling_calm import card_calm

    root = Path(card_calm.__file__).resolve().parent
    parser = configparser.ConfigParser()
    parser.read(root.parent / "setup.cfg")
    patterns = parser["options.package_data"]["modeling_calm"].split()
    data = [p.relative_to(root).as_posix() for sub in ("templates", "metrics") for p in (root / sub).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
    expected = {"templates/calm_model_card.md", "templates/calm_autoencoder_card.md", "metrics/brier_lm/brier_lm.py"}
    assert expected <= set(data)
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns) for name in data), (data, patterns)
