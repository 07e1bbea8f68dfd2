"""Bad inputs at the CALM's doors (issue 16 items 2, 9, 10 and "Also"; issue 18 items 3, 7, 9), and a forward with a
KV cache and labels. Each test failed before its fix."""

import pickle

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from modeling_calm import CalmForCausalLM
from modeling_calm.evaluation_calm import score_blocks, score_causal_lm
from modeling_calm.modeling_calm import BACKBONE_READS_CHUNKS, NO_TOKEN_LIKELIHOODS
from modeling_calm.modeling_calm_brier import draw_brier_noise, score_calm_brier
from tests.utils import tiny_calm_config


def make_model(k: int = 4, seed: int = 0) -> CalmForCausalLM:
    torch.manual_seed(seed)
    return CalmForCausalLM(tiny_calm_config(k=k))


def tiny_token_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=128,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------------------------------------------------
# Item 1: labels and input_ids at the door


@pytest.mark.parametrize("bad", [-1, -5, 99, 1000])
def test_labels_outside_the_vocabulary_are_refused(bad):
    model = make_model()
    ids = torch.randint(3, 99, (2, 16))
    labels = ids.clone()
    labels[1, 9] = bad
    with pytest.raises(ValueError, match=rf"`labels` holds \[{bad}\].*\[0, 99\) or -100"):
        model(ids, labels=labels)


def test_all_ignored_labels_give_a_zero_loss_without_crashing():
    model = make_model()
    ids = torch.randint(3, 99, (2, 16))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()  # still attached to the graph
    assert all(p.grad is None or not p.grad.any() for p in model.head.parameters())


def test_minus_100_labels_are_still_ignored():
    model = make_model()
    ids = torch.randint(3, 99, (2, 16))
    labels = ids.clone()
    labels[:, 4:8] = -100
    assert torch.isfinite(model(ids, labels=labels).loss)


def test_float_and_out_of_vocabulary_input_ids_fail_at_the_door():
    model = make_model()
    with pytest.raises(ValueError, match="`input_ids` must hold integer token ids, got dtype torch.float32"):
        model(torch.rand(1, 8) * 10)
    ids = torch.randint(3, 99, (1, 8))
    ids[0, 3] = 99
    with pytest.raises(ValueError, match=r"`input_ids` holds \[99\]: every entry must be a token id in \[0, 99\)"):
        model(ids)
    ids[0, 3] = -7
    with pytest.raises(ValueError, match=r"holds \[-7\]"):
        model(ids)


def test_label_check_is_skipped_while_compiling(monkeypatch):
    model = make_model()
    ids = torch.randint(3, 99, (1, 8))
    labels = ids.clone()
    labels[0, 5] = -1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model(ids, labels=labels)  # no host sync, hence no check (and no error) inside a compiled graph


# --------------------------------------------------------------------------------------------------------------
# Item 2: BrierLM honours attention_mask (both kinds score the same text)


