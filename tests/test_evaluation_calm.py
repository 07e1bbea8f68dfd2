"""Tests for evaluation_calm (BrierLM of causal LMs: sampling, scoring, batches and seeds) and the evaluate metric.

Statistical tests use fixed seeds and accept |empirical mean - exact value| <= 4 standard errors (SE estimated
from the draws); with fixed seeds they are deterministic, and a correct implementation fails a single check with
probability ~6e-5 over the choice of seed.
"""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_calm.evaluation_calm import (
    batch_seed,
    evaluate_brier,
    load_text_blocks,
    sample_continuations,
    sample_continuations_ref,
    score_blocks,
    score_causal_lm,
    score_causal_lm_ref,
    true_continuations,
)
from modeling_calm.modeling_calm_brier import BrierAccumulator, brier_indicators, brier_lm, brier_scores
from tests.utils import markov_brier, random_transition, sample_chain, single_thread, word_tokenizer


VOCAB = 50
MAX_N = 4
NUM_SE = 4.0  # tolerance of the statistical tests, in standard errors




# ----------------------------------------------------------------------------------------------------------------
# Toy models
# ----------------------------------------------------------------------------------------------------------------


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


class BigramLM(torch.nn.Module):
    """Causal LM whose next-token distribution depends only on the current token (a Markov chain): logits =
    log P[x_t]. Context, attention masks, position ids and the cache do not matter to it, so its exact Brier
    scores are known in closed form."""

    def __init__(self, transition: torch.Tensor):
        super().__init__()
        self.register_buffer("log_p", transition.log())

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None, **kw):
        cache = past_key_values if past_key_values is not None else ()
        return SimpleNamespace(logits=self.log_p[input_ids], past_key_values=cache)


# ----------------------------------------------------------------------------------------------------------------
# Scoring causal LMs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fast_path_matches_reference(attn):
    """Same generator -> the cached, 4-D-masked fast path draws exactly the reference's tokens, from the logits of a
    plain forward over prefix + continuation; padding on either side included."""
    model = tiny_llama(attn)
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, -3:] = 0  # right padding
    for mask in (None, attention_mask):
        fast, fast_logits = sample_continuations(model, input_ids, mask, generator=torch.Generator().manual_seed(6),
                                                 return_logits=True)
        ref, ref_logits = sample_continuations_ref(model, input_ids, mask, generator=torch.Generator().manual_seed(6),
                                                   return_logits=True)
        assert fast.shape == ref.shape == (3, 10 - MAX_N, 2, MAX_N)
        assert torch.equal(fast, ref)
        real = (mask if mask is not None else torch.ones_like(input_ids))[:, : 10 - MAX_N].bool()
        torch.testing.assert_close(fast_logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
        # The two samples of a position are different draws (not the same noise).
        assert not torch.equal(fast[:, :, 0], fast[:, :, 1])

    labels = input_ids.clone()
    labels[0, 5] = -100
    out_fast = score_causal_lm(model, input_ids, attention_mask, labels, generator=torch.Generator().manual_seed(7))
    out_ref = score_causal_lm_ref(model, input_ids, attention_mask, labels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out_fast[0], out_ref[0]) and torch.equal(out_fast[1], out_ref[1])


def test_end_of_block_and_label_rule():
    """Position t is scored iff targets t+1..t+4 are inside the block, none is -100 and token t is real."""
    length = 12
    model = tiny_llama()
    input_ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(8))
    labels = input_ids.clone()
    labels[0, 7] = -100
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    brier, mask = score_causal_lm(model, input_ids, attention_mask, labels, generator=torch.Generator().manual_seed(0))
    assert brier.shape == (2, length, MAX_N) and mask.shape == (2, length)
    expected0 = [t + MAX_N <= length - 1 and not (t + 1 <= 7 <= t + MAX_N) for t in range(length)]
    # Row 1: targets at padded tokens 0, 1 are invalid, and so are positions 0, 1 themselves.
    expected1 = [t >= 2 and t + MAX_N <= length - 1 for t in range(length)]
    assert mask.tolist() == [expected0, expected1]
    assert torch.all(brier[~mask] == 0)
    targets, valid = true_continuations(input_ids, attention_mask, labels)
    assert torch.equal(targets[0, 2], labels[0, 3:7]) and torch.equal(valid, mask[:, : length - MAX_N])
    # Blocks with no position that has 4 future tokens score nothing.
    brier, mask = score_causal_lm(model, input_ids[:, :MAX_N], generator=torch.Generator().manual_seed(0))
    assert brier.shape == (2, MAX_N, MAX_N) and not mask.any()


