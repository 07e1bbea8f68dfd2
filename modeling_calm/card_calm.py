"""Model cards for CALM checkpoints and pushing them to the Hugging Face Hub.

Not shipped to the Hub (the modeling files never import it). Uses `huggingface_hub`'s `ModelCard`,
`ModelCardData` and `EvalResult`, so the metadata (model-index with BrierLM and autoencoder accuracy) is the
standard one the Hub reads, and `ModelCard(text).data.eval_results` gives the numbers back.

    card = build_model_card(model, model_name="calm-m", repo_id="org/calm-m",
                            brier_lm={**evaluate_brier(model, blocks)["mean"], "dataset": "wikitext"},
                            training_data=["monology/pile-uncopyrighted"], tokenizer_name="meta-llama/Meta-Llama-3-8B")
    card.save(os.path.join(output_dir, "README.md"))
    push_calm_to_hub(output_dir, "org/calm-m", tokenizer=tokenizer, card=card)       # one commit

Every card of the project comes from these two builders: the training examples (with `brier_from_trainer_metrics`,
`accuracy_from_trainer_metrics` and `source_names` turning a run into their arguments) and the conversion scripts
(`conversion=` facts, the source repository as `base_model`).

`push_calm_to_hub` stages the model folder (weights, config with `auto_map`, the remote-code `.py` files), the
tokenizer files and the card as one commit through `HfApi.create_commit`. The standard calls work too
(`model.push_to_hub`, `tokenizer.push_to_hub`, `card.push_to_hub`), but each is its own commit, and the first two
write a generic README.md when the repo has no card yet: push the card last.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers.utils import logging


logger = logging.get_logger(__name__)

CALM_PAPER_URL = "https://arxiv.org/abs/2510.27688"
CALM_BIBTEX = """@article{shao2025calm,
  title   = {Continuous Autoregressive Language Models},
  author  = {Shao, Chenze and others},
  journal = {arXiv preprint arXiv:2510.27688},
  year    = {2025},
  url     = {https://arxiv.org/abs/2510.27688}
}"""
CALM_TAGS = ["calm", "continuous-autoregressive", "custom_code"]
BRIER_KEYS = ("brier_1", "brier_2", "brier_3", "brier_4")
# Advice of the paper for fluent text (arXiv 2510.27688, "Likelihood-Free Temperature Sampling").
FLUENT_TEMPERATURE, FLUENT_NUM_CANDIDATES = 0.5, 200
# A card built without `repo_id` names `REPO_PLACEHOLDER/<model_name>` in its loading snippet, with a sentence that
# says so; `push_calm_to_hub` (and `CalmTrainer` when pushing) write the real repo id in (`fill_repo_id`).
REPO_PLACEHOLDER = "YOUR-USERNAME"
_PLACEHOLDER_REPO = re.compile(re.escape(REPO_PLACEHOLDER) + r"/[\w.-]+")
_PLACEHOLDER_NOTE = re.compile(r"\n`" + re.escape(REPO_PLACEHOLDER) + r"/[^`]*` is a placeholder:[^\n]*\n")


def _repo_and_note(repo_id: str | None, model_name: str) -> tuple[str, str]:
    if repo_id:
        return repo_id, ""
    repo = f"{REPO_PLACEHOLDER}/{model_name}"
    return repo, (f"\n`{repo}` is a placeholder: put the id of the Hub repository this folder is pushed to (or its "
                  "local path); `push_calm_to_hub` writes it in.\n")


def fill_repo_id(card_text: str, repo_id: str) -> str:
    """The card text with the `REPO_PLACEHOLDER/<name>` of a card built without `repo_id` replaced by `repo_id`
    (and the sentence explaining the placeholder removed); other cards are returned unchanged."""
    return _PLACEHOLDER_REPO.sub(repo_id, _PLACEHOLDER_NOTE.sub("", card_text))
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv", ".gz", ".xz", ".bz2")


# ----------------------------------------------------------------------------------------------------------------
# Facts about a model
# ----------------------------------------------------------------------------------------------------------------


def _config_and_model(model_or_config, model_type: str):
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) != model_type:
        raise ValueError(
            f"Expected a model or config of model_type {model_type!r}, got {type(model_or_config).__name__} "
            f"(model_type {getattr(config, 'model_type', None)!r})."
        )
    model = model_or_config if config is not model_or_config else None
    if model is not None and hasattr(model, "get_base_model"):
        raise ValueError("Got a PEFT model: merge it first (`merge_and_unload()`) or describe the base model.")
    return config, model


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def calm_parameter_counts(model_or_config) -> dict[str, int]:
    """Parameters of a CALM: `{"total", "autoencoder", "without_autoencoder", "backbone", "head", "compression"}`.

    A config is built on the meta device (no memory, a fraction of a second even for CALM-XL). "backbone" includes
    its token embedding; "without_autoencoder" is what the paper's size table reports (CALM-M: 371.7M).
    """
    config, model = _config_and_model(model_or_config, "calm")
    if model is None:
        from .modeling_calm import CalmForCausalLM

        with torch.device("meta"):
            model = CalmForCausalLM(config)
    total, autoencoder = _count(model), _count(model.autoencoder)
    return {
        "total": total,
        "autoencoder": autoencoder,
        "without_autoencoder": total - autoencoder,
        "backbone": _count(model.model),
        "head": _count(model.head),
        "compression": _count(model.chunk_proj),
    }


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not name.endswith(_FILE_SUFFIXES) and not os.path.exists(name)


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation results
# ----------------------------------------------------------------------------------------------------------------


def _dataset(info: Mapping[str, Any], what: str) -> dict[str, str | None]:
    dataset = info.get("dataset")
    if dataset is None:
        logger.warning(f"No `dataset` given for the {what} result: the card says 'unspecified'.")
    return {
        "dataset_type": dataset or "unspecified",
        "dataset_name": info.get("dataset_name") or dataset or "unspecified evaluation text",
        "dataset_split": info.get("split"),
        "dataset_config": info.get("dataset_config"),
    }


def _brier_info(brier_lm) -> dict[str, Any]:
    """Normalise `brier_lm` (a number, a `BrierAccumulator.compute()` dict, or an `evaluate_brier` result)."""
    if brier_lm is None:
        return {}
    if not isinstance(brier_lm, Mapping):
        return {"brier_lm": _number(brier_lm, "brier_lm")}
    info = dict(brier_lm)
    if isinstance(info.get("mean"), Mapping):  # evaluate_brier(...): means and spread over seeds
        info = {**info["mean"], **{k: v for k, v in info.items() if k not in ("mean", "per_seed", "pooled")}}
        info["std"] = brier_lm["std"].get("brier_lm") if isinstance(brier_lm.get("std"), Mapping) else None
        info["num_seeds"] = len(brier_lm.get("seeds") or ())
    if "brier_lm" not in info:
        raise ValueError(f"`brier_lm` must be a number or a dict with a 'brier_lm' entry, got keys {sorted(info)}.")
    info["brier_lm"] = _number(info["brier_lm"], "brier_lm")
    for key in BRIER_KEYS:
        if info.get(key) is not None:
            info[key] = _number(info[key], key)
    std = info.get("std")
    info["std"] = float(std) if isinstance(std, (int, float)) and math.isfinite(std) else None
    return info


def _brier_results(info: Mapping[str, Any]) -> list[EvalResult]:
    common = dict(task_type="text-generation", task_name="Language modeling (BrierLM)",
                  metric_config=info.get("metric_config"), **_dataset(info, "BrierLM"))
    results = [EvalResult(metric_type="brier_lm", metric_name="BrierLM", metric_value=info["brier_lm"], **common)]
    for key in BRIER_KEYS:
        if info.get(key) is not None:
            results.append(
                EvalResult(metric_type=key, metric_name=f"Brier-{key[-1]}", metric_value=info[key], **common)
            )
    return results


def _accuracy_info(accuracy, name: str) -> dict[str, Any]:
    """`accuracy`: a number (latent sampled) or a dict with `sampled` and/or `mean` (and dataset info)."""
    if accuracy is None:
        return {}
    info = {"sampled": accuracy} if not isinstance(accuracy, Mapping) else dict(accuracy)
    if info.get("sampled") is None and info.get("mean") is None:
        raise ValueError(f"`{name}` must be a number or a dict with 'sampled' and/or 'mean', got {accuracy!r}.")
    for key in ("sampled", "mean"):
        if info.get(key) is not None:
            value = _number(info[key], f"{name}['{key}']")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}['{key}']` is a token accuracy in [0, 1], got {value!r}.")
            info[key] = value
    return info


def _accuracy_results(info: Mapping[str, Any], robustness: Mapping[float, float] | None = None) -> list[EvalResult]:
    # A separate model-index result (task "feature-extraction"), so BrierLM and the autoencoder do not mix.
    common = dict(
        task_type="feature-extraction", task_name="Chunk reconstruction (autoencoder)", metric_type="accuracy",
        **_dataset(info, "autoencoder accuracy"),
    )
    results = []
    if info.get("sampled") is not None:
        results.append(EvalResult(metric_name="Token accuracy (z sampled)", metric_config="latent_sample",
                                  metric_value=info["sampled"], **common))
    if info.get("mean") is not None:
        results.append(EvalResult(metric_name="Token accuracy (z = mean)", metric_config="latent_mean",
                                  metric_value=info["mean"], **common))
    for sigma, accuracy in sorted((robustness or {}).items()):
        results.append(EvalResult(metric_name=f"Token accuracy (z + noise of std {sigma:g})",
                                  metric_config=f"latent_noise_{sigma:g}", metric_value=accuracy, **common))
    return results


def _brier_section(info: Mapping[str, Any]) -> str:
    rows = [f"| {k.replace('brier_', 'Brier-')} | {info[k]:.4f} |" for k in BRIER_KEYS if info.get(k) is not None]
    spread = f" ± {info['std']:.2f} (std over {info.get('num_seeds') or '?'} seeds)" if info.get("std") else ""
    rows.append(f"| **BrierLM** | **{info['brier_lm']:.2f}**{spread} |")
    where = _dataset_text(info)
    extra = f", {info['num_positions']:,} scored positions" if info.get("num_positions") else ""
    return (
        f"BrierLM on {where}{extra}. Brier-n is the mean two-sample Brier estimate of the next n tokens; BrierLM "
        "= 100 x their geometric mean (higher is better).\n\n| metric | value |\n|---|---|\n" + "\n".join(rows)
        + _note(info)
    )


def _accuracy_rows(info: Mapping[str, Any]) -> list[str]:
    rows = []
    if info.get("sampled") is not None:
        rows.append(f"| token accuracy, z sampled from the posterior | {100 * info['sampled']:.3f} % |")
    if info.get("mean") is not None:
        rows.append(f"| token accuracy, z = posterior mean | {100 * info['mean']:.3f} % |")
    return rows


def _note(info: Mapping[str, Any]) -> str:
    return f"\n\n{info['note'].strip()}" if info.get("note") else ""


def _dataset_text(info: Mapping[str, Any]) -> str:
    name = info.get("dataset_name") or info.get("dataset") or "an unspecified evaluation text"
    return name + (f" ({info['split']})" if info.get("split") else "")


# ----------------------------------------------------------------------------------------------------------------
# From a training run
# ----------------------------------------------------------------------------------------------------------------


def source_names(sources: Sequence[str] | str | None) -> list[str]:
    """How data, tokenizers and models a run started from are named on a card: Hub ids as given, local files, folders
    and globs by their base name (a path on the training machine means nothing to a reader of the card)."""
    if isinstance(sources, str):
        sources = [sources]
    return [name if _is_hub_id(name) else os.path.basename(os.path.normpath(name)) for name in sources or ()]


def brier_from_trainer_metrics(
    metrics: Mapping[str, float], *, dataset: str | None, split: str | None = None, block_size: int | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any] | None:
    """The `brier_lm` argument of `build_model_card` from the metrics of `CalmTrainer.evaluate()`.

    The Trainer's figure is a quick estimate: one sampling seed, two head samples at each chunk boundary of the
    evaluation forward, on the training blocks. The card says so and points to `examples/evaluate_brierlm.py`
    for the full figure; the model-index entries get the metric configuration "trainer_eval".

    Returns:
        A dict for `brier_lm`, or None when the metrics hold no `eval_brier_lm` (K < 4, or `eval_brier=False`).
    """
    if metrics.get("eval_brier_lm") is None:
        return None
    blocks = f", blocks of {block_size} tokens" if block_size else ""
    return {
        "brier_lm": metrics["eval_brier_lm"],
        **{key: metrics[f"eval_{key}"] for key in BRIER_KEYS if metrics.get(f"eval_{key}") is not None},
        "dataset": dataset, "dataset_name": dataset_name, "split": split, "metric_config": "trainer_eval",
        "note": (
            "**A quick estimate**, from the Trainer's final evaluation: one sampling seed, two head samples at each "
            f"chunk boundary of the evaluation forward{blocks}. For the full figure (several seeds and their "
            "spread, the paper's 1024-token blocks) run `python examples/evaluate_brierlm.py --model <this "
            "model> --eval_file <text> --block_size 1024 --seeds 0 1 2`."
        ),
    }


def accuracy_from_trainer_metrics(
    metrics: Mapping[str, float], *, dataset: str | None, split: str | None = None, dataset_name: str | None = None,
) -> tuple[dict[str, Any] | None, dict[float, float]]:
    """The `accuracy` and `noise_robustness` arguments of `build_autoencoder_card` from the metrics of
    `CalmAutoencoderTrainer.evaluate()` (`eval_accuracy`, z sampled from the posterior, and
    `eval_accuracy_noise_{sigma}`)."""
    prefix = "eval_accuracy_noise_"
    robustness = {float(key[len(prefix):]): value for key, value in metrics.items() if key.startswith(prefix)}
    if metrics.get("eval_accuracy") is None:
        return None, robustness
    accuracy = {
        "sampled": metrics["eval_accuracy"], "dataset": dataset, "dataset_name": dataset_name, "split": split,
        "note": "From the Trainer's final evaluation (eval mode: no dropout, z sampled from the posterior).",
    }
    return accuracy, robustness


# ----------------------------------------------------------------------------------------------------------------
# Card text
# ----------------------------------------------------------------------------------------------------------------


def _data_and_tokenizer(training_data, tokenizer_name, tokenizer_license) -> tuple[str, list[str]]:
    if isinstance(training_data, str):
        training_data = [training_data]
    names = list(training_data or [])
    data = "\n".join(f"- {name}" for name in names) or "Not stated."
    tokenizer = tokenizer_name or "not stated"
    if tokenizer_license:
        tokenizer += f" (licence: {tokenizer_license}; the tokenizer's own terms apply to it)"
    text = f"## Training data\n\n{data}\n\n## Tokenizer\n\n{tokenizer}"
    return text, [name for name in names if _is_hub_id(name)]


def _extra(extra_sections) -> str:
    if not extra_sections:
        return ""
    items = extra_sections.items() if isinstance(extra_sections, Mapping) else extra_sections
    return "".join(f"\n\n## {title}\n\n{body.strip()}" for title, body in items)


def _sections(sections: list[str]) -> str:
    return "\n\n".join(sections) or "No evaluation reported."


_CONVERSION_KEYS = {"source", "autoencoder_source", "script", "date", "dtype", "source_tensors", "mapped", "tied",
                    "dropped", "checks"}


def _conversion_text(conversion: Mapping[str, Any]) -> str:
    """The facts of a conversion (see `build_model_card`'s `conversion`) as markdown."""
    unknown = set(conversion) - _CONVERSION_KEYS
    if unknown:
        raise ValueError(f"`conversion` has unknown keys {sorted(unknown)}; known: {sorted(_CONVERSION_KEYS)}.")
    source = conversion.get("source") or "the authors' checkpoint"
    also = f" and {conversion['autoencoder_source']}" if conversion.get("autoencoder_source") else ""
    lines = [
        f"Converted from {source}{also} (the authors' release, trained with their code at "
        "github.com/shaochenze/calm) into this package's format: safetensors weights, one config.json (the "
        "autoencoder nested) and the remote code.",
        "",
    ]
    run = [f"script: `{conversion['script']}`" if conversion.get("script") else None,
           f"date: {conversion['date']}" if conversion.get("date") else None,
           f"dtype: {conversion['dtype']}" if conversion.get("dtype") else None]
    if any(run):
        lines.append("- " + ", ".join(item for item in run if item))
    counts = [f"{label}: {conversion[key]:,}" for key, label in
              (("source_tensors", "source tensors"), ("mapped", "mapped"), ("tied", "tied (stored once)"))
              if conversion.get(key) is not None]
    if counts:
        lines.append("- " + "; ".join(counts))
    if conversion.get("dropped") is not None:
        dropped = conversion["dropped"] or {"none": 0}
        lines.append("- dropped on purpose:")
        lines.extend(f"  - {reason}: {count} tensor{'s' * (count != 1)}" if count else f"  - {reason}"
                     for reason, count in dropped.items())
    if conversion.get("checks"):
        lines.append("- " + conversion["checks"].strip())
    return "\n".join(lines)


def _conversion(conversion: str | Mapping[str, Any] | None, license: str) -> str:
    if not conversion:
        return ""
    text = conversion.strip() if isinstance(conversion, str) else _conversion_text(conversion)
    # A converted checkpoint keeps its authors' terms, whatever the `license` field of this card says.
    caveat = (
        f"**Licence.** The `license` field says `{license}`: check it against the authors' release (the licence of "
        "the original repository) before redistributing; a conversion changes the format, not the terms."
    )
    return f"\n## Conversion\n\n{text}\n\n{caveat}\n"


# The card texts: Jinja templates shipped inside the package (package data), rendered by huggingface_hub's
# ModelCard.from_template (jinja2 comes with torch, which requires it).
TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def _render(template: str, data: ModelCardData, **values) -> ModelCard:
    """`ModelCard.from_template` on one of the package's templates; `values` are its variables (the paper's link and
    BibTeX are always there)."""
    path = os.path.join(TEMPLATES_DIR, template)
    return ModelCard.from_template(data, template_path=path, paper_url=CALM_PAPER_URL, bibtex=CALM_BIBTEX, **values)


def build_model_card(
    model_or_config,
    *,
    model_name: str,
    repo_id: str | None = None,
    brier_lm: float | Mapping[str, Any] | None = None,
    autoencoder_accuracy: float | Mapping[str, Any] | None = None,
    training_data: Sequence[str] | str | None = None,
    tokenizer_name: str | None = None,
    tokenizer_license: str | None = None,
    license: str = "apache-2.0",
    base_model: str | list[str] | None = None,
    conversion: str | Mapping[str, Any] | None = None,
    extra_sections: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    language: str | list[str] | None = "en",
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """A model card for a `CalmForCausalLM` (or its `CalmConfig`), with Hub metadata and a model-index.

    Args:
        model_or_config: the model (parameters counted as they are) or its config (built on the meta device).
        model_name: the name in the title and in the model-index.
        repo_id: the Hub id (or path) used in the loading example (default: `REPO_PLACEHOLDER/<model_name>`,
            explained in the card; `push_calm_to_hub` fills in the repo it pushes to).
        brier_lm: BrierLM as a number, or a dict with `brier_lm` and optionally `brier_1`..`brier_4`, `std`,
            `num_seeds`, `num_positions`, and the dataset: `dataset` (Hub id), `dataset_name`, `split`. The result
            of `evaluation_calm.evaluate_brier` (with "mean"/"std"/"seeds") is read as well: pass
            `{**evaluate_brier(...), "dataset": "wikitext", "split": "test"}`. Optional `note` (markdown shown
            under the table, e.g. how the figure was measured) and `metric_config` (the model-index entries' metric
            configuration, e.g. "trainer_eval"); `brier_from_trainer_metrics` builds it from `CalmTrainer` metrics.
        autoencoder_accuracy: token accuracy of the autoencoder in [0, 1]: a number (z sampled) or a dict with
            `sampled` and/or `mean` (and dataset keys as above). A separate model-index result.
        training_data: dataset ids or names; those that look like Hub ids go into the `datasets` metadata.
        tokenizer_name, tokenizer_license: shown in the card (e.g. a Llama-3 tokenizer and its licence).
        license: the licence of the weights (metadata `license`).
        base_model: metadata `base_model` (e.g. the autoencoder's repo, or the original of a conversion).
        conversion: for converted checkpoints, a "Conversion" section: markdown text, or the facts as a dict with
            any of `source`, `autoencoder_source` (Hub ids), `script`, `date`, `dtype`, `source_tensors`, `mapped`,
            `tied` (counts), `dropped` (`{reason: count}`) and `checks` (a sentence on what was verified). Either
            way the section ends by asking the reader to check `license` against the authors' release.
        extra_sections: `{title: markdown}` appended before the citation.
        language, tags: metadata; CALM's tags are always added.

    Returns:
        A `huggingface_hub.ModelCard`; `card.save(path)` or `push_calm_to_hub(..., card=card)`.
    """
    config, model = _config_and_model(model_or_config, "calm")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"`model_name` must be a non-empty string, got {model_name!r}.")
    counts = calm_parameter_counts(model if model is not None else config)
    backbone, k = config.backbone_config, config.patch_size
    brier = _brier_info(brier_lm)
    accuracy = _accuracy_info(autoencoder_accuracy, "autoencoder_accuracy")
    repo, placeholder_note = _repo_and_note(repo_id, model_name)
    data_text, dataset_ids = _data_and_tokenizer(training_data, tokenizer_name, tokenizer_license)

    eval_results = (_brier_results(brier) if brier else []) + (_accuracy_results(accuracy) if accuracy else [])
    data = ModelCardData(
        model_name=model_name, license=license, language=language, library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*CALM_TAGS, f"{config.head_type}-head", *(tags or [])])),
        base_model=base_model, datasets=dataset_ids or None, eval_results=eval_results or None,
    )

    evaluation = []
    if brier:
        evaluation.append(_brier_section(brier))
    if accuracy:
        evaluation.append(
            f"Autoencoder reconstruction on {_dataset_text(accuracy)}:\n\n| | |\n|---|---|\n"
            + "\n".join(_accuracy_rows(accuracy))
        )
    return _render(
        "calm_model_card.md", data, model_name=model_name, k=k, config=config, backbone=backbone, repo=repo,
        backbone_mlp=getattr(backbone, "intermediate_size", "?"),
        backbone_heads=getattr(backbone, "num_attention_heads", "?"),
        params={name: _millions(count) for name, count in counts.items()}, data_text=data_text,
        evaluation=_sections(evaluation), conversion=_conversion(conversion, license), extra=_extra(extra_sections),
        placeholder_note=placeholder_note,
        fluent_temperature=FLUENT_TEMPERATURE, fluent_num_candidates=FLUENT_NUM_CANDIDATES,
    )


