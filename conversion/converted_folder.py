"""A Hub-ready folder for a converted CALM or autoencoder: weights, config and code, generation config, tokenizer,
model card (built by `modeling_calm.card_calm`, like every card of the project); the reload check that closes a
conversion; the upload.

A tool, not shipped to the Hub: it may import huggingface_hub and the package.
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging

from modeling_calm import CalmAutoencoder, CalmForCausalLM
from modeling_calm.card_calm import build_autoencoder_card, build_model_card
from modeling_calm.data_calm import save_tokenizer_with_model

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


def conversion_card(
    model: CalmForCausalLM | CalmAutoencoder,
    report: ConversionReport,
    license: str = "mit",
    source_repo: str | None = None,
    autoencoder_repo: str | None = None,
    script: str = "conversion/convert_calm_original_to_hf.py",
    repo_id: str | None = None,
    model_name: str | None = None,
    **card_kwargs,
):
    """The model card of a converted folder, from the package's card builders (`modeling_calm.card_calm`).

    `repo_id` is where the folder will be uploaded (named in the usage snippet); `source_repo` becomes the card's
    `base_model`; the conversion facts (script, date, dtype, tensor counts) and the licence caveat go into its
    "Conversion" section. `card_kwargs` go to the builder (e.g. `training_data`, `tokenizer_name`, `brier_lm`).
    """
    is_calm = isinstance(model, CalmForCausalLM)
    facts = {
        "source": source_repo,
        "autoencoder_source": autoencoder_repo if is_calm else None,
        "script": script,
        "date": datetime.date.today().isoformat(),
        "dtype": report.dtype,
        "source_tensors": report.source_keys,
        "mapped": report.mapped,
        "tied": len(report.tied),
        "dropped": {reason: len(keys) for reason, keys in report.dropped.items()},
        "checks": "every source tensor was renamed or dropped on purpose and every shape checked; the script then "
        "reloads the saved folder through the Auto classes and requires it to reproduce the in-memory conversion "
        "exactly. Numerical parity of the key mapping with the authors' code is tested against golden outputs of "
        "their implementation (tests/test_conversion.py).",
    }
    name = model_name or (repo_id or source_repo or ("CALM" if is_calm else "CALM-Autoencoder")).split("/")[-1]
    build = build_model_card if is_calm else build_autoencoder_card
    return build(
        model, model_name=name, repo_id=repo_id or "PATH_OR_REPO_ID", license=license, base_model=source_repo,
        conversion=facts, **card_kwargs,
    )


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
    **card_kwargs,
) -> Path:
    """Write a Hub-ready folder: safetensors, config (+ code, auto_map), generation config, tokenizer, README.md (the
    card of `conversion_card`; `card_kwargs` go to it)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, CalmForCausalLM):
        model.generation_config = calm_generation_config(model)
    model.save_pretrained(output_dir)
    if tokenizer_dir is not None:
        config = model.config
        tokenizer = prepare_tokenizer(tokenizer_dir, config.vocab_size, config.pad_token_id)
        save_tokenizer_with_model(tokenizer, config, output_dir)  # model_max_length = the context in tokens
        card_kwargs.setdefault("tokenizer_name", f"the one saved with this model ({len(tokenizer):,} tokens)")
    card = conversion_card(model, report, license, source_repo, autoencoder_repo, script, repo_id, **card_kwargs)
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


def check_paths(inputs: dict[str, str | Path | None], output: str | Path, overwrite: bool = False) -> Path:
    """Check a conversion's paths before any work: every given input is an existing folder, the output is none of
    them (nor a folder holding one), and an existing output folder is empty unless `overwrite`.

    Args:
        inputs: option name (e.g. "--calm") -> folder, None for an option not given.
    Returns:
        The resolved output path.
    """
    resolved = {}
    for name, folder in inputs.items():
        if folder is None:
            continue
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"{name} {str(folder)!r} is not an existing folder.")
        resolved[name] = path.resolve()
    target = Path(output).expanduser().resolve()
    for name, path in resolved.items():
        if target == path or target in path.parents:
            raise ValueError(f"--output {str(output)!r} is (or holds) the input folder {name} {str(path)!r}: writing "
                             "there would destroy the source. Choose another --output.")
    if target.exists() and not target.is_dir():
        raise ValueError(f"--output {str(output)!r} exists and is not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"--output {str(output)!r} is a non-empty folder: pass --overwrite to replace it (its "
                         "current content is replaced only after the new folder passed every check).")
    return target


def write_verified(model: CalmForCausalLM | CalmAutoencoder, output_dir: str | Path, report: ConversionReport,
                   overwrite: bool = False, **save_kwargs) -> Path:
    """`save_converted` + `verify_saved` into a temporary folder next to `output_dir`, moved into place only when
    both passed (then `report.check` holds the reload check). On any failure nothing is left behind and an existing
    `output_dir` is untouched; with `overwrite`, an existing `output_dir` is replaced as a whole (no stale files)."""
    target = Path(output_dir).expanduser().resolve()
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{str(output_dir)!r} exists and is not empty: pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
    try:
        # The staged folder has the target's own name: the remote-code module the reload check imports is named
        # after it, as it will be for the user.
        folder = save_converted(model, staging / target.name, report, **save_kwargs)
        report.check = verify_saved(model, folder)
        previous = staging / "previous"
        if target.exists():
            os.replace(target, previous)
        try:
            os.replace(folder, target)
        except OSError:
            if previous.exists():
                os.replace(previous, target)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def push_folder_to_hub(output_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a converted folder as it was verified (create the repo if needed). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(output_dir), commit_message="Add CALM converted with modeling_calm"
    )
    return str(commit)
