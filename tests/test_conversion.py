"""Conversion of the authors' checkpoints, proven by numerical parity with their code.

The fixture (tests/fixtures/reference_tiny, see its README) is a tiny checkpoint in the authors' on-disk layout with
golden outputs of their implementation. Each parity test converts it into tmp_path, reloads the folder through the
public API and reproduces a golden within the fixture's tolerances (atol = rtol = 1e-5 for floats, exact for token
ids and Brier values). Every size, call shape and config value is read from the fixture, so another fixture of the
same layout (another K, grouped-query attention, other eps and sizes) runs unchanged:

    CALM_PARITY_FIXTURE=/path/to/fixture python -m pytest tests/test_conversion.py

The robustness tests write synthetic checkpoints in the authors' layout by inverting the key maps (K=2, grouped-query
attention, odd layer counts, sharded and safetensors files) and check the strict errors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from conversion import calm_conversion as cc
from conversion import converted_folder as cf
from modeling_calm import CalmAutoencoder, CalmForCausalLM, energy_score
from modeling_calm.modeling_calm_brier import brier_indicators, brier_scores
from tests.utils import run_without_package, tiny_calm_config


FIXTURE = Path(os.environ.get("CALM_PARITY_FIXTURE", Path(__file__).parent / "fixtures" / "reference_tiny"))
ATOL = RTOL = 1e-5  # the fixture's tolerance for floats (sdpa vs eager attention moves hidden states by ~1e-6)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach().float(), expected.float(), atol=ATOL, rtol=RTOL)


def split_stream(stream: torch.Tensor, calls: list[list[int]]) -> list[torch.Tensor]:
    """A flat random stream -> one tensor per call, C-order, in call order (the fixture's convention)."""
    pieces, start = [], 0
    for shape in calls:
        size = int(torch.Size(shape).numel())
        pieces.append(stream[start:start + size].view(shape))
        start += size
    assert start == stream.numel(), "the call shapes must use the whole stream"
    return pieces


# ------------------------------------------------------------------------------------------------------------------
# Parity with the authors' code on the fixture
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "golden.safetensors"))


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURE / "golden_index.json").read_text())["metadata"]


@pytest.fixture(scope="module")
def original_configs() -> tuple[dict, dict]:
    return tuple(json.loads((FIXTURE / name / "config.json").read_text()) for name in ("calm", "ae"))


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory) -> Path:
    model, report = cc.convert_calm(FIXTURE / "calm", FIXTURE / "ae")
    folder = tmp_path_factory.mktemp("converted") / "calm"
    out = cf.save_converted(model, folder, report, source_repo="cccczshao/CALM-M", repo_id="org/calm-m")
    report.check = cf.verify_saved(model, out)
    return out


@pytest.fixture(scope="module")
def model(converted_dir) -> CalmForCausalLM:
    return AutoModelForCausalLM.from_pretrained(str(converted_dir), trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def standalone_autoencoder(tmp_path_factory) -> CalmAutoencoder:
    ae, report = cc.convert_autoencoder(FIXTURE / "ae")
    out = cf.save_converted(ae, tmp_path_factory.mktemp("converted") / "ae", report)
    return AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()


@pytest.fixture(params=["standalone", "inside_calm"])
def autoencoder(request, model, standalone_autoencoder) -> CalmAutoencoder:
    return standalone_autoencoder if request.param == "standalone" else model.autoencoder


def test_converted_config_matches_the_authors_configs(model, original_configs):
    calm, ae = original_configs
    config = model.config
    for name in ("patch_size", "latent_size", "noise_size", "num_mlp_layers", "num_samples", "beta"):
        assert getattr(config, name) == calm[name], name
    backbone = config.backbone_config
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps", "vocab_size", "max_position_embeddings"):
        assert getattr(backbone, name) == calm[name], name
    assert backbone.rope_parameters["rope_theta"] == calm["rope_theta"]
    assert config.head_type == "energy" and config.head_norm_eps == cc.REFERENCE_HEAD_NORM_EPS
    for name in ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size", "rms_norm_eps",
                 "ae_dropout", "kl_clamp", "kl_weight"):
        assert getattr(config.autoencoder_config, name) == ae[name], name
    for part in ("encoder", "decoder"):  # an odd count loses its never-run last layer
        assert getattr(config.autoencoder_config, f"num_{part}_layers") == ae[f"num_{part}_layers"] // 2 * 2
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        calm["pad_token_id"], calm["bos_token_id"], calm["eos_token_id"])
    assert model.autoencoder.lm_head.weight is model.autoencoder.encoder.embed_tokens.weight