def test_no_off_by_one_with_deterministic_chain():
    """A model that always predicts x+1 (mod V) on a text that follows x+1 except at one token: every estimate
    is exact (both samples agree), 1 where the true n-gram follows the rule and -1 where it crosses the break."""
    vocab, length, brk = 7, 16, 9
    transition = torch.full((vocab, vocab), 0.0).double()
    transition[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = 1.0
    model = BigramLM(transition)
    text = (torch.arange(length) % vocab).clone()
    text[brk:] = (torch.arange(length - brk) + 3) % vocab  # text[brk] = 3 breaks the rule, then it resumes
    assert text[brk] != (text[brk - 1] + 1) % vocab
    brier, mask = score_causal_lm(model, text[None], generator=torch.Generator().manual_seed(0))
    for t in range(length - MAX_N):
        for n in range(1, MAX_N + 1):
            crosses = t + 1 <= brk <= t + n
            assert brier[0, t, n - 1].item() == (-1.0 if crosses else 1.0), (t, n)
    assert mask[0].tolist() == [t < length - MAX_N for t in range(length)]


def test_fast_path_statistics_on_markov_lm():
    """Full path (sampling, target alignment, masking) on a bigram LM: mean estimates = exact Brier-n."""
    vocab, blocks, length, passes = 5, 16, 20, 12
    transition = random_transition(vocab, sharpness=2.0, seed=9)
    model = BigramLM(transition)
    g = torch.Generator().manual_seed(10)
    text = torch.cat([torch.randint(0, vocab, (blocks, 1), generator=g),
                      torch.zeros(blocks, length - 1, dtype=torch.long)], dim=1)
    text[:, 1:] = sample_chain(transition, text[:, 0], length - 1, g)
    labels = text.clone()
    labels[:, 10] = -100
    _, valid = true_continuations(text, labels=labels)
    targets, _ = true_continuations(text)  # exact values everywhere; invalid ones are dropped below
    exact = torch.tensor([[[markov_brier(transition, int(text[b, t]), targets[b, t].tolist(), n)
                            for n in range(1, MAX_N + 1)] for t in range(length - MAX_N)] for b in range(blocks)])
    diffs = []
    for seed in range(passes):
        brier, mask = score_causal_lm(model, text, labels=labels, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(mask[:, : length - MAX_N], valid)
        diffs.append((brier[:, : length - MAX_N] - exact)[valid])  # [positions, 4]
    diffs = torch.cat(diffs).double()
    for n in range(MAX_N):
        se = diffs[:, n].std().item() / math.sqrt(diffs.shape[0])
        assert abs(diffs[:, n].mean().item()) <= NUM_SE * se, (n + 1, diffs[:, n].mean().item(), se)

    # evaluate_brier over the same passes: pooled Brier-n = mean of per-seed Brier-n (same positions each seed).
    result = evaluate_brier(model, {"input_ids": text, "labels": labels}, batch_size=5, seeds=range(3),
                            progress=False)
    assert result["num_positions"] == int(valid.sum())
    per_seed = torch.tensor([[r[f"brier_{n}"] for n in range(1, 5)] for r in result["per_seed"]])
    assert [result["pooled"][f"brier_{n}"] for n in range(1, 5)] == pytest.approx(per_seed.mean(0).tolist())


def test_sampler_bad_inputs():
    model = tiny_llama()
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        score_causal_lm(model, ids, labels=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of shape \[B, T\]"):
        score_causal_lm(model, ids[0])
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        score_causal_lm(model, ids, max_n=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_continuations(model, ids, noise=torch.rand(2, 8, 2, MAX_N))
    flash = BigramLM(torch.full((3, 3), 1 / 3))
    flash.config = SimpleNamespace(_attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="flash_attention_2"):
        score_causal_lm(flash, ids)
    with pytest.raises(ValueError, match="seeds must be a non-empty"):
        evaluate_brier(model, ids, seeds=())
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate_brier(model, ids, batch_size=0)
    with pytest.raises(ValueError, match="one-shot iterator"):
        evaluate_brier(model, iter([ids]), seeds=(0, 1))


# ----------------------------------------------------------------------------------------------------------------
# The score_brier protocol and end-to-end evaluation
# ----------------------------------------------------------------------------------------------------------------


class ProtocolModel:
    """A stand-in for a CALM: scores through `score_brier`, has no forward at all."""

    def __init__(self):
        self.calls = []
        self.training = True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def score_brier(self, input_ids, labels=None, max_n=4, generator=None):
        self.calls.append((input_ids.shape, labels is not None, isinstance(generator, torch.Generator)))
        chunks = input_ids.shape[1] // 4  # one entry per chunk of K = 4 tokens
        u = torch.rand(input_ids.shape[0], chunks, max_n, generator=generator)
        return (u < 0.5).float(), torch.ones(input_ids.shape[0], chunks, dtype=torch.bool)


def test_score_brier_protocol_dispatch():
    model = ProtocolModel()
    blocks = {"input_ids": torch.zeros(5, 16, dtype=torch.long), "labels": torch.zeros(5, 16, dtype=torch.long)}
    result = evaluate_brier(model, blocks, batch_size=2, seeds=(3, 4), progress=False)
    assert model.calls == [(torch.Size([b, 16]), True, True) for b in (2, 2, 1)] * 2
    assert model.training  # restored
    assert result["num_positions"] == 5 * 4
    for seed, per_seed in zip((3, 4), result["per_seed"]):
        # Batch i of a seed's pass draws from its own generator, seeded by batch_seed(seed, i).
        draws = torch.cat([(torch.rand(b, 4, MAX_N, generator=torch.Generator().manual_seed(batch_seed(seed, i)))
                            < 0.5).float() for i, b in enumerate((2, 2, 1))])
        assert per_seed["seed"] == seed
        assert [per_seed[f"brier_{n}"] for n in range(1, 5)] == pytest.approx(draws.mean((0, 1)).tolist())
    values = [r["brier_lm"] for r in result["per_seed"]]
    assert result["mean"]["brier_lm"] == pytest.approx(sum(values) / 2)
    assert result["std"]["brier_lm"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    # An iterable of batches (e.g. a DataLoader) with the same batching gives the same passes.
    batches = [{"input_ids": blocks["input_ids"][i : i + 2], "labels": blocks["labels"][i : i + 2]} for i in (0, 2, 4)]
    assert evaluate_brier(model, batches, seeds=(3, 4), progress=False)["per_seed"] == result["per_seed"]
    # score_blocks runs one given generator through all batches in order.
    acc = score_blocks(model, batches, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    draws = torch.cat([(torch.rand(b, 4, MAX_N, generator=g) < 0.5).float() for b in (2, 2, 1)])
    assert acc.compute()["brier_1"] == pytest.approx(draws[..., 0].mean().item())


class SeedsProtocolModel(ProtocolModel):
    """ProtocolModel with `score_brier_seeds`: one call per batch for all generators."""

    def __init__(self, wrong_count: bool = False):
        super().__init__()
        self.seed_calls, self.wrong_count = [], wrong_count

    def score_brier_seeds(self, input_ids, labels=None, max_n=4, generators=()):
        self.seed_calls.append((input_ids.shape[0], len(generators)))
        results = [ProtocolModel.score_brier(self, input_ids, labels, max_n, g) for g in generators]
        return results[:-1] if self.wrong_count else results


def test_score_brier_seeds_protocol_scores_each_batch_once_with_the_same_numbers():
    blocks = {"input_ids": torch.zeros(5, 16, dtype=torch.long), "labels": torch.zeros(5, 16, dtype=torch.long)}
    model = SeedsProtocolModel()
    result = evaluate_brier(model, blocks, batch_size=2, seeds=(3, 4, 5), progress=False)
    assert model.seed_calls == [(2, 3), (2, 3), (1, 3)]  # batch-major: every batch once, for all three seeds
    assert model.training  # restored
    # The same generators batch_seed(seed, i) as one pass per seed: the numbers of the plain protocol model.
    assert result == evaluate_brier(ProtocolModel(), blocks, batch_size=2, seeds=(3, 4, 5), progress=False)
    with pytest.raises(ValueError, match="one \\(brier, mask\\) per generator: got 2 for 3 generators"):
        evaluate_brier(SeedsProtocolModel(wrong_count=True), blocks, batch_size=2, seeds=(3, 4, 5), progress=False)


def test_batch_seed_depends_on_seed_and_batch_index_only():
    seeds = {batch_seed(seed, index) for seed in range(20) for index in range(200)}
    assert len(seeds) == 20 * 200 and all(0 <= s < 2**64 for s in seeds)
    assert batch_seed(3, 7) == batch_seed(3, 7)
    assert batch_seed(-1, 0) != batch_seed(1, 0)
    with pytest.raises(ValueError, match="batch_index must be >= 0, got -1"):
        batch_seed(0, -1)
    with pytest.raises(ValueError, match="seed must be an integer, got 1.5"):
        batch_seed(1.5, 0)


def test_load_text_blocks_and_evaluate_end_to_end(tmp_path):
    words = [f"w{i}" for i in range(VOCAB - 3)]
    tokenizer = word_tokenizer(words)
    g = torch.Generator().manual_seed(11)
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist()) for n in (20, 0, 23)]
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n", encoding="utf-8")

    blocks = load_text_blocks(jsonl, tokenizer, block_size=16, multiple_of=4)
    # 20 + 1 separator (the empty document is skipped) + 23 = 44 tokens -> 2 full blocks + 12 tokens padded to 16.
    assert blocks["input_ids"].shape == blocks["labels"].shape == (3, 16)
    flat = blocks["input_ids"].flatten()
    assert flat[20].item() == tokenizer.eos_token_id and (flat[:20] != tokenizer.eos_token_id).all()
    assert blocks["labels"][2, 12:].tolist() == [-100] * 4 and blocks["attention_mask"][2].sum() == 12
    assert (blocks["input_ids"][2, 12:] == tokenizer.pad_token_id).all()
    assert load_text_blocks(jsonl, tokenizer, 16, drop_last=True)["input_ids"].shape == (2, 16)
    text_file = tmp_path / "eval.txt"
    text_file.write_text(docs[0] + "\n" + docs[2], encoding="utf-8")
    assert load_text_blocks(text_file, tokenizer, 8)["input_ids"].numel() == 48  # one document, no separator

    model = tiny_llama()
    model.train()
    result = evaluate_brier(model, blocks, batch_size=2, seeds=(0, 1), progress=False)
    assert model.training
    # Positions with 4 real future tokens in the block: 12 + 12 + (12 - 4) = 32.
    assert result["num_positions"] == 32 == int(true_continuations(**blocks)[1].sum())
    assert set(result) == {"per_seed", "mean", "std", "pooled", "num_positions", "seeds", "max_n"}
    keys = {"brier_1", "brier_2", "brier_3", "brier_4", "brier_lm"}
    assert set(result["mean"]) == set(result["std"]) == set(result["pooled"]) == keys
    assert all(math.isfinite(v) for v in result["mean"].values())
    assert result["per_seed"][0] != result["per_seed"][1]  # independent seeds
    again = evaluate_brier(model, blocks, batch_size=2, seeds=(0, 1), progress=False)
    assert again["per_seed"] == result["per_seed"]  # reproducible
    # The batching is part of what a seed means (one generator per batch): another batch size, other samples.
    rebatched = evaluate_brier(model, blocks, batch_size=3, seeds=(0, 1), progress=False)
    assert rebatched["num_positions"] == result["num_positions"] and rebatched["per_seed"] != result["per_seed"]
    single = evaluate_brier(model, blocks, batch_size=2, seeds=(0,), progress=False)
    assert single["per_seed"][0] == result["per_seed"][0] and math.isnan(single["std"]["brier_lm"])


def test_load_text_blocks_bad_inputs(tmp_path):
    tokenizer = word_tokenizer(["a", "b"])
    good = tmp_path / "good.txt"
    good.write_text("a b a b a b", encoding="utf-8")
    with pytest.raises(ValueError, match="block_size=10 must be a multiple of multiple_of=4"):
        load_text_blocks(good, tokenizer, block_size=10, multiple_of=4)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        load_text_blocks(good, tokenizer, block_size=0)
    with pytest.raises(ValueError, match="fewer than block_size"):
        load_text_blocks(good, tokenizer, block_size=8, drop_last=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt.*contains no text"):
        load_text_blocks(empty, tokenizer, block_size=8)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "  "}\n\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="blank.jsonl.*contains no text"):
        load_text_blocks(blank, tokenizer, block_size=8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        load_text_blocks(bad, tokenizer, block_size=8)


# ----------------------------------------------------------------------------------------------------------------
# evaluate wrapper
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_metric_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")  # keep ~/.cache clean

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "modeling_calm", "metrics",
                        "brier_lm")
    metric = evaluate.load(path, cache_dir=str(tmp_path / "cache"), keep_in_memory=True)
    g = torch.Generator().manual_seed(12)
    y = torch.randint(0, 3, (40, 5), generator=g)
    x1 = torch.where(torch.rand(40, 5, generator=g) < 0.6, y, torch.randint(0, 3, (40, 5), generator=g))
    x2 = torch.where(torch.rand(40, 5, generator=g) < 0.6, y, torch.randint(0, 3, (40, 5), generator=g))
    for i in (0, 20):
        metric.add_batch(sample1=x1[i : i + 20].tolist(), sample2=x2[i : i + 20].tolist(),
                         references=y[i : i + 20].tolist())
    result = metric.compute()
    expected = brier_scores(brier_indicators(x1, x2, y))
    assert [result[f"brier_{n}"] for n in range(1, 5)] == pytest.approx(expected.tolist())
    assert result["brier_lm"] == pytest.approx(brier_lm(expected)) and result["num_positions"] == 40
    with pytest.raises(ValueError, match="at least max_n=4"):
        metric.compute(sample1=[[1, 2]], sample2=[[1, 2]], references=[[1, 2]])