def build_autoencoder_card(
    model_or_config,
    *,
    model_name: str,
    repo_id: str | None = None,
    accuracy: float | Mapping[str, Any] | None = None,
    noise_robustness: Mapping[float, float] | None = None,
    training_data: Sequence[str] | str | None = None,
    tokenizer_name: str | None = None,
    tokenizer_license: str | None = None,
    license: str = "apache-2.0",
    base_model: str | list[str] | None = None,
    conversion: str | Mapping[str, Any] | None = None,
    extra_sections: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    language: str | list[str] | None = "en",
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """A model card for a lone `CalmAutoencoder` (or its `CalmAutoencoderConfig`).

    Args:
        accuracy: token accuracy in [0, 1]: a number (z sampled from the posterior) or a dict with `sampled`
            and/or `mean` (z = posterior mean) and the dataset keys `dataset`, `dataset_name`, `split`.
        noise_robustness: `{sigma: accuracy}`: accuracy when Gaussian noise of std sigma is added to z (the
            robustness the language model's head relies on), shown as a table and in the model-index (metric
            configuration `latent_noise_{sigma}`, on the dataset of `accuracy`).
            `accuracy_from_trainer_metrics` builds both from `CalmAutoencoderTrainer` metrics.
        Other arguments: as for `build_model_card`.

    Returns:
        A `huggingface_hub.ModelCard`.
    """
    config, model = _config_and_model(model_or_config, "calm_autoencoder")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"`model_name` must be a non-empty string, got {model_name!r}.")
    if model is None:
        from .modeling_calm_autoencoder import CalmAutoencoder

        with torch.device("meta"):
            model = CalmAutoencoder(config)
    parameters = _count(model)
    info = _accuracy_info(accuracy, "accuracy")
    robustness = {
        _number(sigma, "noise_robustness key"): _number(acc, f"noise_robustness[{sigma}]")
        for sigma, acc in (noise_robustness or {}).items()
    }
    (repo, placeholder_note), k = _repo_and_note(repo_id, model_name), config.patch_size
    data_text, dataset_ids = _data_and_tokenizer(training_data, tokenizer_name, tokenizer_license)
    eval_results = _accuracy_results(info, robustness) if info or robustness else []
    data = ModelCardData(
        model_name=model_name, license=license, language=language, library_name="transformers",
        pipeline_tag="feature-extraction", tags=list(dict.fromkeys([*CALM_TAGS, "autoencoder", *(tags or [])])),
        base_model=base_model, datasets=dataset_ids or None, eval_results=eval_results or None,
    )
    evaluation = []
    if info:
        evaluation.append(f"On {_dataset_text(info)}:\n\n| | |\n|---|---|\n" + "\n".join(_accuracy_rows(info))
                          + _note(info))
    if robustness:
        rows = "\n".join(f"| {sigma:g} | {100 * acc:.3f} % |" for sigma, acc in sorted(robustness.items()))
        evaluation.append(f"Robustness: token accuracy with Gaussian noise of std sigma added to z.\n\n"
                          f"| sigma | token accuracy |\n|---|---|\n{rows}")
    return _render(
        "calm_autoencoder_card.md", data, model_name=model_name, k=k, config=config, repo=repo,
        parameters=_millions(parameters), data_text=data_text, evaluation=_sections(evaluation),
        conversion=_conversion(conversion, license), extra=_extra(extra_sections),
        placeholder_note=placeholder_note,
    )