@torch.no_grad()
def test_autoencoder_encode(autoencoder, golden):
    mean, log_std = autoencoder.encode(golden["ae_input_ids"])
    close(mean, golden["ae_enc_mean"])
    close(log_std, golden["ae_enc_log_std"])


@torch.no_grad()
def test_autoencoder_decode(autoencoder, golden):
    close(autoencoder.decode(golden["ae_dec_z"]), golden["ae_dec_logits"])


@torch.no_grad()
def test_autoencoder_eval_forward(autoencoder, golden, meta):
    # The reference reshapes ids to [-1, K] inside forward, so its eps is [B*L, 1, Z]: same values, same order.
    (eps,) = split_stream(golden["ae_fwd_eps"].reshape(-1), meta["ae_fwd_randn_like_calls"])
    ids = golden["ae_input_ids"]
    out = autoencoder(ids, labels=ids, noise=eps)
    close(out.logits.reshape(-1, out.logits.shape[-1]), golden["ae_fwd_logits"])
    close(out.loss, golden["ae_fwd_loss"])  # eval: plain token cross-entropy, no x K, no KL


@torch.no_grad()
def test_input_compression_and_backbone(model, golden):
    close(model.embed_chunks(golden["calm_input_ids"]), golden["calm_inputs_embeds"])
    close(model(golden["calm_input_ids"]).last_hidden_state, golden["calm_hidden"])
    close(model(inputs_embeds=golden["calm_inputs_embeds"]).last_hidden_state, golden["calm_hidden"])


@pytest.mark.parametrize("prefix", ["head", "head3"])  # [N, D] and [3, 4, D] inputs
@torch.no_grad()
def test_head_samples_for_given_noise(model, golden, prefix):
    noise = golden[f"{prefix}_rand"] - 0.5  # the energy head's noise convention: U[-0.5, 0.5)
    assert torch.equal(noise, golden[f"{prefix}_noise"])
    close(model.head.sample(golden[f"{prefix}_h"], noise=noise), golden[f"{prefix}_out"])


def _beta_of(name: str, config_beta: float) -> float:
    match = re.fullmatch(r"es_score_beta(\d+)p(\d+)", name)
    return config_beta if match is None else float(f"{match[1]}.{match[2]}")


def test_energy_score(model, golden):
    names = [n for n in golden if n.startswith("es_score")]
    assert "es_score" in names and len(names) >= 2
    for name in names:  # es_score uses the model's beta; es_score_beta1p5 beta = 1.5, ...
        beta = _beta_of(name, model.config.beta)
        score, _, _ = energy_score(golden["es_x"], golden["es_mean"], golden["es_log_std"], beta=beta,
                                   target_noise=golden["es_eps_y"])
        close(score, golden[name])  # the score (higher is better); the loss is -score.mean()


def test_brier_formula(golden):
    predictions_1, predictions_2 = golden["brier_predictions_1"], golden["brier_predictions_2"]
    max_n = min(golden["brier_scores"].numel(), predictions_1.shape[-1])
    scores = brier_scores(brier_indicators(predictions_1, predictions_2, golden["brier_targets"], max_n=max_n))
    assert torch.equal(scores.float(), golden["brier_scores"][:max_n])


def _valid_positions(labels: torch.Tensor, k: int) -> torch.Tensor:
    """[B, L-1] targets the forward trains on: target chunks without -100 (the documented masking rule)."""
    return (labels.reshape(labels.shape[0], -1, k)[:, 1:] != -100).all(-1)


def _check_forward_internals(model, golden, prefix: str, hidden, noise, target_noise, check_energy=True):
    """The forward's debug goldens, through the public API: head samples, their decoded tokens, energy scores."""
    k = model.config.patch_size
    labels = golden[f"{prefix}_labels"]
    valid = _valid_positions(labels, k)
    h = hidden[:, :-1][valid]  # [N, D], (batch, step) order
    samples = model.head.sample(h.unsqueeze(0).expand(noise.shape[0], -1, -1), noise=noise)  # [S, N, Z]
    close(samples, golden[f"{prefix}_latent_predictions"])
    targets = labels.reshape(labels.shape[0], -1, k)[:, 1:][valid]  # [N, K]
    mean, log_std = model.autoencoder.encode(targets)
    score, _, _ = energy_score(samples, mean[:, 0], log_std[:, 0], beta=model.config.beta, target_noise=target_noise)
    if check_energy:
        close(score, golden[f"{prefix}_energy_score"])
    return samples, score, valid


