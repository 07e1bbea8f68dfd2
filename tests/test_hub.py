"""Hub-native save/load: the shipped code files, remote code in a process that cannot import the package,
and loading by repo id from a hand-built Hugging Face cache with HF_HUB_OFFLINE=1."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from modeling_calm import CalmAutoencoder, CalmForCausalLM
from tests.utils import SHIPPED_CALM_FILES, run_without_package, tiny_autoencoder_config, tiny_calm_config



def _code_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.py")}


@pytest.fixture
def saved_model(tmp_path):
    model = CalmForCausalLM(tiny_calm_config()).eval()
    folder = tmp_path / "calm-tiny"
    model.save_pretrained(folder)
    return model, folder


def test_shipped_code_files_are_pinned(saved_model, tmp_path):
    _, folder = saved_model
    assert _code_files(folder) == SHIPPED_CALM_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_calm.CalmConfig",
        "AutoModel": "modeling_calm.CalmForCausalLM",
        "AutoModelForCausalLM": "modeling_calm.CalmForCausalLM",
    }
    assert config["model_type"] == "calm" and config["autoencoder_config"]["model_type"] == "calm_autoencoder"
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "generation_config.json"}
    ae_folder = tmp_path / "ae"
    CalmAutoencoder(tiny_autoencoder_config()).save_pretrained(ae_folder)
    assert _code_files(ae_folder) == {
        "configuration_calm.py", "modeling_calm_autoencoder.py", "modeling_calm_kernels.py"
    }
    assert json.loads((ae_folder / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_calm_autoencoder.CalmAutoencoder"
    )


def test_shipped_files_import_only_stdlib_torch_and_transformers():
    package = Path(__file__).resolve().parents[1] / "modeling_calm"
    allowed = {
        "torch", "transformers", "math", "dataclasses", "__future__", "copy", "inspect", "warnings", "typing",
        "numbers", "collections", "functools", "difflib", "json", "os", "struct", "threading",
    }
    for name in SHIPPED_CALM_FILES:
        for line in (package / name).read_text().splitlines():
            if line.startswith(("import ", "from ")) and not line.startswith("from ."):
                root = line.split()[1].split(".")[0]
                assert root in allowed, f"{name}: {line}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_remote_code_load_in_fresh_process_gives_identical_outputs(tmp_path, dtype):
    model = CalmForCausalLM(tiny_calm_config()).eval().to(getattr(torch, dtype))
    folder = tmp_path / "calm-tiny"
    model.save_pretrained(folder)
    ids = torch.randint(3, 99, (2, 16))
    torch.save(ids, tmp_path / "ids.pt")
    expected = model(ids).last_hidden_state.float()
    torch.save(expected, tmp_path / "expected.pt")
    generated = model.generate(ids[:, :7], max_new_tokens=6, seed=0, temperature=0.5, num_candidates=8)
    torch.save(generated, tmp_path / "generated.pt")
    script = f"""
        import sys, torch
        try:
            import modeling_calm
            raise SystemExit("the package must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM, AutoModel
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "CalmForCausalLM", type(model)
        assert "transformers_modules" in type(model).__module__
        assert model.dtype == torch.{dtype}, model.dtype
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        out = model(ids).last_hidden_state.float()
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        assert torch.equal(out, expected), (out - expected).abs().max()
        assert not any(p.requires_grad for p in model.autoencoder.parameters())
        generated = model.generate(ids[:, :7], max_new_tokens=6, seed=0, temperature=0.5, num_candidates=8)
        assert torch.equal(generated, torch.load({str(tmp_path / 'generated.pt')!r}))
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(base).__name__ == "CalmForCausalLM"
        print("OK")
    """
    assert "OK" in run_without_package(script, cwd=tmp_path)


@pytest.mark.slow
def test_load_by_repo_id_from_hand_built_offline_cache(saved_model, tmp_path):
    model, folder = saved_model
    cache = tmp_path / "hub-cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--calm-org--calm-tiny"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    ids = torch.randint(3, 99, (1, 8))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(model(ids).last_hidden_state, tmp_path / "expected.pt")
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("calm-org/calm-tiny", trust_remote_code=True).eval()
        out = model(torch.load({str(tmp_path / 'ids.pt')!r})).last_hidden_state
        assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r}))
        print("OK")
    """
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    assert "OK" in run_without_package(script, cwd=tmp_path, env_extra=env)


@pytest.mark.slow
def test_missing_trust_remote_code_is_refused(saved_model, tmp_path):
    _, folder = saved_model
    script = f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=False)
        except ValueError as error:
            print("REFUSED", error)
    """
    assert "REFUSED" in run_without_package(script, cwd=tmp_path)


@pytest.mark.parametrize(
    "old,new,name",
    [("generation_calm", "modeling_calm_generation", "CalmGenerationMixin"),
     ("sampling_calm", "modeling_calm_sampling", "temperature_sample"),
     ("brier_calm", "modeling_calm_brier", "brier_indicators"),
     ("brier_scoring_calm", "modeling_calm_brier", "score_calm_brier")],
)
def test_old_module_names_are_deprecated_shims_that_nothing_ships(old, new, name):
    import importlib
    import sys

    sys.modules.pop(f"modeling_calm.{old}", None)
    with pytest.warns(FutureWarning, match=new):
        shim = importlib.import_module(f"modeling_calm.{old}")
    assert getattr(shim, name) is getattr(importlib.import_module(f"modeling_calm.{new}"), name)
    assert f"{old}.py" not in SHIPPED_CALM_FILES
