"""Shared tiny configurations (odd sizes on purpose: hidden 32, vocab 99, K=4, Z=8)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modeling_calm import CalmAutoencoderConfig, CalmConfig


def tiny_autoencoder_config(**overrides) -> CalmAutoencoderConfig:
    values = dict(
        vocab_size=99, hidden_size=32, intermediate_size=48, latent_size=8, patch_size=4,
        num_encoder_layers=2, num_decoder_layers=2, ae_dropout=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return CalmAutoencoderConfig(**values)


def tiny_calm_config(head_type: str = "energy", k: int = 4, **overrides) -> CalmConfig:
    backbone = dict(
        model_type="llama", vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    backbone.update(overrides.pop("backbone", {}))
    values = dict(noise_size=8, num_mlp_layers=2, num_samples=4, num_target_samples=16, head_type=head_type)
    values.update(overrides)
    return CalmConfig(
        autoencoder_config=tiny_autoencoder_config(patch_size=k), backbone_config=backbone, **values
    )


@pytest.fixture
def calm_config():
    return tiny_calm_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Prepended to scripts that must run as on a machine that never installed the package: CI installs it (editable),
# so removing PYTHONPATH is not enough; this finder makes every `modeling_calm` import fail as if it were absent.
_WITHOUT_PACKAGE = """
import sys
class _PackageAbsent:
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_calm" or name.startswith("modeling_calm."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _PackageAbsent())
"""


def other_test_pythons() -> list[str]:
    """Interpreters of the other CI venvs (`CALM_TEST_PYTHONS`, separated by os.pathsep): `.ci/run` builds one venv
    at the newest allowed versions and one at the lower bounds, and each suite also loads models in the other."""
    return [p for p in os.environ.get("CALM_TEST_PYTHONS", "").split(os.pathsep) if p and Path(p).exists()
            and Path(p).resolve() != Path(sys.executable).resolve()]


def run_without_package(script: str, cwd: Path, env_extra: dict | None = None, timeout: int = 300,
                        python: str | None = None) -> str:
    """Run `script` in a fresh interpreter (this one, or `python`) where `modeling_calm` cannot be imported; return
    its stdout.

    stdin is closed (empty), so an interactive prompt (transformers' "[y/N]" for remote code) fails at once instead
    of waiting for a terminal."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    code = _WITHOUT_PACKAGE + textwrap.dedent(script)
    result = subprocess.run([python or sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
