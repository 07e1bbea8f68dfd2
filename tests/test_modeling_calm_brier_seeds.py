"""The fast CALM BrierLM path gives the numbers of the path before it (arXiv 2510.27688, "Likelihood-Free LM
Evaluation"): `score_brier_seeds` (one backbone forward for several generators), lazy decoding (a sampled token is
projected onto the vocabulary only while it can change an estimate), `decode_tokens(num_tokens=)` (no projection
of tokens past max_n), and `evaluate_brier` scoring each batch once for all seeds.

"The path before" is rebuilt here from public pieces exactly as `score_calm_brier` used to compute it: every one
of the R*K tokens of both samples decoded (`sample_brier_continuations`, itself checked against the loop-over-
positions reference in test_modeling_calm_brier.py), then `brier_indicators`. Comparisons are exact (torch.equal).
"""

import pytest
import torch
from torch import nn

from modeling_calm import CalmForCausalLM
from modeling_calm.evaluation_calm import batch_seed, evaluate_brier
from modeling_calm.modeling_calm_brier import (
    brier_chunk_masks,
    brier_indicators,
    brier_num_positions,
    brier_num_steps,
    brier_targets,
    draw_brier_noise,
    sample_brier_continuations,
    score_calm_brier,
    score_calm_brier_seeds,
)
from tests.utils import ToyHead, tiny_calm_config


MAX_N = 4


def tiny_calm(k: int, head_type: str = "energy", std: float = 1.0) -> CalmForCausalLM:
    """A tiny CALM whose samples depend on the noise (the head's zero-initialised last layer re-drawn)."""
    torch.manual_seed(0)
    model = CalmForCausalLM(tiny_calm_config(head_type=head_type, k=k)).eval()
    nn.init.normal_(model.head.output.fc2.weight, std=std)
    return model


def previous_score(model, input_ids, labels=None, generator=None, attention_mask=None, max_n=MAX_N, noise=None):
    """`score_calm_brier` before score_brier_seeds and lazy decoding: one pass, all R*K tokens decoded."""
    k = model.config.patch_size
    samples = sample_brier_continuations(model, input_ids, max_n=max_n, noise=noise, generator=generator,
                                         attention_mask=attention_mask)
    if attention_mask is not None:
        labels = (input_ids if labels is None else labels).masked_fill(attention_mask == 0, -100)
    targets, valid = brier_targets(input_ids, labels, k, max_n)
    chunk_masks = brier_chunk_masks(attention_mask, k)
    if chunk_masks is not None:
        valid &= chunk_masks[1]
    brier = brier_indicators(samples[:, :, 0, :max_n], samples[:, :, 1, :max_n], targets, max_n=max_n, mask=valid)
    return brier, valid


def count_rows(module: nn.Module) -> list[int]:
    """Rows seen by `module` (the vocabulary projection), accumulated in a one-element list."""
    rows = [0]
    module.register_forward_hook(lambda mod, inputs, output: rows.__setitem__(0, rows[0] + inputs[0].shape[0]))
    return rows


def padded_batch(k: int, length: int, seed: int):
    """Three blocks: full, right-padded by whole chunks plus a part chunk, left-padded by whole chunks."""
    ids = torch.randint(3, 99, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, length - 2 * k - 1 :] = 0
    mask[2, :k] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, length // 2] = -100
    return ids, labels, mask


