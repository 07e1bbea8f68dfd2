"""BrierLM for CALM: `CalmForCausalLM.score_brier` (fast batched sampler against the loop-over-positions
reference), chunk-boundary alignment and masking, independence of the two samples, unbiasedness on a toy CALM
with a known chunk distribution, evaluate_brier / PEFT / remote code, and examples/evaluate_brierlm.py.

The statistical test uses fixed seeds and accepts |empirical mean - exact value| <= 4 standard errors (SE
estimated from the draws), as in test_brier.py.
"""

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_calm import CalmConfig, CalmForCausalLM
from modeling_calm.modeling_calm_brier import (
    BrierAccumulator,
    brier_indicators,
    brier_lm,
    brier_num_positions,
    brier_scores,
    brier_sums,
    draw_brier_noise,
    sample_brier_continuations,
    sample_brier_continuations_ref,
)
from modeling_calm.data_calm import train_bpe_tokenizer
from modeling_calm.evaluation_calm import evaluate_brier
from tests.utils import (
    ToyHead, markov_brier, random_transition, run_without_package, sample_chain, single_thread, tiny_calm_config,
)


MAX_N = 4
NUM_SE = 4.0
ROOT = Path(__file__).resolve().parents[1]




def tiny_calm(k: int, head_type: str = "energy", seed: int = 0, **overrides) -> CalmForCausalLM:
    """A tiny CALM whose samples depend on the head noise: the head's last layer is zero-initialised (every
    sample would be the same latent), so it is re-drawn here."""
    torch.manual_seed(seed)
    model = CalmForCausalLM(tiny_calm_config(head_type=head_type, k=k, **overrides)).eval()
    nn.init.normal_(model.head.output.fc2.weight, std=1.0)
    return model


# ----------------------------------------------------------------------------------------------------------------
# A toy CALM with a known, context-free chunk distribution
# ----------------------------------------------------------------------------------------------------------------


class ToyDecoder(nn.Module):
    """Autoencoder stand-in: the one-hot latent of category c decodes (argmax) to the K tokens chunks[c]."""

    def __init__(self, chunks: torch.Tensor, vocab: int, latent_size: int):
        super().__init__()
        table = torch.zeros(latent_size, chunks.shape[1], vocab)
        for c, chunk in enumerate(chunks.tolist()):
            table[c, torch.arange(len(chunk)), chunk] = 1.0
        self.register_buffer("table", table)  # [Z, K, V]

    def decode(self, latents):  # [..., L, Z] -> [..., L*K, V]
        logits = torch.einsum("...lz,zkv->...lkv", latents.float(), self.table)
        return logits.reshape(*latents.shape[:-2], -1, self.table.shape[-1])

    def decode_tokens(self, latents, max_logits_per_block=None):  # [..., L, Z] -> [..., L*K], the model's interface
        return self.decode(latents).argmax(-1)


def toy_calm(k: int, chunks: list[list[int]], probs: list[float]) -> CalmForCausalLM:
    model = tiny_calm(k)
    config = model.config
    model.head = ToyHead(torch.tensor(probs), config.noise_size, config.latent_size)
    model.autoencoder = ToyDecoder(torch.tensor(chunks), config.vocab_size, config.latent_size)
    return model


def exact_brier(chunks: list[list[int]], probs: list[float], target: list[int], n: int) -> float:
    """Brier(P, y) = 2 P(y) - sum_x P(x)^2 over n-grams, for i.i.d. chunks (enumerates every continuation)."""
    k = len(chunks[0])
    p_ngram: dict[tuple, float] = {}
    for seq in itertools.product(range(len(chunks)), repeat=math.ceil(n / k)):
        tokens = tuple(t for c in seq for t in chunks[c])[:n]
        p_ngram[tokens] = p_ngram.get(tokens, 0.0) + math.prod(probs[c] for c in seq)
    return 2 * p_ngram.get(tuple(target[:n]), 0.0) - sum(p * p for p in p_ngram.values())