@torch.no_grad()
def test_eval_forward_loss_and_brier(model, golden, meta):
    noise = split_stream(golden["fwd_rand_stream"], meta["fwd_rand_calls"])[0] - 0.5  # [S, N, E]
    target_noise = split_stream(golden["fwd_randn_stream"], meta["fwd_randn_calls"])[0]  # [M, N, Z]
    out = model(golden["fwd_input_ids"], labels=golden["fwd_labels"], noise=noise, target_noise=target_noise)
    close(out.loss, golden["fwd_loss"])
    # Brier-1..min(K, 4) come from the first two samples' decoded chunks. (For K < 4 the reference continues the
    # two samples autoregressively with further rand calls for Brier-(K+1)..4; the forward reports min(K, 4).)
    n = out.brier.numel()
    assert n == min(model.config.patch_size, 4)
    assert torch.equal(out.brier.float(), golden["fwd_brier"][:n])

    samples, _, valid = _check_forward_internals(model, golden, "fwd", out.last_hidden_state, noise, target_noise)
    predictions = model.autoencoder.decode(samples[:2].unsqueeze(-2)).argmax(-1)  # [2, N, K]
    for i in range(2):
        expected = golden[f"fwd_predictions_{i + 1}"]  # [B, L-1, K]
        assert torch.equal(predictions[i], expected[valid])


def test_train_mode_loss_with_a_masked_chunk(model, golden, meta):
    calls, n_calls = meta["fwdtrain_rand_calls"], meta["fwdtrain_randn_calls"]
    noise = split_stream(golden["fwdtrain_rand_stream"], calls)[0] - 0.5
    target_noise = split_stream(golden["fwdtrain_randn_stream"], n_calls)[0]
    assert (golden["fwdtrain_labels"] == -100).any(), "the train golden masks a chunk"
    model.train()
    try:
        assert not model.autoencoder.training  # our fix: the frozen autoencoder stays in eval mode
        out = model(golden["fwdtrain_input_ids"], labels=golden["fwdtrain_labels"], noise=noise,
                    target_noise=target_noise)
        assert out.brier is None  # train mode reports only the loss, like the reference
        close(out.loss, golden["fwdtrain_loss"])
        with torch.no_grad():
            _check_forward_internals(model, golden, "fwdtrain", out.last_hidden_state, noise, target_noise)
            # fwdtrainbf16_*: the reference's fault of leaving its frozen autoencoder in train mode (HF Trainer's
            # model.train()), where it casts embeddings to bfloat16. The head samples do not involve the autoencoder
            # and match; the target posteriors, energy scores and loss must NOT match, because our autoencoder
            # stays in eval mode.
            bf16_noise = split_stream(golden["fwdtrainbf16_rand_stream"], meta["fwdtrainbf16_rand_calls"])[0] - 0.5
            bf16_target_noise = split_stream(golden["fwdtrainbf16_randn_stream"], meta["fwdtrainbf16_randn_calls"])[0]
            out_bf16 = model(golden["fwdtrainbf16_input_ids"], labels=golden["fwdtrainbf16_labels"], noise=bf16_noise,
                             target_noise=bf16_target_noise)
            _, score, _ = _check_forward_internals(model, golden, "fwdtrainbf16", out_bf16.last_hidden_state,
                                                   bf16_noise, bf16_target_noise, check_energy=False)
        assert (score - golden["fwdtrainbf16_energy_score"]).abs().max() > 100 * ATOL
        assert abs(out_bf16.loss.item() - golden["fwdtrainbf16_loss"].item()) > 100 * ATOL
    finally:
        model.eval()


def _reference_cleanup(sequence: torch.Tensor, pad_id: int, max_length: int) -> torch.Tensor:
    """The reference's post-processing of `generate` (a documented fault, reproduced only to tie `gen_output` to
    the raw steps): drop every token equal to the pad id, left-justify each row, right-pad with pad ids."""
    rows = [row[row != pad_id][:max_length] for row in sequence]
    out = torch.full((len(rows), max_length), pad_id, dtype=sequence.dtype)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