def colliding_noise(model, input_ids, seed: int) -> torch.Tensor:
    """Head noise [B, L, 2, R, E] whose second sample reuses the first one's at a third of the boundaries (the two
    samples then agree: the collision chain stays alive) and, while K < max_n, at the first step only at another
    third (they agree on the first chunk only)."""
    g = torch.Generator().manual_seed(seed)
    batch, length = input_ids.shape
    noise = draw_brier_noise(model, batch, length // model.config.patch_size, MAX_N, g)
    kind = torch.randint(0, 3, noise.shape[:2], generator=g)  # [B, L]
    noise[:, :, 1][kind == 0] = noise[:, :, 0][kind == 0]
    noise[:, :, 1, 0][kind == 1] = noise[:, :, 0, 0][kind == 1]
    return noise


def hitting_labels(model, input_ids, labels, mask, noise, seed: int) -> torch.Tensor:
    """`labels` whose chunk i+1 is, at half the boundaries i, the first chunk that sample 0 draws there with
    `noise`: the hit chain of that sample stays alive for min(K, max_n) tokens."""
    k = model.config.patch_size
    samples = sample_brier_continuations(model, input_ids, noise=noise, attention_mask=mask)  # [B, L, 2, R*K]
    labels = labels.clone()
    chosen = torch.rand(samples.shape[:2], generator=torch.Generator().manual_seed(seed)) < 0.5
    for b, i in chosen.nonzero().tolist():
        window = slice((i + 1) * k, (i + 2) * k)
        if (i + 2) * k <= input_ids.shape[1] and bool(mask[b, window].all()) and (samples[b, i, 0, :k] >= 0).all():
            labels[b, window] = samples[b, i, 0, :k]
    return labels


@pytest.mark.parametrize(
    "k,head_type,length",
    [(1, "energy", 12), (2, "energy", 12), (2, "flow", 12), (3, "energy", 15), (4, "energy", 16),
     (4, "flow", 16), (5, "energy", 15), (8, "energy", 24)],
)
def test_seeds_and_lazy_decoding_give_the_numbers_of_the_previous_path(k, head_type, length):
    model = tiny_calm(k, head_type)
    ids, labels, mask = padded_batch(k, length, seed=k)
    noises = [colliding_noise(model, ids, seed) for seed in range(3)]
    labels = hitting_labels(model, ids, labels, mask, noises[0], seed=k)
    positions, steps = brier_num_positions(length, k), brier_num_steps(k)
    rows = count_rows(model.autoencoder.lm_head)

    expected = [previous_score(model, ids, labels, attention_mask=mask, noise=noise) for noise in noises]
    assert rows[0] == len(noises) * 3 * positions * 2 * steps * k  # every token of every sample
    rows[0] = 0
    got = score_calm_brier_seeds(model, ids, labels, noises=noises, attention_mask=mask)
    lazy_rows = rows[0]
    assert len(got) == len(noises)
    for (brier, valid), (want, want_valid) in zip(got, expected):
        assert torch.equal(brier, want) and torch.equal(valid, want_valid)
    # Not a vacuous comparison: hits (+1) and collisions (-1) at various n, and seeds that differ.
    values = torch.cat([brier[valid] for brier, valid in expected])
    assert (values[:, 0] > 0).any() and (values[:, 0] < 0).any() and (values[:, -1] != 0).any()
    assert not torch.equal(expected[0][0], expected[1][0])

    # Generators: score_brier_seeds and score_brier (lazy or full decoding) give the previous path's numbers.
    seeds = (0, 1)
    before = [previous_score(model, ids, labels, torch.Generator().manual_seed(s), mask) for s in seeds]
    after = model.score_brier_seeds(ids, labels=labels, attention_mask=mask,
                                    generators=[torch.Generator().manual_seed(s) for s in seeds])
    for (brier, valid), (want, want_valid) in zip(after, before):
        assert torch.equal(brier, want) and torch.equal(valid, want_valid)
    for lazy in (True, False):
        brier, valid = model.score_brier(ids, labels=labels, generator=torch.Generator().manual_seed(1),
                                         attention_mask=mask, lazy_decoding=lazy)
        assert torch.equal(brier, before[1][0]) and torch.equal(valid, before[1][1])
    rows[0] = 0
    score_calm_brier(model, ids, labels, attention_mask=mask, noise=noises[0], lazy_decoding=False)
    full_rows = rows[0]
    assert full_rows == 3 * positions * 2 * min(MAX_N, steps * k)  # no token past max_n is projected
    # Lazy decoding skipped tokens, but decoded past the first token where a chain was alive.
    scored = int(expected[0][1].sum())
    assert 2 * scored * len(noises) < lazy_rows < len(noises) * full_rows


def test_backbone_runs_once_per_batch_for_all_seeds():
    for k in (4, 2):  # K = 2 continues each sample on a copy of the prefix cache
        model = tiny_calm(k)
        calls = [0]
        model.model.register_forward_hook(lambda mod, inputs, output: calls.__setitem__(0, calls[0] + 1))
        ids = torch.randint(3, 99, (2, 16), generator=torch.Generator().manual_seed(4))
        results = model.score_brier_seeds(ids, generators=[torch.Generator().manual_seed(s) for s in range(3)])
        assert calls[0] == 1 + 3 * (brier_num_steps(k) - 1)  # one prefix forward, then each pass's continuations
        for s, (brier, valid) in enumerate(results):
            want = previous_score(model, ids, generator=torch.Generator().manual_seed(s))
            assert torch.equal(brier, want[0]) and torch.equal(valid, want[1])


def test_explicit_noise_and_bad_arguments():
    model = tiny_calm(2)
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(5))
    noise = draw_brier_noise(model, 2, 6, MAX_N, torch.Generator().manual_seed(7))
    (brier, valid), = score_calm_brier_seeds(model, ids, noises=[noise])
    want = previous_score(model, ids, generator=torch.Generator().manual_seed(7))
    assert torch.equal(brier, want[0]) and torch.equal(valid, want[1])
    with pytest.raises(ValueError, match="generators must hold at least one"):
        model.score_brier_seeds(ids, generators=[])
    with pytest.raises(ValueError, match="noise must have shape"):
        score_calm_brier_seeds(model, ids, noises=[noise[:, :3]])


def test_decode_tokens_keeps_the_first_tokens_of_each_chunk():
    model = tiny_calm(4)
    latents = torch.randn(3, 2, model.config.latent_size)  # [..., L=2, Z]
    full = model.autoencoder.decode_tokens(latents)  # [3, 8]
    for keep in (1, 3, 4):
        part = model.autoencoder.decode_tokens(latents, num_tokens=keep)
        assert torch.equal(part, full.view(3, 2, 4)[..., :keep].reshape(3, 2 * keep))
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"num_tokens must be an integer in \[1, K=4\]"):
            model.autoencoder.decode_tokens(latents, num_tokens=bad)