# ----------------------------------------------------------------------------------------------------------------
# Fast path == reference
# ----------------------------------------------------------------------------------------------------------------


def record_head_calls(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wraps `model.head.sample` to record every (hidden [N, D], noise [N, E]) it is called with."""
    calls, sample = [], model.head.sample

    def recording(hidden_states, noise=None, generator=None):
        calls.append((hidden_states.reshape(-1, hidden_states.shape[-1]), noise.reshape(-1, noise.shape[-1])))
        return sample(hidden_states, noise=noise, generator=generator)

    model.head.sample = recording
    return calls


@pytest.mark.parametrize(
    "k,head_type,attn,length",
    [(1, "energy", "sdpa", 12), (2, "energy", "sdpa", 12), (2, "energy", "eager", 12), (3, "energy", "sdpa", 12),
     (4, "energy", "sdpa", 16), (5, "energy", "sdpa", 15), (2, "flow", "sdpa", 12)],
)
def test_fast_sampler_matches_reference(k, head_type, attn, length):
    model = tiny_calm(k, head_type)
    model.model.set_attn_implementation(attn)
    ids = torch.randint(3, 99, (2, length), generator=torch.Generator().manual_seed(k))
    labels = ids.clone()
    labels[1, 5] = -100
    noise = draw_brier_noise(model, 2, length // k, MAX_N, torch.Generator().manual_seed(1))
    calls = record_head_calls(model)
    fast = sample_brier_continuations(model, ids, noise=noise)
    fast_calls = calls[:]
    calls.clear()
    ref = sample_brier_continuations_ref(model, ids, noise=noise)
    steps = math.ceil(MAX_N / k)
    assert fast.shape == (2, length // k, 2, steps * k)
    assert torch.equal(fast, ref)
    # Tokens are robust to small errors in the context (argmax of a tiny model), so check the hidden state the
    # head saw for every noise entry: a wrong mask or position id moves it by >= 1e-4, rounding by ~1e-6.
    fast_hidden, fast_noise = (torch.cat(t) for t in zip(*fast_calls))
    ref_hidden, ref_noise = (torch.cat(t) for t in zip(*calls))
    match = (ref_noise[:, None] == fast_noise[None]).all(-1)  # [N_ref, N_fast]: which call used the same noise
    assert ref_hidden.shape == fast_hidden.shape and (match.sum(1) == 1).all()
    torch.testing.assert_close(ref_hidden, fast_hidden[match.float().argmax(1)], atol=2e-5, rtol=0)
    positions = brier_num_positions(length, k)
    assert (fast[:, positions:] == -1).all() and (fast[:, :positions] >= 0).all()
    assert fast[:, :positions].unique().numel() > 4  # the samples are not all one token

    # The protocol method draws the same noise from the same seed on both paths.
    brier, mask = model.score_brier(ids, labels=labels, generator=torch.Generator().manual_seed(1))
    brier_ref, mask_ref = model.score_brier_ref(ids, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(brier, brier_ref) and torch.equal(mask, mask_ref)
    assert brier.shape == (2, length // k, MAX_N) and brier.dtype == torch.float32
    # Two samples, y the target: 1{x1 = y} + 1{x2 = y} - 1{x1 = x2} is -1, 0 or 1 (both right means x1 = x2).
    assert set(brier[mask].unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_continuation_conditions_on_its_own_sampled_chunk():
    """K=2: the second chunk of sample s is the model's draw after [context + its own first chunk], checked by
    a plain forward; and swapping the first chunks of the two samples changes what follows."""
    model = tiny_calm(2)
    ids = torch.randint(3, 99, (1, 12), generator=torch.Generator().manual_seed(5))
    noise = draw_brier_noise(model, 1, 6, MAX_N, torch.Generator().manual_seed(6))
    samples = sample_brier_continuations(model, ids, noise=noise)  # [1, 6, 2, 4]
    i = 2
    for s in range(2):
        context = torch.cat([ids[0, : (i + 1) * 2], samples[0, i, s, :2]])[None]
        hidden = model(context).last_hidden_state[0, -1]
        latent = model.head.sample(hidden, noise=noise[0, i, s, 1])
        assert model.autoencoder.decode(latent[None]).argmax(-1).tolist() == samples[0, i, s, 2:].tolist()
    assert not torch.equal(samples[0, i, 0], samples[0, i, 1])


# ----------------------------------------------------------------------------------------------------------------
# Alignment, end of block, labels
# ----------------------------------------------------------------------------------------------------------------


def test_alignment_and_last_boundary_with_an_oracle():
    """A toy CALM that always emits the chunk (5, 7), on a text that repeats it except one token: both samples
    agree, so every estimate is exact: 1 where the true n-gram follows the pattern, -1 where it crosses the
    break. Boundaries i = 0..5 of a 16-token block count ((i+1)*2 + 4 <= 16), i = 6, 7 do not."""
    model = toy_calm(2, chunks=[[5, 7]], probs=[1.0])
    length, brk = 16, 9
    text = torch.tensor([5, 7] * (length // 2))
    text[brk] = 3
    brier, mask = model.score_brier(text[None], generator=torch.Generator().manual_seed(0))
    assert mask[0].tolist() == [True] * 6 + [False] * 2
    for i in range(6):
        for n in range(1, MAX_N + 1):
            first = (i + 1) * 2  # first target token of boundary i
            crosses = first <= brk <= first + n - 1
            assert brier[0, i, n - 1].item() == (-1.0 if crosses else 1.0), (i, n)
    assert (brier[0, 6:] == 0).all()


@pytest.mark.parametrize("k,length", [(2, 14), (3, 15), (4, 16)])
def test_end_of_block_and_label_mask(k, length):
    model = tiny_calm(k)
    ids = torch.randint(3, 99, (3, length), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, k + 1] = -100  # one masked target inside the block
    labels[1, length - 3 :] = -100  # right padding, as load_text_blocks writes it
    brier, mask = model.score_brier(ids, labels=labels, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        for i in range(length // k):
            window = range((i + 1) * k, (i + 1) * k + MAX_N)
            expected = window[-1] < length and all(labels[b, t] != -100 for t in window)
            assert bool(mask[b, i]) == expected, (b, i)
    assert int(mask[2].sum()) == brier_num_positions(length, k) == (length - MAX_N) // k
    assert (brier[~mask] == 0).all()
    # labels=None means labels = input_ids.
    assert torch.equal(model.score_brier(ids, generator=torch.Generator().manual_seed(0))[1][2], mask[2])


def test_bad_inputs():
    model = tiny_calm(4)
    with pytest.raises(ValueError, match="multiple of patch_size K=4"):
        model.score_brier(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer tensor of shape \[B, T\]"):
        model.score_brier(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model.score_brier(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        model.score_brier(torch.zeros(1, 8, dtype=torch.long), max_n=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_brier_continuations(model, torch.zeros(1, 8, dtype=torch.long), noise=torch.rand(1, 2, 2, 2, 8))
    short = model.score_brier(torch.zeros(2, 4, dtype=torch.long))  # no boundary has 4 future tokens
    assert short[0].shape == (2, 1, MAX_N) and not short[1].any()
    flash = tiny_calm(2)  # K=2 < 4 needs the masked continuation; K=4 would not
    flash.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        flash.score_brier(torch.zeros(1, 8, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# Independence, reproducibility, unbiasedness
# ----------------------------------------------------------------------------------------------------------------


def test_two_samples_are_independent_draws():
    model = tiny_calm(2)
    ids = torch.randint(3, 99, (2, 24), generator=torch.Generator().manual_seed(3))
    noise = draw_brier_noise(model, 2, 12, MAX_N, torch.Generator().manual_seed(4))
    assert not torch.equal(noise[:, :, 0], noise[:, :, 1])
    samples = sample_brier_continuations(model, ids, noise=noise)[:, : brier_num_positions(24, 2)]
    differ = (samples[:, :, 0] != samples[:, :, 1]).any(-1).float().mean().item()
    assert differ > 0.5, differ
    # The samples are functions of their own noise only: with sample 1 given sample 0's noise they coincide.
    same = noise.clone()
    same[:, :, 1] = same[:, :, 0]
    tied = sample_brier_continuations(model, ids, noise=same)[:, : brier_num_positions(24, 2)]
    assert torch.equal(tied[:, :, 0], tied[:, :, 1]) and torch.equal(tied[:, :, 0], samples[:, :, 0])
    # Reproducible from the seed; another seed draws differently.
    first = model.score_brier(ids, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(first, model.score_brier(ids, generator=torch.Generator().manual_seed(7))[0])
    assert not torch.equal(first, model.score_brier(ids, generator=torch.Generator().manual_seed(8))[0])


def test_calm_estimator_is_unbiased_on_a_known_chunk_distribution():
    """K=2, three chunks sharing first tokens, probabilities (0.5, 0.3, 0.2), independent of the context. The
    text also holds a chunk the model never emits. Brier-3 and Brier-4 need a continued second chunk per sample.
    With dependent samples (the same noise twice) Brier-1 would be off by sum P^2 - 1 = -0.32, ~15 SE here."""
    chunks, probs = [[5, 6], [5, 7], [8, 9]], [0.5, 0.3, 0.2]
    model = toy_calm(2, chunks, probs)
    blocks, length, passes = 8, 32, 16
    g = torch.Generator().manual_seed(21)
    choices = torch.tensor(chunks + [[10, 11]])
    text = choices[torch.randint(0, 4, (blocks, length // 2), generator=g)].reshape(blocks, length)
    labels = text.clone()
    labels[3, 20] = -100
    exact = torch.tensor([[[exact_brier(chunks, probs, text[b, (i + 1) * 2 : (i + 1) * 2 + MAX_N].tolist(), n)
                            for n in range(1, MAX_N + 1)] for i in range(length // 2)] for b in range(blocks)])
    diffs = []
    for seed in range(passes):
        brier, mask = model.score_brier(text, labels=labels, generator=torch.Generator().manual_seed(seed))
        diffs.append((brier.double() - exact)[mask])
    diffs = torch.cat(diffs)
    assert diffs.shape[0] == passes * (blocks * brier_num_positions(length, 2) - 2)  # label -100 masks 2 boundaries
    for n in range(MAX_N):
        se = diffs[:, n].std().item() / math.sqrt(diffs.shape[0])
        assert abs(diffs[:, n].mean().item()) <= NUM_SE * se, (n + 1, diffs[:, n].mean().item(), se)


# ----------------------------------------------------------------------------------------------------------------
# End to end: evaluate_brier, PEFT, remote code
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 2])
def test_evaluate_brier_end_to_end(k):
    model = tiny_calm(k)
    model.train()
    ids = torch.randint(3, 99, (5, 16), generator=torch.Generator().manual_seed(k))
    labels = ids.clone()
    labels[4, 10:] = -100  # a padded last block: 10 real tokens
    result = evaluate_brier(model, {"input_ids": ids, "labels": labels}, batch_size=2, seeds=(0, 1), progress=False)
    assert model.training  # restored
    assert result["num_positions"] == 4 * brier_num_positions(16, k) + brier_num_positions(10, k)
    assert all(math.isfinite(v) for v in result["mean"].values())
    assert result["per_seed"][0] != result["per_seed"][1]
    # One generator per batch (batch_seed(seed, batch index)): the same batching gives the same draws.
    again = evaluate_brier(model, [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in (0, 2, 4)],
                           seeds=(0, 1), progress=False)
    assert again["per_seed"] == result["per_seed"]


def test_score_brier_through_peft():
    peft = pytest.importorskip("peft")
    model = tiny_calm(2)
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(9))
    expected = model.score_brier(ids, generator=torch.Generator().manual_seed(0))
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    got = wrapped.score_brier(ids, generator=torch.Generator().manual_seed(0))  # LoRA B = 0: same model
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    result = evaluate_brier(wrapped, ids, seeds=(0,), progress=False)
    assert result["num_positions"] == 2 * brier_num_positions(12, 2)


@pytest.mark.slow
def test_score_brier_through_remote_code(tmp_path):
    model = tiny_calm(2)
    folder = tmp_path / "calm"
    model.save_pretrained(folder)
    assert (folder / "modeling_calm_brier.py").exists()
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(10))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(model.score_brier(ids, generator=torch.Generator().manual_seed(3))[0], tmp_path / "expected.pt")
    script = f"""
        import torch
        try:
            import modeling_calm
            raise SystemExit("the package must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        brier, mask = model.score_brier(ids, generator=torch.Generator().manual_seed(3))
        assert torch.equal(brier, torch.load({str(tmp_path / 'expected.pt')!r}))
        print("OK")
    """
    assert "OK" in run_without_package(script, cwd=tmp_path, env_extra={"HF_HUB_OFFLINE": "1"})


# ----------------------------------------------------------------------------------------------------------------
# examples/evaluate_brierlm.py
# ----------------------------------------------------------------------------------------------------------------


def load_example():
    spec = importlib.util.spec_from_file_location("evaluate_brierlm", ROOT / "examples" / "evaluate_brierlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_setup(tmp_path_factory):
    """A tiny tokenizer, a tiny CALM (K=4, with the tokenizer saved beside it) and a tiny Llama, and a text file."""
    root = tmp_path_factory.mktemp("brierlm_example")
    sentences = ["CALM predicts the next vector.", "Each vector stands for four tokens.",
                 "A Transformer predicts the next token.", "BrierLM compares two samples with the truth."]
    text = " ".join(sentences[i % 4] for i in range(40))
    (root / "eval.txt").write_text(text, encoding="utf-8")
    tokenizer = train_bpe_tokenizer(iter(sentences * 10), vocab_size=300, min_frequency=2)
    vocab = 300
    config = tiny_calm_config(k=4).to_dict()
    config["autoencoder_config"]["vocab_size"] = config["backbone_config"]["vocab_size"] = vocab
    torch.manual_seed(0)
    calm = CalmForCausalLM(CalmConfig.from_dict(config))
    calm.save_pretrained(root / "calm")
    tokenizer.save_pretrained(root / "calm")
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                         max_position_embeddings=128))
    llama.save_pretrained(root / "llama")
    num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return root, num_tokens


def test_example_scores_a_calm_and_a_causal_lm(example_setup):
    root, num_tokens = example_setup
    example = load_example()
    block = 32
    full, rest = divmod(num_tokens, block)
    expected = {4: full * ((block - MAX_N) // 4) + max(rest - MAX_N, 0) // 4,
                1: full * (block - MAX_N) + max(rest - MAX_N, 0)}
    for name, k, extra in (("calm", 4, []), ("llama", 1, ["--tokenizer", str(root / "calm")])):
        output = root / "out" / f"{name}.json"
        report = example.main(["--model", str(root / name), "--eval_file", str(root / "eval.txt"),
                               "--block_size", str(block), "--seeds", "0", "1", "--batch_size", "4",
                               "--device", "cpu", "--output", str(output), *extra])
        written = json.loads(output.read_text())
        assert written["num_positions"] == report["num_positions"] == expected[k], name
        assert {"model", "eval_file", "block_size", "seeds", "per_seed", "mean", "std", "num_positions", "versions",
                "date", "patch_size"} <= set(written)
        assert written["patch_size"] == k and written["seeds"] == [0, 1] and len(written["per_seed"]) == 2
        assert set(written["mean"]) == {"brier_1", "brier_2", "brier_3", "brier_4", "brier_lm"}
        assert written["versions"]["transformers"]
    # --max_blocks and one seed (std undefined -> null in the JSON)
    report = example.main(["--model", str(root / "calm"), "--eval_file", str(root / "eval.txt"), "--block_size", "32",
                           "--seeds", "5", "--max_blocks", "1", "--device", "cpu", "--output", str(root / "one.json")])
    assert report["num_blocks"] == 1 and report["num_positions"] == (32 - MAX_N) // 4
    assert json.loads((root / "one.json").read_text())["std"]["brier_lm"] is None


def test_example_errors(example_setup):
    root, _ = example_setup
    example = load_example()
    base = ["--model", str(root / "calm"), "--device", "cpu", "--seeds", "0"]
    with pytest.raises(ValueError, match="block_size=30 must be a multiple of the CALM's patch_size K=4"):
        example.main([*base, "--eval_file", str(root / "eval.txt"), "--block_size", "30"])
    empty = root / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no text"):
        example.main([*base, "--eval_file", str(empty), "--block_size", "32"])
    with pytest.raises(ValueError, match="must exceed 4"):
        example.main([*base, "--eval_file", str(root / "eval.txt"), "--block_size", "4"])


# ----------------------------------------------------------------------------------------------------------------
# The estimator (from two samples; Markov chains give exact values)
# ----------------------------------------------------------------------------------------------------------------


def test_indicators_hand_computed():
    y = torch.tensor([[1, 2, 3, 4]])
    x1 = torch.tensor([[1, 2, 9, 4]])  # hits y for n = 1, 2 only: a later match after a miss does not count
    x2 = torch.tensor([[1, 7, 3, 4]])  # hits y for n = 1
    # n=1: 1 + 1 - 1 (x1, x2 agree on 1 token); n=2: 1 + 0 - 0; n=3, 4: 0 + 0 - 0
    assert brier_indicators(x1, x2, y).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # Two different samples that both hit: 2 - 1 = 1; two that miss but agree: -1.
    assert brier_indicators(y, y, y, max_n=2).tolist() == [[1.0, 1.0]]
    assert brier_indicators(x2, x2, x1, max_n=2).tolist() == [[1.0, -1.0]]  # identical samples: 2 * 1{x = y} - 1
    # Longer continuations: only the first max_n tokens are used.
    assert brier_indicators(torch.tensor([[5, 6, 0]]), torch.tensor([[5, 0, 0]]), torch.tensor([[5, 6, 1]]),
                            max_n=2).tolist() == [[1.0, 1.0]]


def test_identical_samples_degenerate():
    """x1 == x2 gives 2 * 1{x = y} - 1: 1 where the n-gram is right, -1 otherwise (meaningless as a score)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200, 6), generator=g)
    x = torch.where(torch.rand(200, 6, generator=g) < 0.7, y, torch.randint(0, 3, (200, 6), generator=g))
    correct = (x[:, :MAX_N] == y[:, :MAX_N]).long().cumprod(-1)
    assert torch.equal(brier_indicators(x, x, y), (2 * correct - 1).float())
    assert set(brier_indicators(x, x, y).unique().tolist()) <= {-1.0, 1.0}