@torch.no_grad()
def test_decoding_steps_at_temperature_one(model, golden, meta):
    """Decoding through the public API with explicit per-step noise reproduces every raw step of the reference.

    The reference right-pads a prompt whose length is not a multiple of K with pad ids (a documented fault: the
    model never saw those ids; this package's generate left-pads with an attention mask instead). The golden steps
    were computed from that right-padded prompt, so this test feeds the same padded prompt to show the decoding
    step itself is identical: backbone with a KV cache -> head sample -> argmax decode -> feed the chunk back.
    """
    k, pad_id = model.config.patch_size, model.config.pad_token_id
    prompt = golden["gen_prompt"]
    padded = torch.cat([prompt, torch.full((prompt.shape[0], -prompt.shape[1] % k), pad_id, dtype=prompt.dtype)], 1)
    step_noise = [n - 0.5 for n in split_stream(golden["gen_rand_stream"], meta["gen_rand_calls"])]  # [B, E] each
    expected = golden["gen_step_tokens"]  # [steps, B, K] raw chunks
    assert len(step_noise) == expected.shape[0]

    out = model(padded, use_cache=True)
    chunks = []
    for step, noise in enumerate(step_noise):
        latent = model.head.sample(out.last_hidden_state[:, -1], noise=noise)  # [B, Z]
        chunk = model.autoencoder.decode(latent[:, None]).argmax(-1)  # [B, K]
        assert torch.equal(chunk, expected[step]), f"step {step}"
        chunks.append(chunk)
        out = model(chunk, past_key_values=out.past_key_values, use_cache=True)

    # gen_output = the reference's clean-up of (padded prompt + steps). This package keeps every generated token,
    # pad-id lookalikes included; the clean-up is applied here only to show the golden follows from our steps.
    raw = torch.cat([padded, *chunks], dim=1)
    assert raw.shape[1] == padded.shape[1] + k * len(chunks)
    assert torch.equal(_reference_cleanup(raw, pad_id, meta["gen_max_length"]), golden["gen_output"])


def test_every_golden_is_checked(golden):
    """Guards this file against a fixture that adds goldens no test reads."""
    source = Path(__file__).read_text()
    literal = set(re.findall(r'golden\["(\w+)"\]', source))
    formatted = {f"{p}_{s}" for p in ("head", "head3") for s in ("rand", "noise", "h", "out")}
    formatted |= {f"fwd_predictions_{i}" for i in (1, 2)}
    formatted |= {f"{p}_{s}" for p in ("fwd", "fwdtrain", "fwdtrainbf16")
                  for s in ("labels", "latent_predictions", "energy_score")}
    formatted |= {n for n in golden if n.startswith("es_score")}
    unchecked = sorted(set(golden) - literal - formatted)
    assert not unchecked, f"goldens no test reads: {unchecked}"


@pytest.mark.slow
def test_converted_folder_reproduces_the_golden_through_remote_code(converted_dir, golden, tmp_path):
    """What goes to the Hub: a fresh process that cannot import the package loads the folder with remote code."""
    torch.save({"ids": golden["calm_input_ids"], "hidden": golden["calm_hidden"]}, tmp_path / "golden.pt")
    script = f"""
        import torch
        try:
            import modeling_calm
            raise SystemExit("the package must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(converted_dir)!r}, trust_remote_code=True).eval()
        g = torch.load({str(tmp_path / 'golden.pt')!r})
        with torch.no_grad():
            hidden = model(g["ids"]).last_hidden_state
        torch.testing.assert_close(hidden, g["hidden"], atol={ATOL}, rtol={RTOL})
        print("OK", type(model).__module__)
    """
    assert "OK transformers_modules" in run_without_package(script, cwd=tmp_path)


def test_output_folder_card_and_generation_config(converted_dir, model):
    names = {p.name for p in converted_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "modeling_calm.py"} <= names
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "calm" and config["autoencoder_config"]["model_type"] == "calm_autoencoder"
    assert "AutoModelForCausalLM" in config["auto_map"] and "ae_path" not in config
    card = ModelCard.load(converted_dir / "README.md")
    assert card.data.license == "mit" and card.data.base_model == "cccczshao/CALM-M"
    assert "trust_remote_code=True" in card.text and f"K = {model.config.patch_size}" in card.text
    assert 'from_pretrained("org/calm-m", trust_remote_code=True)' in card.text
    assert "check it against the authors' release" in card.text
    # One card builder (modeling_calm.card_calm): the conversion facts, the tokenizer loaded without a remote-code
    # prompt, and generation through `generate` rather than by hand.
    assert "script: `conversion/convert_calm_original_to_hf.py`" in card.text and "dtype: float32" in card.text
    assert 'AutoTokenizer.from_pretrained("org/calm-m", trust_remote_code=True)' in card.text
    assert "model.generate(**tokenizer(" in card.text and "head.sample" not in card.text
    generation = model.generation_config
    assert generation.max_new_tokens % model.config.patch_size == 0
    # CALM's own settings, not transformers' `temperature` (which would outrank calm_temperature forever).
    assert generation.calm_temperature == 1.0 and generation.calm_num_candidates == 200
    assert generation.temperature is None or "temperature" not in generation.to_diff_dict()
    assert generation.pad_token_id == model.config.pad_token_id


