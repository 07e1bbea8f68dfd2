"""A Hub-ready folder for a converted CALM or autoencoder: weights, config and code, generation config, tokenizer,
model card; the reload check that closes a conversion; the upload.

A tool, not shipped to the Hub: it may import huggingface_hub and the package.
"""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging

from modeling_calm import CalmAutoencoder, CalmForCausalLM

from .calm_conversion import ConversionReport


logger = logging.get_logger(__name__)

# The Llama-3 tokenizer has no pad token; the authors appended this one (id 128256, vocabulary 128,257).
PAD_TOKEN = "[PAD]"


def calm_generation_config(model: CalmForCausalLM, max_new_tokens: int = 256) -> GenerationConfig:
    """Generation defaults of a converted CALM: the model's own CALM settings (`calm_temperature` 1, the
    approximate method with 200 candidates for T < 1, stop on BOS), a length that is a multiple of K, and the
    special token ids. Temperature 1 samples the model's own distribution (the paper's BrierLM setting, one head
    call per step); the authors advise T <= 0.5 for fluent text, at the cost of many candidate draws per step.
    """
    k = model.config.patch_size
    generation_config = copy.deepcopy(model.generation_config)
    generation_config.max_new_tokens = max(k, max_new_tokens // k * k)
    generation_config.bos_token_id = model.config.bos_token_id
    generation_config.eos_token_id = model.config.eos_token_id
    generation_config.pad_token_id = model.config.pad_token_id
    return generation_config


def prepare_tokenizer(tokenizer_dir: str | Path, vocab_size: int, pad_token_id: int | None):
    """Load a tokenizer from a local folder and make its pad token agree with the model.

    The authors used the Llama-3 tokenizer plus a "[PAD]" token appended at id 128,256 (vocabulary 128,257); the
    Llama-3 release has no pad token, so it is added here when the model's pad id is the next free id.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if tokenizer.pad_token is None:
        if pad_token_id is None:
            raise ValueError(f"The tokenizer in {tokenizer_dir} has no pad token and the model config names none.")
        if pad_token_id == len(tokenizer):
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        elif pad_token_id < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id)
        else:
            raise ValueError(
                f"The model's pad_token_id {pad_token_id} is beyond the tokenizer's {len(tokenizer)} tokens + one "
                f"added {PAD_TOKEN}."
            )
    if pad_token_id is not None and tokenizer.pad_token_id != pad_token_id:
        raise ValueError(
            f"The tokenizer's pad token {tokenizer.pad_token!r} has id {tokenizer.pad_token_id}, but the model's "
            f"pad_token_id is {pad_token_id}."
        )
    if len(tokenizer) > vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}.")
    if len(tokenizer) < vocab_size:
        logger.warning(f"The tokenizer has {len(tokenizer)} tokens; the model's embeddings have {vocab_size} rows.")
    return tokenizer


def build_model_card(
    model: CalmForCausalLM | CalmAutoencoder,
    report: ConversionReport,
    license: str = "mit",
    source_repo: str | None = None,
    autoencoder_repo: str | None = None,
    script: str = "conversion/convert_calm_original_to_hf.py",
    repo_id: str | None = None,
):
    """A model card (huggingface_hub ModelCard) for a converted folder; `repo_id` is where it will be uploaded."""
    from huggingface_hub import ModelCard, ModelCardData

    is_calm = isinstance(model, CalmForCausalLM)
    config = model.config
    ae = config.autoencoder_config if is_calm else config
    source = source_repo or "the authors' checkpoint"
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation" if is_calm else "feature-extraction",
        tags=["calm", "continuous-autoregressive", "custom_code"] + ([] if is_calm else ["autoencoder"]),
        base_model=source_repo,
        language="en",
    )
    params = report.parameters
    name = json.dumps(repo_id or "PATH_OR_REPO_ID")
    if is_calm:
        backbone = config.backbone_config
        what = (
            f"CALM (Continuous Autoregressive Language Model, Shao et al. 2025, arXiv:2510.27688) with K = "
            f"{config.patch_size} tokens per step: a {backbone.num_hidden_layers}-layer Llama backbone of width "
            f"{backbone.hidden_size} ({backbone.num_attention_heads} heads, {backbone.num_key_value_heads} kv heads), "
            f"an {config.head_type} head ({config.num_mlp_layers} blocks, noise size {config.noise_size}) and the "
            f"frozen autoencoder (latent size Z = {config.latent_size}, vocabulary {config.vocab_size})."
        )
        sizes = (
            f"| parameters | count |\n|---|---|\n| CALM without the autoencoder | {params['calm']:,} |\n"
            f"| backbone | {params['backbone']:,} |\n| input compression | {params['chunk_proj']:,} |\n"
            f"| head | {params['head']:,} |\n| autoencoder | {params['autoencoder']:,} |\n"
            f"| total | {params['total']:,} |"
        )
        usage = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({name}, trust_remote_code=True)\n"
            f"tokenizer = AutoTokenizer.from_pretrained({name})\n"
            "ids = tokenizer(\"The capital of France is\", return_tensors=\"pt\").input_ids\n"
            "k = model.config.patch_size                      # the model reads whole chunks of K tokens\n"
            "hidden = model(ids[:, : ids.shape[1] // k * k]).last_hidden_state\n"
            "latent = model.head.sample(hidden[:, -1])        # a sample of the next chunk's latent\n"
            "next_tokens = model.autoencoder.decode_tokens(latent[:, None])  # [B, K]\n```"
        )
    else:
        what = (
            f"The CALM autoencoder (Shao et al. 2025, arXiv:2510.27688): K = {ae.patch_size} tokens <-> one latent "
            f"vector of size {ae.latent_size}; hidden size {ae.hidden_size}, {ae.num_encoder_layers} + "
            f"{ae.num_decoder_layers} layers, vocabulary {ae.vocab_size}."
        )
        sizes = f"| parameters | count |\n|---|---|\n| total | {params['total']:,} |"
        usage = (
            "```python\nfrom transformers import AutoModel\n"
            f"autoencoder = AutoModel.from_pretrained({name}, trust_remote_code=True)\n"
            "mean, log_std = autoencoder.encode(input_ids)   # [B, T/K, Z] chunk codes\n"
            "tokens = autoencoder.decode_tokens(mean)         # [B, T]\n```"
        )
    dropped = "\n".join(f"  - {reason}: {len(keys)} tensors" for reason, keys in report.dropped.items()) or "  - none"
    ae_line = f" and {autoencoder_repo}" if autoencoder_repo else ""
    body = f"""# {model.__class__.__name__} converted from {source}

{what}

Converted from {source}{ae_line} (the authors' release, trained with their code at github.com/shaochenze/calm)
into the `modeling_calm` format: safetensors weights, one config.json (the autoencoder nested), remote code.

## Usage

Load with `trust_remote_code=True` (the modeling code ships with the weights):

{usage}

## Sizes

{sizes}

## Conversion

- script: `{script}` (modeling_calm), date: {datetime.date.today().isoformat()}, dtype: {report.dtype}
- source tensors: {report.source_keys}; mapped: {report.mapped}; tied (stored once): {len(report.tied)}
- dropped on purpose:
{dropped}
- every source tensor was renamed or dropped on purpose, every shape checked; the saved folder was reloaded and
  reproduces the in-memory conversion exactly. Numerical parity of the key mapping with the authors' code is
  tested against golden outputs of their implementation (tests/test_conversion.py).

## License

The license field says `{license}`: **check it against the authors' release** (the original repository's
license) before redistributing; this conversion changes the format, not the terms.

## Citation

Shao et al., "Continuous Autoregressive Language Models", 2025, arXiv:2510.27688.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def save_converted(
    model: CalmForCausalLM | CalmAutoencoder,
    output_dir: str | Path,
    report: ConversionReport,
    tokenizer_dir: str | Path | None = None,
    license: str = "mit",
    source_repo: str | None = None,
    autoencoder_repo: str | None = None,
    script: str = "conversion/convert_calm_original_to_hf.py",
    repo_id: str | None = None,
) -> Path:
    """Write a Hub-ready folder: safetensors, config (+ code, auto_map), generation config, tokenizer, README.md."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, CalmForCausalLM):
        model.generation_config = calm_generation_config(model)
    model.save_pretrained(output_dir)
    if tokenizer_dir is not None:
        config = model.config
        prepare_tokenizer(tokenizer_dir, config.vocab_size, config.pad_token_id).save_pretrained(output_dir)
    card = build_model_card(model, report, license, source_repo, autoencoder_repo, script, repo_id)
    card.save(str(output_dir / "README.md"))
    return output_dir


@torch.no_grad()
def verify_saved(model: CalmForCausalLM | CalmAutoencoder, output_dir: str | Path, seed: int = 0) -> dict[str, float]:
    """Reload `output_dir` through the Auto classes (remote code) and compare with the in-memory model.

    Runs every component on fixed random inputs: the backbone's hidden states, the head's samples for fixed
    noise, the autoencoder's encoding and decoding. Raises a `ValueError` if any output differs.

    Returns:
        name -> max absolute difference (all 0.0 on success).
    """
    is_calm = isinstance(model, CalmForCausalLM)
    auto = AutoModelForCausalLM if is_calm else AutoModel
    reloaded = auto.from_pretrained(str(output_dir), trust_remote_code=True).eval()
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ae = model.autoencoder if is_calm else model
    ae_reloaded = reloaded.autoencoder if is_calm else reloaded
    k = ae.config.patch_size
    ids = torch.randint(0, ae.config.vocab_size, (2, 4 * k), generator=generator)
    outputs = {}
    mean, _ = ae.encode(ids)
    outputs["autoencoder.encode"] = (mean, ae_reloaded.encode(ids)[0])
    outputs["autoencoder.decode"] = (ae.decode(mean), ae_reloaded.decode(mean))
    if is_calm:
        hidden = model(ids).last_hidden_state
        outputs["hidden_states"] = (hidden, reloaded(ids).last_hidden_state)
        # Same seed on both sides: the same head noise, whatever the head type.
        samples = [m.head.sample(hidden, generator=torch.Generator().manual_seed(seed)) for m in (model, reloaded)]
        outputs["head.sample"] = tuple(samples)
    diffs = {}
    for name, (expected, actual) in outputs.items():
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            raise ValueError(
                f"Reloaded {name}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}."
            )
        diffs[name] = (expected.float() - actual.float()).abs().max().item()
    bad = {n: d for n, d in diffs.items() if d != 0.0}
    if bad:
        raise ValueError(f"The reloaded folder {output_dir} does not reproduce the converted model: {bad}.")
    return diffs


def push_folder_to_hub(output_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a converted folder as it was verified (create the repo if needed). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(output_dir), commit_message="Add CALM converted with modeling_calm"
    )
    return str(commit)