def test_estimator_unbiased_on_markov_chain():
    """Mean of the estimator over many independent draws = exact Brier-n of the known n-gram distribution."""
    vocab, draws = 4, 20000
    transition = random_transition(vocab, sharpness=1.5, seed=1)
    g = torch.Generator().manual_seed(2)
    for context in range(vocab):
        start = torch.full((draws,), context, dtype=torch.long)
        target = sample_chain(transition, start[:1], MAX_N, g)[0]  # a typical true continuation
        x1 = sample_chain(transition, start, MAX_N, g)
        x2 = sample_chain(transition, start, MAX_N, g)
        estimates = brier_indicators(x1, x2, target.expand(draws, -1)).double()  # [draws, 4]
        means = brier_scores(estimates)
        for n in range(1, MAX_N + 1):
            exact = markov_brier(transition, context, target.tolist(), n)
            se = estimates[:, n - 1].std().item() / math.sqrt(draws)
            assert abs(means[n - 1].item() - exact) <= NUM_SE * se, (context, n, means[n - 1].item(), exact, se)


def test_reducers_and_mask():
    g = torch.Generator().manual_seed(3)
    ind = torch.randint(-1, 3, (3, 5, MAX_N), generator=g).float()
    mask = torch.rand(3, 5, generator=g) < 0.6
    sums, counts = brier_sums(ind, mask)
    assert torch.allclose(sums, ind[mask].double().sum(0)) and torch.all(counts == mask.sum())
    assert torch.allclose(brier_scores(ind, mask), ind[mask].double().mean(0))
    # Per-(position, n) mask: n-th column masked independently.
    mask_n = torch.rand(3, 5, MAX_N, generator=g) < 0.6
    mask_n[0, 0] = True
    expected = torch.stack([ind[..., n][mask_n[..., n]].double().mean() for n in range(MAX_N)])
    assert torch.allclose(brier_scores(ind, mask_n), expected)
    # brier_indicators zeroes masked entries so sums stay right.
    x = torch.randint(0, 3, (3, 5, MAX_N), generator=g)
    assert torch.all(brier_indicators(x, x.flip(0), x, mask=mask)[~mask] == 0)