# ------------------------------------------------------------------------------------------------------------------
# Synthetic checkpoints in the authors' layout, by inverting the key maps
# ------------------------------------------------------------------------------------------------------------------

_GROUP = re.compile(r"(\((?!\?)[^()]*\))")  # a capture group of the tables (they have no nested groups)


def invert_key_map(key_map: dict[str, str | None]) -> list[tuple[re.Pattern, str]]:
    """(target regex, source template) pairs: target names -> the authors' names."""
    inverse = []
    for pattern, replacement in key_map.items():
        if replacement is None:
            continue
        pieces = _GROUP.split(pattern)  # literal, group, literal, group, ...
        groups = pieces[1::2]
        template = "".join(
            re.sub(r"\\(.)", r"\1", piece) if i % 2 == 0 else rf"\g<g{i // 2 + 1}>" for i, piece in enumerate(pieces)
        )
        target_regex = "".join(
            re.escape(piece) if i % 2 == 0 else f"(?P<g{piece}>{groups[int(piece) - 1][1:-1]})"
            for i, piece in enumerate(re.split(r"\\(\d)", replacement))
        )
        inverse.append((re.compile(target_regex), template))
    return inverse


def to_original_names(state: dict[str, torch.Tensor], key_map: dict[str, str | None]) -> dict[str, torch.Tensor]:
    inverse = invert_key_map(key_map)
    out = {}
    for key, tensor in state.items():
        match, template = next((m, t) for p, t in inverse if (m := p.fullmatch(key)))
        out[match.expand(template)] = tensor
    return out


def random_calm(k: int = 2) -> CalmForCausalLM:
    """A CALM with every weight perturbed (no zero or unit tensors), K=k, grouped-query attention, odd eps."""
    # num_target_samples=100: the authors' format cannot express another M (their code fixes it at 100).
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    config = tiny_calm_config(k=k, num_target_samples=100, backbone={"rms_norm_eps": 1e-5, "rope_parameters": rope})
    config.autoencoder_config.rms_norm_eps = 3e-6
    model = CalmForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def write_original_layout(model: CalmForCausalLM, folder: Path, odd_layers: bool = False, fmt: str = "bin",
                          with_head_copy: bool = True) -> tuple[Path, Path]:
    """Write `model` as the authors' training scripts save it: CALM and autoencoder folders."""
    config, ae, backbone = model.config, model.config.autoencoder_config, model.config.backbone_config
    extra = int(odd_layers)
    ae_config = {
        "architectures": ["Autoencoder"], "ae_dropout": ae.ae_dropout, "hidden_act": "silu",
        "hidden_size": ae.hidden_size, "intermediate_size": ae.intermediate_size, "kl_clamp": ae.kl_clamp,
        "kl_weight": ae.kl_weight, "latent_size": ae.latent_size, "max_position_embeddings": 2048, "mlp_bias": False,
        "num_encoder_layers": ae.num_encoder_layers + extra, "num_decoder_layers": ae.num_decoder_layers + extra,
        "patch_size": ae.patch_size, "rms_norm_eps": ae.rms_norm_eps, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.43.0", "vocab_size": ae.vocab_size,
        "pad_token_id": ae.pad_token_id, "bos_token_id": ae.bos_token_id, "eos_token_id": ae.eos_token_id,
    }
    calm_config = {
        "ae_path": "/checkpoints/autoencoder", "architectures": ["EnergyTransformer"],
        **{n: getattr(backbone, n) for n in ("attention_bias", "attention_dropout", "hidden_act", "hidden_size",
                                             "intermediate_size", "max_position_embeddings", "mlp_bias",
                                             "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                                             "rms_norm_eps", "vocab_size", "bos_token_id", "eos_token_id",
                                             "pad_token_id")},
        "rope_theta": backbone.rope_parameters["rope_theta"], "rope_scaling": None, "tie_word_embeddings": False,
        **{n: getattr(config, n) for n in cc.CALM_CONFIG_FIELDS}, "torch_dtype": "float32",
        "transformers_version": "4.43.0",
    }
    tied = cc.tied_target_keys(model)
    ae_state = to_original_names(
        {k: v for k, v in model.autoencoder.state_dict().items() if k != "lm_head.weight"}, cc.AUTOENCODER_KEY_MAP)
    ae_state["decoder.lm_head_weight"] = ae_state["encoder.embed_tokens.weight"]  # the same tensor, as they save it
    if odd_layers:  # a last layer the reference never runs
        for part, count in (("encoder", ae.num_encoder_layers), ("decoder", ae.num_decoder_layers)):
            prefix = f"{part}.{part}_layers.{count}."
            ae_state[prefix + "layernorm.weight"] = torch.randn(ae.hidden_size)
            for name, shape in (("gate_proj", (ae.intermediate_size, ae.hidden_size)),
                                ("up_proj", (ae.intermediate_size, ae.hidden_size)),
                                ("down_proj", (ae.hidden_size, ae.intermediate_size))):
                ae_state[f"{prefix}mlp.{name}.weight"] = torch.randn(shape)
    calm_map = {k: v for k, v in cc.calm_key_map().items() if not k.startswith(re.escape(cc.CALM_AUTOENCODER_PREFIX))}
    calm_state = {cc.CALM_AUTOENCODER_PREFIX + k: v for k, v in ae_state.items()}
    calm_state.update(to_original_names(
        {k: v for k, v in model.state_dict().items() if k not in tied and not k.startswith("autoencoder.")}, calm_map))
    if with_head_copy:
        calm_state.update({cc.DUPLICATE_HEAD_PREFIX + k[len(cc.HEAD_PREFIX):]: v
                           for k, v in calm_state.items() if k.startswith(cc.HEAD_PREFIX)})
    calm_dir, ae_dir = folder / "calm", folder / "ae"
    for path, cfg, state in ((calm_dir, calm_config, calm_state), (ae_dir, ae_config, ae_state)):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        write_weights(state, path, fmt)
    return calm_dir, ae_dir