# ----------------------------------------------------------------------------------------------------------------
# Lazy decoding where samples hit and collide often: a context-free toy CALM
# ----------------------------------------------------------------------------------------------------------------


class ToyAutoencoder(nn.Module):
    """The one-hot latent of category c decodes to the K tokens chunks[c]; it has the interface lazy decoding
    uses (`decoder_states`, `argmax_tokens`): the "states" are the one-hot logits themselves."""

    def __init__(self, chunks, vocab: int, latent_size: int):
        super().__init__()
        chunks = torch.tensor(chunks)
        table = torch.zeros(latent_size, chunks.shape[1], vocab)
        for c, chunk in enumerate(chunks.tolist()):
            table[c, torch.arange(len(chunk)), chunk] = 1.0
        self.register_buffer("table", table)  # [Z, K, V]

    def decoder_states(self, latents):  # [..., L, Z] -> [N, K, V]
        return torch.einsum("nz,zkv->nkv", latents.reshape(-1, latents.shape[-1]).float(), self.table)

    def argmax_tokens(self, states, max_logits_per_block=None):  # [M, V] -> [M]
        return states.argmax(-1)

    def decode_tokens(self, latents, max_logits_per_block=None, num_tokens=None):
        states = self.decoder_states(latents)
        if num_tokens is not None:
            states = states[:, :num_tokens]
        return self.argmax_tokens(states).view(*latents.shape[:-2], -1)


@pytest.mark.parametrize(
    "k,chunks,probs",
    [(4, [[5, 6, 7, 8], [5, 6, 9, 9], [5, 3, 3, 3], [4, 6, 7, 8]], [0.4, 0.3, 0.2, 0.1]),
     (2, [[5, 6], [5, 7], [8, 9]], [0.5, 0.3, 0.2])],
)
def test_lazy_decoding_when_samples_hit_and_collide(k, chunks, probs):
    model = tiny_calm(k)
    config = model.config
    model.head = ToyHead(probs, config.noise_size, config.latent_size)
    model.autoencoder = ToyAutoencoder(chunks, config.vocab_size, config.latent_size)
    calls = []
    argmax = model.autoencoder.argmax_tokens
    model.autoencoder.argmax_tokens = lambda states, *a: (calls.append(states.shape[0]), argmax(states))[1]
    length = 8 * k
    choices = torch.tensor(chunks)
    text = choices[torch.randint(0, len(chunks), (6, length // k), generator=torch.Generator().manual_seed(3))]
    text = text.reshape(6, length)
    for seed in range(4):
        want = previous_score(model, text, generator=torch.Generator().manual_seed(seed))
        calls.clear()
        got = model.score_brier(text, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        scored = int(want[1].sum())
        # Token 0 of both samples at every scored boundary, then fewer: chains die, but not all at once.
        assert calls[0] == 2 * scored and sum(calls) < 2 * scored * MAX_N and sum(calls) > 2 * scored
        assert (want[0][want[1]] == 1).any() and (want[0][want[1]] == -1).any()  # hits and collisions


# ----------------------------------------------------------------------------------------------------------------
# evaluate_brier: every batch once for all seeds
# ----------------------------------------------------------------------------------------------------------------


class PerSeed:
    """The CALM without score_brier_seeds, decoding in full: evaluate_brier runs one pass per seed, as before."""

    def __init__(self, model):
        self.model, self.training = model, False

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def score_brier(self, input_ids, labels=None, max_n=MAX_N, generator=None, attention_mask=None):
        return previous_score(self.model, input_ids, labels, generator, attention_mask, max_n)


@pytest.mark.parametrize("k", [4, 2])
def test_evaluate_brier_scores_each_batch_once_with_the_same_numbers(k):
    model = tiny_calm(k, std=0.3)
    ids = torch.randint(3, 99, (5, 16), generator=torch.Generator().manual_seed(k))
    mask = torch.ones_like(ids)
    mask[4, 10:] = 0
    blocks = {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}
    calls = []
    model.model.register_forward_hook(lambda mod, inputs, output: calls.append(1))
    seeds = (0, 1, 2)
    result = evaluate_brier(model, blocks, batch_size=2, seeds=seeds, progress=False)
    assert len(calls) == 3 * (1 + len(seeds) * (brier_num_steps(k) - 1))  # 3 batches, one prefix forward each
    before = evaluate_brier(PerSeed(model), blocks, batch_size=2, seeds=seeds, progress=False)
    assert result == before  # exact: per seed, pooled, mean and std
    assert result["per_seed"][0] != result["per_seed"][1]
    # Batch i of seed s is still scored with the generator batch_seed(s, i).
    batch = {key: value[2:4] for key, value in blocks.items()}
    one = model.score_brier(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                            generator=torch.Generator().manual_seed(batch_seed(1, 1)))
    got = model.score_brier_seeds(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                                  generators=[torch.Generator().manual_seed(batch_seed(s, 1)) for s in seeds])[1]
    assert torch.equal(one[0], got[0])