def test_brier_lm_and_accumulator():
    assert brier_lm([0.1, 0.1, 0.1, 0.1]) == pytest.approx(10.0)
    assert brier_lm(torch.tensor([0.4, 0.2, 0.1, 0.05])) == pytest.approx(100 * (0.4 * 0.2 * 0.1 * 0.05) ** 0.25)
    assert brier_lm([0.3, 0.2, 0.0, 0.1]) == 0.0  # clamp-at-0 rule
    assert brier_lm([0.3, 0.2, 0.1, -0.02]) == 0.0
    assert math.isnan(brier_lm([0.3, float("nan"), 0.1, 0.1]))

    g = torch.Generator().manual_seed(4)
    chunks = [torch.randint(-1, 3, (2, 7, MAX_N), generator=g).float() for _ in range(3)]
    masks = [torch.rand(2, 7, generator=g) < 0.8 for _ in range(3)]
    acc, half = BrierAccumulator(), BrierAccumulator()
    for c, m in zip(chunks, masks):
        acc.update(c, m)
    half.update(chunks[0], masks[0])
    rest = BrierAccumulator()
    rest.update(chunks[1], masks[1])
    rest.update(chunks[2], masks[2])
    half.merge(rest)
    all_ind, all_mask = torch.cat(chunks), torch.cat(masks)
    expected = brier_scores(all_ind, all_mask)
    result = acc.compute()
    assert result == half.compute()
    assert result["num_positions"] == int(all_mask.sum())
    assert [result[f"brier_{n}"] for n in range(1, 5)] == pytest.approx(expected.tolist())
    assert result["brier_lm"] == pytest.approx(brier_lm(expected))


def test_estimator_bad_inputs():
    x = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        brier_indicators(x, x, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        brier_indicators(x, x, x, max_n=0)
    with pytest.raises(ValueError, match="n_tokens=4 .* max_n=5"):
        brier_indicators(x, x, x, max_n=5)
    with pytest.raises(ValueError, match="integer token ids"):
        brier_indicators(x.float(), x, x)
    with pytest.raises(ValueError, match="mask has shape"):
        brier_indicators(x, x, x, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="No valid position"):
        brier_scores(torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="No valid position"):
        BrierAccumulator().compute()
    with pytest.raises(ValueError, match="max_n=4"):
        BrierAccumulator().update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="empty"):
        brier_lm([])