def write_weights(state: dict[str, torch.Tensor], folder: Path, fmt: str) -> None:
    """fmt: "bin", "bin-sharded", "safetensors" or "safetensors-sharded" (4 shards, with an index)."""
    safetensors = fmt.startswith("safetensors")
    if safetensors:  # safetensors refuses shared storage: a later upload would hold copies of the tied pair
        state = {k: v.clone().contiguous() for k, v in state.items()}
    if not fmt.endswith("sharded"):
        if safetensors:
            save_file(state, str(folder / "model.safetensors"))
        else:
            torch.save(state, folder / "pytorch_model.bin")
        return
    total = sum(v.numel() * v.element_size() for v in state.values())
    pattern = "model{suffix}.safetensors" if safetensors else "pytorch_model{suffix}.bin"
    split = split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=total // 4 + 1)
    assert split.is_sharded
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state[k] for k in keys}
        save_file(shard, str(folder / filename)) if safetensors else torch.save(shard, folder / filename)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / (pattern.format(suffix="") + ".index.json")).write_text(json.dumps(index))


def assert_same_model(converted: CalmForCausalLM, original: CalmForCausalLM) -> None:
    expected, actual = original.state_dict(), converted.state_dict()
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor.to(actual[key].dtype)), key
    ids = torch.randint(0, original.config.vocab_size, (2, 4 * original.config.patch_size))
    with torch.no_grad():
        out, ref = converted(ids, labels=ids, generator=torch.Generator().manual_seed(1)), original(
            ids, labels=ids, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state) and torch.equal(out.loss, ref.loss)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> CalmForCausalLM:
    torch.manual_seed(0)
    return random_calm(k=2)


@pytest.mark.parametrize("fmt", ["bin", "bin-sharded", "safetensors", "safetensors-sharded"])
def test_synthetic_round_trip_k2_gqa(synthetic, tmp_path, fmt):
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path, fmt=fmt)
    assert "model_type" not in json.loads((calm_dir / "config.json").read_text())
    converted, report = cc.convert_calm(calm_dir, ae_dir)
    assert converted.config.backbone_config.num_key_value_heads < converted.config.backbone_config.num_attention_heads
    assert converted.config.backbone_config.rope_parameters["rope_theta"] == 500000.0
    assert converted.config.autoencoder_config.rms_norm_eps == 3e-6
    assert_same_model(converted, synthetic)
    assert report.mapped == len(converted.state_dict()) - len(report.tied)
    assert report.source_keys == report.mapped + sum(len(v) for v in report.dropped.values())


def test_synthetic_odd_layer_counts_drop_the_unused_layer(synthetic, tmp_path):
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path, odd_layers=True)
    converted, report = cc.convert_calm(calm_dir, ae_dir)
    assert_same_model(converted, synthetic)
    dropped = report.dropped[cc.UNUSED_LAYER_REASON]
    assert len(dropped) == 2 * 4 and all(k.startswith("ae_model.") for k in dropped)
    ae, ae_report = cc.convert_autoencoder(ae_dir)
    assert ae.config.num_encoder_layers == synthetic.config.autoencoder_config.num_encoder_layers
    assert len(ae_report.dropped[cc.UNUSED_LAYER_REASON]) == 8


