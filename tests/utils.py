"""Helpers shared by the test modules (test modules import from here, never from each other; conftest.py keeps
only fixtures).

Tiny configurations use odd sizes on purpose: hidden 32, vocab 99, K=4, Z=8.
"""

import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modeling_calm import CalmAutoencoderConfig, CalmConfig, CalmForCausalLM
from modeling_calm.modeling_calm_heads import zero_init_layers


# The files `save_pretrained` writes beside a CALM's weights (its remote code); pinned by tests/test_hub.py.
SHIPPED_CALM_FILES = {
    "configuration_calm.py",
    "modeling_calm.py",
    "modeling_calm_autoencoder.py",
    "modeling_calm_brier.py",
    "modeling_calm_compat.py",
    "modeling_calm_generation.py",
    "modeling_calm_generation_settings.py",
    "modeling_calm_graphs.py",
    "modeling_calm_heads.py",
    "modeling_calm_kernels.py",
    "modeling_calm_sampling.py",
}


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


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box thread contention made these
    tests ~5x slower; restored afterwards so other test modules are unaffected. Import it into a test module to
    use it there (an autouse fixture applies to the module that holds it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = "the a of river city was born in and to film album song team war king church station school is".split()


def write_word_corpus(path: Path, rng: random.Random, documents: int = 400) -> Path:
    """A JSONL corpus of `documents` texts of 20 to 200 words drawn from WORDS."""
    path.write_text("".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))}) + "\n"
        for _ in range(documents)
    ))
    return path


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


# Markov chains: token distributions whose exact Brier scores are known in closed form.


def random_transition(vocab: int, sharpness: float, seed: int) -> torch.Tensor:
    """Random row-stochastic [V, V] matrix in float64; larger `sharpness` gives more peaked rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), dim=-1)


def sample_chain(transition: torch.Tensor, start: torch.Tensor, steps: int, g: torch.Generator) -> torch.Tensor:
    """start LongTensor [N] -> [N, steps] continuations of the Markov chain."""
    out, state = [], start
    for _ in range(steps):
        state = torch.multinomial(transition[state], 1, generator=g)[:, 0]
        out.append(state)
    return torch.stack(out, dim=-1)


def markov_brier(transition: torch.Tensor, context: int, target: list[int], n: int) -> float:
    """Brier(P, y) = 2 P(y) - sum_x P(x)^2 over n-grams after `context`, by enumerating all V^n n-grams."""
    def prob(gram):
        p, state = 1.0, context
        for x in gram:
            p, state = p * float(transition[state, x]), x
        return p

    vocab = transition.shape[0]
    squares = sum(prob(g) ** 2 for g in itertools.product(range(vocab), repeat=n))
    return 2 * prob(target[:n]) - squares


# Generation tests (test_modeling_calm_generation*.py)
PAD, BOS, EOS = 0, 1, 2
NO_STOPS = dict(eos_token_id=None, stop_on_bos=False)


def make_model(head_std: float = 0.5, peaked: bool = False, **config) -> CalmForCausalLM:
    """Tiny CALM whose zero-initialised head output layer gets weights, so samples depend on the noise.

    `peaked`: the head's output bias moves the latents away from 0 (where the decoder's RMSNorm turns any small
    variation into a different chunk), so a handful of chunks take most of the mass and repeat among candidates.
    """
    torch.manual_seed(0)
    model = CalmForCausalLM(tiny_calm_config(**config)).eval()
    for layer in zero_init_layers(model):
        torch.nn.init.normal_(layer.weight, std=head_std)
    if peaked:
        torch.nn.init.normal_(model.head.output.fc2.bias, std=1.0)
    return model


def left_pad(rows: list[list[int]], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows)) + extra
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def random_rows(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 99, (n,), generator=g).tolist() for n in lengths]



def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "<pad>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>", pad_token="<pad>")


class ToyHead(torch.nn.Module):
    """Context-free generative head for BrierLM tests: category c with probability probs[c] (inverse CDF of the
    first noise coordinate), returned as the one-hot latent of c. Same noise interface as the energy head."""

    def __init__(self, probs, noise_size: int, latent_size: int):
        super().__init__()
        self.register_buffer("cdf", torch.as_tensor(probs, dtype=torch.float64).cumsum(0))
        self.noise_size, self.latent_size = noise_size, latent_size

    def draw_noise(self, shape, *, device=None, generator=None):
        return torch.rand((*shape, self.noise_size), device=device, generator=generator) - 0.5

    def sample(self, hidden_states, noise=None, generator=None):
        u = (noise[..., 0].double() + 0.5) * self.cdf[-1]
        category = torch.searchsorted(self.cdf, u.contiguous(), right=True).clamp(max=self.cdf.numel() - 1)
        return torch.nn.functional.one_hot(category, self.latent_size).to(hidden_states.dtype)