@pytest.mark.parametrize("k", [4, 2])
def test_calm_and_token_lm_score_the_same_text_of_a_padded_batch(k):
    calm, lm = make_model(k).eval(), tiny_token_lm()
    ids = torch.randint(3, 99, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, half a block
    mask[2, :8] = 0  # left padding in whole chunks
    g = torch.Generator().manual_seed(0)
    _, calm_valid = calm.score_brier(ids, attention_mask=mask, generator=g)
    _, lm_valid = score_causal_lm(lm, ids, mask, generator=torch.Generator().manual_seed(0))
    # Boundary i of the CALM is the token LM's position t = (i+1)K - 1 (same context, same max_n targets).
    boundaries = torch.arange(16 // k) * k + k - 1
    torch.testing.assert_close(calm_valid, lm_valid[:, boundaries])
    # The real half of row 1 (8 tokens) has 8 - 4 = 4 token positions and one CALM boundary with 4 targets.
    assert int(lm_valid[1].sum()) == 4 and int(calm_valid[1].sum()) == (8 - 4) // k
    assert int(calm_valid[2].sum()) == int(calm_valid[1].sum())


@pytest.mark.parametrize("k", [4, 2])
def test_padding_never_changes_a_calms_scores_of_the_real_text(k):
    calm = make_model(k).eval()
    text = torch.randint(3, 99, (1, 8))
    alone_noise = draw_brier_noise(calm, 1, 8 // k, generator=torch.Generator().manual_seed(1))
    alone, alone_valid = score_calm_brier(calm, text, noise=alone_noise)
    pad = torch.zeros(1, 8, dtype=torch.long)
    for ids, mask, offset in (
        (torch.cat([text, pad], 1), torch.cat([torch.ones(1, 8), torch.zeros(1, 8)], 1).long(), 0),  # right
        (torch.cat([pad, text], 1), torch.cat([torch.zeros(1, 8), torch.ones(1, 8)], 1).long(), 8 // k),  # left
    ):
        noise = draw_brier_noise(calm, 1, 16 // k, generator=torch.Generator().manual_seed(2))
        noise[:, offset : offset + 8 // k] = alone_noise
        for reference in (False, True):
            brier, valid = score_calm_brier(calm, ids, noise=noise, attention_mask=mask, reference=reference)
            assert int(valid.sum()) == int(alone_valid.sum())
            torch.testing.assert_close(valid[:, offset : offset + 8 // k], alone_valid)
            torch.testing.assert_close(brier[:, offset : offset + 8 // k], alone)


def test_a_partly_padded_chunk_is_never_part_of_a_scored_context():
    calm = make_model(4).eval()
    ids = torch.randint(3, 99, (1, 16))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding inside chunk 0: the CALM would read it as text
    _, valid = calm.score_brier(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    assert not valid.any()
    mask[0, :2] = 1
    mask[0, 14:] = 0  # right padding inside the last chunk: only its targets are lost
    _, valid = calm.score_brier(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    assert valid[0].tolist() == [True, True, False, False]


def test_score_blocks_passes_the_mask_to_a_calm():
    calm = make_model(4).eval()
    ids = torch.randint(3, 99, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    blocks = {"input_ids": ids, "attention_mask": mask}  # no labels: the mask alone marks the padding
    acc = score_blocks(calm, blocks, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert acc.num_positions == 3 + 1


# --------------------------------------------------------------------------------------------------------------
# Item 3: save_pretrained refuses non-finite weights


def test_save_pretrained_refuses_nonfinite_weights(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.chunk_proj.in_proj.weight[0, 0] = float("nan")
        model.head.parameters().__next__().fill_(float("inf"))
    with pytest.raises(ValueError, match=r"non-finite weights: \[.*'chunk_proj.in_proj.weight'.*\] hold NaN"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with torch.no_grad():
        model.chunk_proj.in_proj.weight.zero_()
        next(model.head.parameters()).zero_()
    model.save_pretrained(tmp_path / "ok")
    assert (tmp_path / "ok" / "config.json").exists()


# --------------------------------------------------------------------------------------------------------------
# Item 4: lm-eval's loglikelihood requests (model(inps).logits)


def test_loglikelihood_requests_get_the_no_token_likelihoods_error():
    model = make_model().eval()
    with pytest.raises(ValueError, match=rf"^{NO_TOKEN_LIKELIHOODS} \(forward\(\) reads whole chunks of K=4 tokens"):
        model(torch.randint(3, 99, (1, 7)))
    out = model(torch.randint(3, 99, (1, 8)))
    with pytest.raises(ValueError, match=f"^{NO_TOKEN_LIKELIHOODS}$"):
        out.logits
    # ModelOutput's machinery never reads `logits`.
    assert "logits" not in out.keys()
    assert len(out.to_tuple()) == 1
    restored = pickle.loads(pickle.dumps(out))
    torch.testing.assert_close(restored.last_hidden_state, out.last_hidden_state)
    labelled = model(torch.randint(3, 99, (2, 8)), labels=torch.randint(3, 99, (2, 8)))
    assert [k for k in labelled.keys()] == ["loss", "fidelity", "diversity", "brier", "last_hidden_state"]


def test_trainer_prediction_step_does_not_touch_logits(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_model()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    ids = torch.randint(3, 99, (2, 16))
    loss, logits, _ = trainer.prediction_step(model, {"input_ids": ids, "labels": ids}, prediction_loss_only=False)
    assert torch.isfinite(loss) and logits is not None


# --------------------------------------------------------------------------------------------------------------
# Item 5: the backbone called on token ids (TRL's SFTTrainer)


def test_backbone_called_on_token_ids_says_why():
    model = make_model()
    ids = torch.randint(3, 99, (1, 8))
    with pytest.raises(ValueError, match="^" + BACKBONE_READS_CHUNKS.replace("(", r"\(").replace(")", r"\)")):
        model.model(input_ids=ids)
    with pytest.raises(ValueError, match="reads chunk embeddings"):
        model.base_model(ids)
    model(ids)  # the CALM's own forward passes inputs_embeds only
    model.model(inputs_embeds=model.embed_chunks(ids))


def test_backbone_hook_survives_gradient_checkpointing_and_compile():
    model = make_model()
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(3, 99, (2, 16))
    model(ids, labels=ids).loss.backward()
    compiled = torch.compile(model, backend="eager")
    assert torch.isfinite(compiled(ids, labels=ids).loss)


# --------------------------------------------------------------------------------------------------------------
# Item 6: resize_token_embeddings


@pytest.mark.parametrize("size", [120, 50, None])
def test_resize_token_embeddings_is_refused_and_changes_nothing(size):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    with pytest.raises(ValueError, match="frozen autoencoder defines the vocabulary.*nothing was changed"):
        model.resize_token_embeddings(size)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key
    assert model.config.to_dict() == config_before


# --------------------------------------------------------------------------------------------------------------
# Item 7: a forward with a KV cache and labels


def test_forward_with_cache_and_labels_uses_the_current_chunks_mask():
    model = make_model().eval()
    ids = torch.randint(3, 99, (2, 24))
    mask = torch.ones_like(ids)
    cache = DynamicCache(config=model.config.backbone_config)
    model(ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache, use_cache=True)
    labels = ids[:, 8:].clone()
    # 6 valid targets either way (chunks 3..5 of both rows); explicit noise makes the two losses comparable.
    g = torch.Generator().manual_seed(0)
    noise = {"noise": torch.rand(4, 6, 8, generator=g) - 0.5, "target_noise": torch.randn(16, 6, 8, generator=g)}
    out = model(ids[:, 8:], attention_mask=mask, labels=labels, past_key_values=cache, use_cache=True, **noise)
    assert torch.isfinite(out.loss)
    # The same loss as a full forward restricted to the same targets (chunks 3..5 predicted from h_2..h_4).
    full_labels = ids.clone()
    full_labels[:, :12] = -100
    full = model(ids, attention_mask=mask, labels=full_labels, **noise)
    torch.testing.assert_close(out.loss, full.loss, atol=1e-4, rtol=1e-4)