def test_head_registered_once_is_read_from_either_prefix(synthetic, tmp_path):
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path, with_head_copy=False)
    converted, _ = cc.convert_calm(calm_dir, ae_dir)
    assert_same_model(converted, synthetic)


def test_bfloat16_output_and_cli(synthetic, tmp_path, capsys):
    from conversion.convert_calm_original_to_hf import main

    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path)
    out = tmp_path / "out"
    main(["--calm", str(calm_dir), "--autoencoder", str(ae_dir), "--output", str(out), "--dtype", "bfloat16",
          "--license", "other"])
    printed = capsys.readouterr().out
    assert "mapped" in printed and "reload check, hidden_states: max |diff| = 0" in printed
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert reloaded.dtype == torch.bfloat16
    for key, tensor in synthetic.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor.to(torch.bfloat16)), key
    assert ModelCard.load(out / "README.md").data.license == "other"


def test_autoencoder_cli(synthetic, tmp_path, capsys):
    from conversion.convert_autoencoder_original_to_hf import main

    _, ae_dir = write_original_layout(synthetic, tmp_path, fmt="safetensors")
    main(["--autoencoder", str(ae_dir), "--output", str(tmp_path / "out")])
    assert "reload check, autoencoder.decode: max |diff| = 0" in capsys.readouterr().out
    reloaded = AutoModel.from_pretrained(str(tmp_path / "out"), trust_remote_code=True)
    for key, tensor in synthetic.autoencoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    assert ModelCard.load(tmp_path / "out" / "README.md").data.pipeline_tag == "feature-extraction"


# ------------------------------------------------------------------------------------------------------------------
# Strict errors
# ------------------------------------------------------------------------------------------------------------------

def _rewrite(calm_dir: Path, edit) -> None:
    state = torch.load(calm_dir / "pytorch_model.bin", weights_only=True)
    edit(state)
    torch.save(state, calm_dir / "pytorch_model.bin")


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case, edit, message",
    [
        ("missing", lambda s: s.pop("transformer.layers.0.mlp.up_proj.weight"),
         r"missing.*model\.layers\.0\.mlp\.up_proj"),
        ("unexpected", lambda s: s.update({"embed_proj.5.weight": torch.zeros(2)}),
         r"unexpected.*embed_proj\.5\.weight"),
        ("unexpected_llama", lambda s: s.update({"transformer.lm_head.weight": torch.zeros(2)}),
         r"unexpected.*transformer\.lm_head\.weight"),
        ("shape", lambda s: s.update({"embed_proj.2.bias": torch.zeros(3)}), r"wrong shapes.*embed_proj\.2\.bias"),
        ("untied", lambda s: s.update({"ae_model.decoder.lm_head_weight": s["ae_model.decoder.lm_head_weight"] + 1}),
         r"ae_model\.decoder\.lm_head_weight.*must equal.*ae_model\.encoder\.embed_tokens\.weight"),
        ("head_copy", lambda s: s.update({"mlp_generator.noise_embd.bias": s["mlp_generator.noise_embd.bias"] + 1}),
         r"mlp_generator\.noise_embd\.bias"),
        ("head_type", lambda s: [s.update({k.replace("noise_embd", "time_embed"): s.pop(k)})
                                 for k in [k for k in s if ".noise_embd." in k]],
         r"Cannot infer the head type.*generative_head\.time_embed\.bias"),
        ("no_head", lambda s: [s.pop(k) for k in [k for k in s if "generative_head." in k or "mlp_generator." in k]],
         r"No generative head.*embed_proj"),
        ("ae_copy", lambda s: s.update({"ae_model.encoder.norm.weight": s["ae_model.encoder.norm.weight"] * 2}),
         r"differs from the CALM's own copy.*encoder\.norm\.weight"),
    ],
)
def test_strict_errors_name_the_keys(synthetic, tmp_path, case, edit, message):
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path)
    _rewrite(calm_dir, edit)
    with pytest.raises(ValueError, match=re.compile(message, re.S)):
        cc.convert_calm(calm_dir, ae_dir)


