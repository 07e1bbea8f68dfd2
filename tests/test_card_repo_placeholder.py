"""Issue 18, item 9: a card built without a repo id names a placeholder that the card explains (never a repo that
does not exist), push_calm_to_hub and CalmTrainer write the pushed repo in, and the quickstart takes --hub_repo_id."""

import os
import subprocess
import sys
from pathlib import Path

from huggingface_hub import HfApi, ModelCard

from modeling_calm import CalmAutoencoder, CalmForCausalLM
from modeling_calm.card_calm import (
    REPO_PLACEHOLDER, build_autoencoder_card, build_model_card, fill_repo_id, push_calm_to_hub,
)
from tests.utils import tiny_autoencoder_config, tiny_calm_config


ROOT = Path(__file__).resolve().parents[1]


def test_cards_without_repo_id_name_an_explained_placeholder_that_fill_repo_id_replaces():
    model, autoencoder = CalmForCausalLM(tiny_calm_config()), CalmAutoencoder(tiny_autoencoder_config())
    for build, source in ((build_model_card, model), (build_autoencoder_card, autoencoder)):
        text = str(build(source, model_name="calm-tiny"))
        assert f'from_pretrained("{REPO_PLACEHOLDER}/calm-tiny", trust_remote_code=True)' in text
        assert f"`{REPO_PLACEHOLDER}/calm-tiny` is a placeholder" in text
        assert 'from_pretrained("calm-tiny"' not in text  # no bare name that looks like a Hub repo
        named = str(build(source, model_name="calm-tiny", repo_id="me/calm-tiny"))
        assert REPO_PLACEHOLDER not in named and "placeholder" not in named
        assert fill_repo_id(text, "me/calm-tiny") == named
        assert fill_repo_id(named, "other/x") == named


def test_push_calm_to_hub_writes_the_repo_into_a_placeholder_card(tmp_path, monkeypatch):
    pushed = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: pushed.update(
        {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations
         if op.path_in_repo == "README.md"}))
    model = CalmForCausalLM(tiny_calm_config())
    folder = tmp_path / "calm"
    model.save_pretrained(folder)
    build_model_card(model, model_name="calm").save(folder / "README.md")  # the folder's own card, no repo id
    push_calm_to_hub(str(folder), "me/calm")
    readme = pushed["README.md"].decode()
    assert 'from_pretrained("me/calm", trust_remote_code=True)' in readme and REPO_PLACEHOLDER not in readme
    assert REPO_PLACEHOLDER in (folder / "README.md").read_text()  # the local folder is left as it is
    push_calm_to_hub(model, "me/calm2", card=build_model_card(model, model_name="calm2"), validate_card=False)
    assert 'from_pretrained("me/calm2", trust_remote_code=True)' in pushed["README.md"].decode()


def test_quickstart_card_names_the_hub_repo_or_the_placeholder(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Line {i} of a corpus: chunk {i % 7} follows chunk {i % 5}." for i in range(200)))
    command = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output_dir", str(tmp_path / "out"),
               "--train_file", str(text), "--vocab_size", "300", "--preset", "tiny", "--block_size", "32",
               "--max_steps", "1", "--hub_repo_id", "me/my-calm"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.model_name == "my-calm" and REPO_PLACEHOLDER not in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/my-calm", trust_remote_code=True)' in card.text
    autoencoder_card = (tmp_path / "out" / "autoencoder" / "README.md").read_text()
    assert 'AutoModel.from_pretrained("me/my-calm-autoencoder", trust_remote_code=True)' in autoencoder_card


def test_calm_trainer_names_the_pushed_repo_in_a_placeholder_card_it_keeps(tmp_path):
    from transformers import TrainingArguments

    from modeling_calm import CalmTrainer

    model = CalmForCausalLM(tiny_calm_config())
    build_model_card(model, model_name="calm").save(tmp_path / "README.md")
    trainer = CalmTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))
    trainer.create_model_card()  # no push: the card is kept as it is
    assert REPO_PLACEHOLDER in (tmp_path / "README.md").read_text()
    trainer.hub_model_id = "me/calm"  # what init_hf_repo sets with --push_to_hub
    trainer.create_model_card()
    text = (tmp_path / "README.md").read_text()
    assert 'from_pretrained("me/calm", trust_remote_code=True)' in text and REPO_PLACEHOLDER not in text