# ----------------------------------------------------------------------------------------------------------------
# Pushing to the Hub
# ----------------------------------------------------------------------------------------------------------------


def _check_model_folder(folder: str) -> dict:
    """The folder must load with trust_remote_code: config.json with auto_map, and every module it names."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder!r} has no config.json (nor adapter_config.json): not a saved model.")
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    auto_map = config.get("auto_map")
    if not auto_map:
        raise ValueError(
            f"{config_path} has no auto_map, so the repo would not load with trust_remote_code=True: save the model "
            "with the modeling_calm package imported (it registers the classes for remote code)."
        )
    from transformers.dynamic_module_utils import get_relative_imports

    # The modules auto_map names, and every file they import with `from .x import y` (as the remote-code loader
    # follows them), must all be in the folder.
    pending = [
        target.rsplit(".", 1)[0]
        for reference in auto_map.values()
        for target in ([reference] if isinstance(reference, str) else reference)
        if target and "--" not in target  # "org/repo--module.Class" lives in another repo
    ]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = os.path.join(folder, module + ".py")
        if not os.path.isfile(path):
            raise ValueError(f"{module}.py is missing from {folder!r}: the remote code (auto_map) needs it.")
        pending.extend(get_relative_imports(path))
    return config


def _default_card(folder: str, model_type: str | None, repo_id: str) -> ModelCard:
    from .configuration_calm import CalmAutoencoderConfig, CalmConfig

    name = repo_id.split("/")[-1]
    if model_type == "calm":
        return build_model_card(CalmConfig.from_pretrained(folder), model_name=name, repo_id=repo_id)
    if model_type == "calm_autoencoder":
        return build_autoencoder_card(CalmAutoencoderConfig.from_pretrained(folder), model_name=name, repo_id=repo_id)
    raise ValueError(f"No default card for model_type {model_type!r}: pass card=.")


# The files `save_pretrained` writes (model, PEFT adapter, tokenizer) and the card: the only ones pushed from a folder.
PUSHED_FILE_PATTERNS = (
    "config.json", "generation_config.json", "adapter_config.json", "README.md", "*.py", "*.safetensors",
    "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin",
    "tokenizer*.json", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
    "chat_template.*",
)


def push_calm_to_hub(
    folder_or_model,
    repo_id: str,
    *,
    tokenizer=None,
    card: ModelCard | str | None = None,
    private: bool = False,
    commit_message: str = "Upload CALM model, tokenizer and card",
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    validate_card: bool = True,
):
    """Pushes a CALM (or lone autoencoder, or PEFT adapter) with its tokenizer and card to the Hub in one commit.

    Everything goes through `HfApi.create_repo` and `HfApi.create_commit`: the model folder's files (weights,
    `config.json` with `auto_map`, the remote-code `.py` files, `generation_config.json`), the tokenizer's files and
    `README.md` from the card. Only such files are pushed (`PUSHED_FILE_PATTERNS`): the rest of a Trainer
    checkpoint (`optimizer.pt`, `scheduler.pt`, `training_args.bin`, `trainer_state.json`, RNG states) is left out,
    with a warning naming it.

    Args:
        folder_or_model: a folder written by `save_pretrained`, or a model (saved to a temporary folder first).
        repo_id: `"org/name"`.
        tokenizer: a tokenizer (or a folder / id to load one from) whose files are added; optional.
        card: a `ModelCard` (or its text) for README.md. Default: the folder's README.md if it has one, else a
            card from `build_model_card` / `build_autoencoder_card` with no evaluation.
        private: create the repo as private (an existing repo keeps its visibility).
        commit_message, revision, create_pr, token: passed to `create_commit`.
        validate_card: check the card's metadata with the Hub's validator first (`ModelCard.validate`, online).

    Returns:
        The `CommitInfo` of the commit.
    """
    from huggingface_hub import CommitOperationAdd

    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"`repo_id` must look like 'org/name', got {repo_id!r}.")
    with tempfile.TemporaryDirectory() as staging:
        if isinstance(folder_or_model, (str, os.PathLike)):
            folder = os.fspath(folder_or_model)
            if not os.path.isdir(folder):
                raise ValueError(f"{folder!r} is not a folder.")
        else:
            folder = os.path.join(staging, "model")
            folder_or_model.save_pretrained(folder)
        files = {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))
                 if os.path.isfile(os.path.join(folder, name)) and not name.startswith(".")}
        left_out = sorted(n for n in files if not any(fnmatch.fnmatchcase(n, p) for p in PUSHED_FILE_PATTERNS))
        if left_out:  # a Trainer checkpoint's optimizer.pt, training_args.bin, rng_state.pth, ...
            logger.warning(f"Not pushing {left_out} from {folder!r}: only model, tokenizer and card files are pushed.")
            files = {n: path for n, path in files.items() if n not in left_out}
        skipped = [name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))]
        if skipped:
            logger.warning(f"Sub-folders of {folder!r} are not pushed: {sorted(skipped)}.")

        if "adapter_config.json" in files and "config.json" not in files:
            with open(files["adapter_config.json"], encoding="utf-8") as file:
                base = json.load(file).get("base_model_name_or_path")
            if base and os.path.exists(base):
                logger.warning(f"The adapter's base_model_name_or_path is the local path {base!r}: others cannot "
                               "load it. Load the base from its Hub id before get_peft_model, then save again.")
            config = None
        else:
            config = _check_model_folder(folder)

        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            tokenizer_dir = os.path.join(staging, "tokenizer")
            tokenizer.save_pretrained(tokenizer_dir)
            files.update({name: os.path.join(tokenizer_dir, name) for name in os.listdir(tokenizer_dir)})

        if card is None and "README.md" not in files and config is not None:
            card = _default_card(folder, config.get("model_type"), repo_id)
        readme = os.path.join(staging, "README.md")
        if card is not None:
            card = ModelCard(fill_repo_id(str(card), repo_id))  # a card built without repo_id names this repo
            if validate_card:
                card.validate()
            card.save(readme)
            files["README.md"] = readme
        elif "README.md" in files:
            with open(files["README.md"], encoding="utf-8") as file:
                text = file.read()
            if fill_repo_id(text, repo_id) != text:
                with open(readme, "w", encoding="utf-8") as file:
                    file.write(fill_repo_id(text, repo_id))
                files["README.md"] = readme

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path in files.items()]
        logger.info(f"Pushing {len(operations)} files to {repo_id}: {sorted(files)}")
        return api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr,
            repo_type="model",
        )