@pytest.mark.parametrize("layout", ["autoencoder_config_only", "no_copy_in_calm"])
def test_autoencoder_weights_from_either_folder(synthetic, tmp_path, layout):
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path)
    if layout == "autoencoder_config_only":
        (ae_dir / "pytorch_model.bin").unlink()
    else:
        _rewrite(calm_dir, lambda s: [s.pop(k) for k in [k for k in s if k.startswith(cc.CALM_AUTOENCODER_PREFIX)]])
    converted, report = cc.convert_calm(calm_dir, ae_dir)
    assert_same_model(converted, synthetic)
    assert report.notes
    if layout == "autoencoder_config_only":
        _rewrite(calm_dir, lambda s: [s.pop(k) for k in [k for k in s if k.startswith(cc.CALM_AUTOENCODER_PREFIX)]])
        with pytest.raises(ValueError, match="No autoencoder weights"):
            cc.convert_calm(calm_dir, ae_dir)


def test_autoencoder_mismatch_can_be_overridden(synthetic, tmp_path):
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path)
    state = torch.load(ae_dir / "pytorch_model.bin", weights_only=True)
    state["encoder.norm.weight"] = state["encoder.norm.weight"] + 1
    torch.save(state, ae_dir / "pytorch_model.bin")
    converted, report = cc.convert_calm(calm_dir, ae_dir, allow_autoencoder_mismatch=True)
    assert_same_model(converted, synthetic)  # the CALM's own copy is what the reference runs
    assert any("differs" in note for note in report.notes)


@pytest.mark.parametrize("field", ["patch_size", "latent_size"])
def test_config_mismatch_between_calm_and_autoencoder(synthetic, tmp_path, field):
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path)
    _edit_config(calm_dir, **{field: 8 if field == "patch_size" else 5})
    with pytest.raises(ValueError, match=rf"{field} differs between .*calm.*config\.json"):
        cc.convert_calm(calm_dir, ae_dir)


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "bin-sharded"])
def test_corrupt_or_missing_files_name_the_file(synthetic, tmp_path, fmt):
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path, fmt=fmt)
    if fmt == "bin-sharded":
        shard = sorted(calm_dir.glob("pytorch_model-*.bin"))[1]
        shard.unlink()
        with pytest.raises(ValueError, match=re.escape(str(shard))):
            cc.convert_calm(calm_dir, ae_dir)
        return
    path = calm_dir / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    path.write_bytes(path.read_bytes()[:200])  # truncated download
    with pytest.raises(ValueError, match=rf"Could not read checkpoint file {re.escape(str(path))}"):
        cc.convert_calm(calm_dir, ae_dir)
    (calm_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json as JSON"):
        cc.convert_calm(calm_dir, ae_dir)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((ae_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="No weights"):
        cc.convert_autoencoder(empty)


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer and Hub upload
# ------------------------------------------------------------------------------------------------------------------

def _llama3_like_tokenizer(folder: Path, size: int) -> Path:
    """A tokenizer of `size` tokens with BOS/EOS and no pad token, like the Llama-3 release."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return folder


def test_tokenizer_gets_the_pad_token(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vocab = synthetic.config.vocab_size
    tokenizer_dir = _llama3_like_tokenizer(tmp_path / "tok", vocab - 1)
    calm_dir, ae_dir = write_original_layout(synthetic, tmp_path)
    for folder in (calm_dir, ae_dir):  # Llama-3: [PAD] appended after the 128,256 tokens
        _edit_config(folder, pad_token_id=vocab - 1)
    converted, report = cc.convert_calm(calm_dir, ae_dir)
    out = cf.save_converted(converted, tmp_path / "out", report, tokenizer_dir=tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.pad_token == cf.PAD_TOKEN and tokenizer.pad_token_id == vocab - 1 and len(tokenizer) == vocab
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert reloaded.config.pad_token_id == reloaded.generation_config.pad_token_id == vocab - 1
    with pytest.raises(ValueError, match="pad_token_id"):
        cf.prepare_tokenizer(tokenizer_dir, vocab, pad_token_id=vocab + 5)
    assert cf.prepare_tokenizer(tokenizer_dir, vocab, pad_token_id=0).pad_token == "<unk>"  # an existing token


def test_push_to_hub_uploads_the_verified_folder(converted_dir, monkeypatch):
    """The thin upload path (network: the Hub calls are replaced): create the repo, upload the folder as verified."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)) or "url")
    assert cf.push_folder_to_hub(converted_dir, "org/calm", private=True) == "url"
    assert calls[0] == ("create_repo", "org/calm", {"private": True, "exist_ok": True})
    assert calls[1][0] == "upload_folder"
    assert calls[1][1]["repo_id"] == "org/calm" and Path(calls[1][1]["folder_path"]) == converted_dir
