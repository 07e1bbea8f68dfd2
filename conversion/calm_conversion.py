"""Conversion of the CALM authors' checkpoints (shaochenze/calm training scripts) into this package's format.

What the authors' scripts save, and what becomes of it (every quirk is handled here, nothing is guessed):

| source (authors)                                   | target (this package)                               |
|----------------------------------------------------|-----------------------------------------------------|
| autoencoder `encoder.encoder_layers.i.*` etc.      | `CalmAutoencoder` names (`AUTOENCODER_KEY_MAP`)      |
| `decoder.lm_head_weight` (== embed_tokens)         | dropped: tied to `encoder.embed_tokens.weight`      |
| odd layer count: the last layer, never run         | dropped; the config gets n - 1 layers               |
| CALM `ae_model.*` (a full copy of the autoencoder) | `autoencoder.*`                                     |
| CALM `transformer.*` (a stock Llama decoder)       | `model.*`                                           |
| CALM `embed_proj.{0,2,3}`                          | `chunk_proj.{in_proj,out_proj,norm}`                |
| CALM `generative_head.*` (energy head)             | `head.*` (`ENERGY_HEAD_KEY_MAP`)                    |
| CALM `mlp_generator.*` (the same head, again)      | dropped after checking it equals `generative_head.*`|
| config.json without `model_type`, stale `ae_path`  | `CalmConfig` with nested autoencoder and Llama      |

The key maps are data: ordered `{regex: replacement}` tables matched in full against each source key, first match
wins, `None` meaning "dropped on purpose" (with the reason in `DROP_REASONS`). The conversion is strict: every
source key is renamed or explicitly dropped, every renamed key must exist in the target model with the same shape,
and every target weight must come from the checkpoint (tied weights excepted); anything else is a `ValueError`
naming the keys. Every tensor read, and every converted tensor (after the dtype cast), must be finite.

A tool, not shipped to the Hub: it may import safetensors and the package. `converted_folder.py` writes the result.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.initialization import no_init_weights
from transformers.utils import logging

from modeling_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmConfig, CalmForCausalLM


logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------------------------
# Key maps (data). Regexes are matched with `fullmatch`; replacements use `\1`-style groups; None = dropped.
# ------------------------------------------------------------------------------------------------------------------

# The authors' `Autoencoder` state dict -> `CalmAutoencoder`.
AUTOENCODER_KEY_MAP: dict[str, str | None] = {
    r"encoder\.embed_tokens\.weight": r"encoder.embed_tokens.weight",
    r"encoder\.encoder_layers\.(\d+)\.layernorm\.weight": r"encoder.layers.\1.norm.weight",
    r"encoder\.encoder_layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight": r"encoder.layers.\1.mlp.\2.weight",
    r"encoder\.squeeze_layer\.(weight|bias)": r"encoder.squeeze_proj.\1",
    r"encoder\.norm\.weight": r"encoder.norm.weight",
    r"encoder\.hidden_to_latent\.(weight|bias)": r"encoder.latent_proj.\1",
    r"decoder\.latent_to_hidden\.(weight|bias)": r"decoder.latent_proj.\1",
    r"decoder\.decoder_layers\.(\d+)\.layernorm\.weight": r"decoder.layers.\1.norm.weight",
    r"decoder\.decoder_layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight": r"decoder.layers.\1.mlp.\2.weight",
    r"decoder\.expand_layer\.(weight|bias)": r"decoder.expand_proj.\1",
    r"decoder\.norm\.weight": r"decoder.norm.weight",
    r"decoder\.lm_head_weight": None,
}

# Source keys that must equal another source key (checked before they are dropped): the decoder's bias-free
# output projection is the encoder's token embedding.
AUTOENCODER_TIED_KEYS: dict[str, str] = {"decoder.lm_head_weight": "encoder.embed_tokens.weight"}

# The authors' energy head (`MLPGenerator`), relative to its prefix -> `CalmEnergyHead`.
ENERGY_HEAD_KEY_MAP: dict[str, str | None] = {
    r"noise_embd\.(weight|bias)": r"noise_proj.\1",
    r"norm_noise\.(weight|bias)": r"noise_norm.\1",
    r"hidden_embd\.(weight|bias)": r"hidden_proj.\1",
    r"norm_hidden\.(weight|bias)": r"hidden_norm.\1",
    r"mlp_blocks\.(\d+)\.in_ln\.(weight|bias)": r"blocks.\1.norm.\2",
    # `linears` is Sequential(Linear, SiLU, Linear, SiLU, Linear): the Linears sit at 0, 2 and 4.
    r"mlp_blocks\.(\d+)\.linears\.0\.(weight|bias)": r"blocks.\1.fc1.\2",
    r"mlp_blocks\.(\d+)\.linears\.2\.(weight|bias)": r"blocks.\1.fc2.\2",
    r"mlp_blocks\.(\d+)\.linears\.4\.(weight|bias)": r"blocks.\1.fc3.\2",
    r"mlp_blocks\.(\d+)\.down_proj\.(weight|bias)": r"blocks.\1.down_proj.\2",
    r"final_layer\.in_ln\.(weight|bias)": r"output.norm.\1",
    r"final_layer\.linears\.0\.(weight|bias)": r"output.fc1.\1",
    r"final_layer\.linears\.2\.(weight|bias)": r"output.fc2.\1",
}

# The submodules an energy head has, and only it: the head type is not saved, so it is read off the keys. The
# flow and diffusion heads of the paper have other layouts, which this converter does not know.
ENERGY_HEAD_MODULES = frozenset({"noise_embd", "norm_noise", "hidden_embd", "norm_hidden", "mlp_blocks", "final_layer"})
HEAD_KEY_MAPS: dict[str, dict[str, str | None]] = {"energy": ENERGY_HEAD_KEY_MAP}

# The head is registered twice in the authors' model: both prefixes hold the same tensors.
HEAD_PREFIX = "generative_head."
DUPLICATE_HEAD_PREFIX = "mlp_generator."
CALM_AUTOENCODER_PREFIX = "ae_model."


def _prefixed(key_map: dict[str, str | None], source: str, target: str) -> dict[str, str | None]:
    return {re.escape(source) + k: (None if v is None else target + v) for k, v in key_map.items()}


def calm_key_map(head_type: str = "energy") -> dict[str, str | None]:
    """The full CALM table for one head type (`ae_model.*`, `transformer.*`, `embed_proj.*`, the head)."""
    return {
        **_prefixed(AUTOENCODER_KEY_MAP, CALM_AUTOENCODER_PREFIX, "autoencoder."),
        # A stock Llama decoder state dict (no lm_head): the names already match transformers' LlamaModel.
        r"transformer\.(.+)": r"model.\1",
        # embed_proj = Sequential(Linear(K*D, 2D), SiLU, Linear(2D, D), LayerNorm(D)).
        r"embed_proj\.0\.(weight|bias)": r"chunk_proj.in_proj.\1",
        r"embed_proj\.2\.(weight|bias)": r"chunk_proj.out_proj.\1",
        r"embed_proj\.3\.(weight|bias)": r"chunk_proj.norm.\1",
        **_prefixed(HEAD_KEY_MAPS[head_type], HEAD_PREFIX, "head."),
        re.escape(DUPLICATE_HEAD_PREFIX) + r".+": None,
    }


# Why each None entry drops its keys (looked up by the same regex).
DROP_REASONS: dict[str, str] = {
    r"decoder\.lm_head_weight": "tied to encoder.embed_tokens.weight (checked equal)",
    re.escape(CALM_AUTOENCODER_PREFIX) + r"decoder\.lm_head_weight":
        "tied to ae_model.encoder.embed_tokens.weight (checked equal)",
    re.escape(DUPLICATE_HEAD_PREFIX) + r".+":
        "second registration of the generative head (checked equal to generative_head.*)",
}
UNUSED_LAYER_REASON = "last layer of an odd layer count: saved but never run by the reference"

# Fields of the authors' configs that are read (everything else is listed as ignored in the report).
AUTOENCODER_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size", "num_encoder_layers",
    "num_decoder_layers", "rms_norm_eps", "hidden_act", "ae_dropout", "kl_clamp", "kl_weight", "initializer_range",
    "pad_token_id", "bos_token_id", "eos_token_id",
)
LLAMA_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "attention_bias", "attention_dropout", "mlp_bias", "pad_token_id", "bos_token_id", "eos_token_id",
)
CALM_CONFIG_FIELDS = ("patch_size", "latent_size", "noise_size", "num_mlp_layers", "num_samples", "beta")
# Not copied as they are: read specially (rope_theta/rope_scaling -> rope_parameters, mlp_bias checked) or
# bookkeeping of the authors' transformers 4.43 run (ae_path is a stale absolute path on their machine).
NOT_COPIED_CONFIG_FIELDS = (
    "architectures", "ae_path", "torch_dtype", "transformers_version", "use_cache", "tie_word_embeddings",
    "pretraining_tp", "rope_theta", "rope_scaling", "max_position_embeddings", "mlp_bias", "_name_or_path",
)
# Every LayerNorm of the authors' head and embed_proj uses this eps, whatever their config says.
REFERENCE_HEAD_NORM_EPS = 1e-6

WEIGHT_FILES = (  # in order of preference, as transformers' from_pretrained
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
)


# ------------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ------------------------------------------------------------------------------------------------------------------

def read_json(path: str | Path) -> dict:
    """A JSON object from `path`, with a `ValueError` naming the file if it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Expected a JSON file at {path}, found none.")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Could not parse {path} as JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}.")
    return value


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            try:  # mmap keeps multi-GB checkpoints out of memory until each tensor is copied into the model
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:  # torch.load / safetensors raise many types (UnpicklingError, BadZipFile, ...)
        raise ValueError(f"Could not read checkpoint file {path}: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Checkpoint file {path} does not hold a state dict (a mapping of names to tensors).")
    return dict(state)


def check_finite(named_tensors, source: str) -> None:
    """Every floating tensor must be finite: a `ValueError` naming (up to 10 of) those holding NaN or infinity."""
    bad = [name for name, t in named_tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"{source} holds non-finite values (NaN or infinity) in {len(bad)} tensor(s): {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}. Refusing to convert a diverged or corrupted checkpoint."
        )


def load_state_dict(folder: str | Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of a checkpoint folder: single or sharded `.safetensors` or `pytorch_model.bin`.

    Returns:
        `(state_dict, files_read)`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Checkpoint folder {folder} does not exist.")
    name = next((n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        raise ValueError(f"No weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}.")
    path = folder / name
    if not name.endswith(".index.json"):
        state = _load_weight_file(path)
        check_finite(state.items(), f"Checkpoint {path}")
        return state, [path]

    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path} has no `weight_map` (tensor name -> shard file).")
    shards: dict[str, set[str]] = defaultdict(set)
    for key, shard in weight_map.items():
        shards[shard].add(key)
    state: dict[str, torch.Tensor] = {}
    files = [path]
    for shard, expected in sorted(shards.items()):
        shard_path = folder / shard
        if not shard_path.is_file():
            raise ValueError(f"Shard {shard_path} listed in {path} does not exist.")
        tensors = _load_weight_file(shard_path)
        if set(tensors) != expected:
            raise ValueError(
                f"Shard {shard_path} does not hold what {path} lists: missing {sorted(expected - set(tensors))}, "
                f"unlisted {sorted(set(tensors) - expected)}."
            )
        check_finite(tensors.items(), f"Checkpoint shard {shard_path}")
        state.update(tensors)
        files.append(shard_path)
    return state, files


# ------------------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------------------

def _require(config: dict, names, source: str) -> None:
    missing = [n for n in names if n not in config]
    if missing:
        raise ValueError(f"{source} lacks the field(s) {missing}, needed to build the converted config.")


def autoencoder_config_from_original(original: dict, source: str = "autoencoder config.json") -> tuple[
    CalmAutoencoderConfig, dict[str, int]
]:
    """`CalmAutoencoderConfig` from the authors' autoencoder config.json.

    Returns:
        `(config, unused_layers)`: `unused_layers` maps "encoder"/"decoder" to the index of a layer the reference
        never runs (odd layer counts), whose weights the conversion drops.
    """
    _require(original, ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size",
                        "num_encoder_layers", "num_decoder_layers"), source)
    values = {n: original[n] for n in AUTOENCODER_CONFIG_FIELDS if n in original}
    if original.get("mlp_bias"):
        raise ValueError(f"{source} has mlp_bias=true; the CALM autoencoder's MLPs have no bias.")
    unused_layers = {}
    for part in ("encoder", "decoder"):
        name = f"num_{part}_layers"
        count = int(values[name])
        if count % 2:
            # Half of the blocks run before the squeeze (expansion) and as many after: an odd last one never runs.
            unused_layers[part] = count - 1
            values[name] = count - 1
    values["tie_word_embeddings"] = True  # the authors tie by hand (`lm_head_weight`); the config says false
    return CalmAutoencoderConfig(**values), unused_layers


def backbone_config_from_original(original: dict, source: str = "CALM config.json") -> dict:
    """The Llama backbone config (a dict for `CalmConfig(backbone_config=...)`) from the authors' CALM config."""
    _require(original, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
             source)
    values = {"model_type": "llama", "tie_word_embeddings": False}
    values.update({n: original[n] for n in LLAMA_CONFIG_FIELDS if n in original})
    # transformers 5 takes RoPE as `rope_parameters` (rope_theta inside); 4.x configs had rope_theta + rope_scaling.
    rope = {"rope_type": "default"}
    scaling = original.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        rope["rope_type"] = scaling.pop("rope_type", scaling.pop("type", "default"))
        rope.update(scaling)
    rope["rope_theta"] = float(original.get("rope_theta", 10000.0))
    values["rope_parameters"] = rope
    return values


def calm_config_from_original(
    original: dict,
    autoencoder_config: CalmAutoencoderConfig,
    head_type: str,
    source: str = "CALM config.json",
    autoencoder_source: str = "autoencoder config.json",
) -> CalmConfig:
    """`CalmConfig` from the authors' CALM config.json and the (converted) autoencoder config."""
    for name in ("patch_size", "latent_size", "vocab_size"):
        if name in original and original[name] != getattr(autoencoder_config, name):
            raise ValueError(
                f"{name} differs between {source} ({original[name]}) and {autoencoder_source} "
                f"({getattr(autoencoder_config, name)}): the CALM must be converted with the autoencoder it was "
                "trained with."
            )
    calm_values = {n: original[n] for n in CALM_CONFIG_FIELDS if n in original}
    missing = [n for n in CALM_CONFIG_FIELDS if n not in original]
    if missing:  # the shapes of noise_size / num_mlp_layers are still checked against the weights
        logger.warning(f"{source} lacks {missing}: CalmConfig's defaults (the paper's values) are used.")
    return CalmConfig(
        autoencoder_config=autoencoder_config.to_dict(),
        backbone_config=backbone_config_from_original(original, source),
        head_type=head_type,
        head_norm_eps=REFERENCE_HEAD_NORM_EPS,
        **calm_values,
    )


def ignored_config_fields(original: dict, used: tuple[str, ...]) -> list[str]:
    """Fields neither read nor known bookkeeping (reported, so nothing disappears silently)."""
    return sorted(set(original) - set(used) - set(NOT_COPIED_CONFIG_FIELDS))


def infer_head_type(state_dict: dict[str, torch.Tensor]) -> tuple[str, str]:
    """The head type and the prefix it is saved under, read off the keys (the authors' config does not say)."""
    prefix = next((p for p in (HEAD_PREFIX, DUPLICATE_HEAD_PREFIX) if any(k.startswith(p) for k in state_dict)), None)
    if prefix is None:
        top = sorted({k.split(".", 1)[0] for k in state_dict})
        raise ValueError(
            f"No generative head in the CALM checkpoint: no key starts with {HEAD_PREFIX!r} or "
            f"{DUPLICATE_HEAD_PREFIX!r}; top-level names seen: {top}."
        )
    modules = {k[len(prefix):].split(".", 1)[0] for k in state_dict if k.startswith(prefix)}
    if modules == ENERGY_HEAD_MODULES:
        return "energy", prefix
    # One key per submodule seen, e.g. generative_head.time_embed.weight.
    examples = sorted({k[len(prefix):].split(".", 1)[0]: k for k in state_dict if k.startswith(prefix)}.values())
    raise ValueError(
        f"Cannot infer the head type from the keys under {prefix!r}: saw the submodules {sorted(modules)} (keys "
        f"such as {examples}), while an energy head has exactly {sorted(ENERGY_HEAD_MODULES)}. Only the energy "
        "head's layout is known to this converter (the flow and diffusion heads of the paper are not)."
    )


# ------------------------------------------------------------------------------------------------------------------
# Renaming and checking
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class ConversionReport:
    """What a conversion did, for the printed summary and the model card."""

    source_files: list[str] = field(default_factory=list)
    source_keys: int = 0
    mapped: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> source keys
    tied: dict[str, str] = field(default_factory=dict)  # target key -> the target key it shares storage with
    dtype: str = "float32"
    head_type: str | None = None
    parameters: dict[str, int] = field(default_factory=dict)
    ignored_config_fields: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    check: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        lines = [
            f"source files       : {', '.join(self.source_files)}",
            f"source tensors     : {self.source_keys}",
            f"mapped             : {self.mapped}",
            f"dropped            : {sum(len(v) for v in self.dropped.values())}",
        ]
        for reason, keys in self.dropped.items():
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} keys)" if len(keys) > 3 else "")
            lines.append(f"  - {reason}: {shown}")
        lines.append(f"tied               : {', '.join(f'{k} -> {v}' for k, v in self.tied.items()) or 'none'}")
        lines.append(f"dtype              : {self.dtype}")
        if self.head_type:
            lines.append(f"head type          : {self.head_type} (inferred from the keys)")
        for name, count in self.parameters.items():
            lines.append(f"parameters, {name:<12}: {count:,}")
        for source, names in self.ignored_config_fields.items():
            if names:
                lines.append(f"ignored fields of {source}: {names}")
        lines.extend(f"note: {n}" for n in self.notes)
        for name, value in self.check.items():
            lines.append(f"reload check, {name}: max |diff| = {value:g}")
        return "\n".join(lines)


def rename_state_dict(
    state_dict: dict[str, torch.Tensor],
    key_map: dict[str, str | None],
    drop_prefixes: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, list[str]], list[str]]:
    """Apply a key table to a source state dict.

    Args:
        state_dict: source tensors.
        key_map: `{regex: replacement or None}`, matched in full, first match wins.
        drop_prefixes: `{prefix: reason}` for keys dropped before the table (e.g. an unused layer).
    Returns:
        `(renamed, origin, dropped, unmatched)`: target key -> tensor, target key -> source key,
        reason -> dropped source keys, and the source keys no entry matched.
    """
    table = [(re.compile(pattern), replacement, pattern) for pattern, replacement in key_map.items()]
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: dict[str, list[str]] = defaultdict(list)
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        prefix = next((p for p in (drop_prefixes or {}) if key.startswith(p)), None)
        if prefix is not None:
            dropped[drop_prefixes[prefix]].append(key)
            continue
        for pattern, replacement, source_pattern in table:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if replacement is None:
                dropped[DROP_REASONS.get(source_pattern, f"dropped by {source_pattern}")].append(key)
            else:
                target = match.expand(replacement)
                if target in origin:
                    raise ValueError(f"Source keys {origin[target]!r} and {key!r} both map to {target!r}.")
                renamed[target] = tensor
                origin[target] = key
            break
        else:
            unmatched.append(key)
    return renamed, origin, dict(dropped), unmatched


def check_tied(state_dict: dict[str, torch.Tensor], tied: dict[str, str], prefix: str = "") -> None:
    """Each `prefix + key` must equal `prefix + source` exactly (a tie the target format stores once)."""
    for key, source in tied.items():
        key, source = prefix + key, prefix + source
        if key not in state_dict or source not in state_dict:
            continue  # absent keys are reported by the strict key check
        a, b = state_dict[key], state_dict[source]
        if a.shape != b.shape or not torch.equal(a, b):
            diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else "shapes differ"
            raise ValueError(
                f"{key!r} must equal {source!r} (this package ties them and stores one copy), but they differ "
                f"(shapes {tuple(a.shape)} / {tuple(b.shape)}, max |diff| {diff})."
            )


def check_duplicate_prefix(state_dict: dict[str, torch.Tensor], duplicate: str, original: str) -> None:
    """Every `duplicate*` key must have an `original*` twin holding an equal tensor, and vice versa."""
    dup = {k[len(duplicate):] for k in state_dict if k.startswith(duplicate)}
    if not dup:
        return
    orig = {k[len(original):] for k in state_dict if k.startswith(original)}
    if dup != orig:
        raise ValueError(
            f"{duplicate}* and {original}* must hold the same keys (one head registered twice); only under "
            f"{duplicate}: {sorted(dup - orig)}, only under {original}: {sorted(orig - dup)}."
        )
    differ = [k for k in sorted(dup) if not torch.equal(state_dict[duplicate + k], state_dict[original + k])]
    if differ:
        raise ValueError(
            f"{duplicate}* must equal {original}* (the same head registered twice), but these differ: "
            f"{[duplicate + k for k in differ]}."
        )


def tied_target_keys(model: torch.nn.Module) -> dict[str, str]:
    """Target keys that share storage with an earlier key of the state dict (they are not read from the source)."""
    first: dict[int, str] = {}
    tied = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        ident = id(tensor)
        if ident in first:
            tied[key] = first[ident]
        else:
            first[ident] = key
    return tied


def check_against_target(
    renamed: dict[str, torch.Tensor],
    origin: dict[str, str],
    unmatched: list[str],
    model: torch.nn.Module,
) -> dict[str, str]:
    """Strict check of renamed keys against the target model; returns its tied keys.

    Raises:
        ValueError naming every missing, unexpected (unmatched or renamed to an unknown name) and mis-shaped key.
    """
    target = model.state_dict()
    tied = tied_target_keys(model)
    expected = {k: v.shape for k, v in target.items() if k not in tied}
    problems = []
    missing = sorted(set(expected) - set(renamed))
    if missing:
        problems.append(f"missing from the checkpoint (target names): {missing}")
    unexpected = sorted(unmatched) + sorted(origin[k] for k in renamed if k not in expected)
    if unexpected:
        problems.append(f"unexpected in the checkpoint (source names): {unexpected}")
    mismatched = [
        f"{origin[k]} -> {k}: {tuple(renamed[k].shape)} vs {tuple(expected[k])}"
        for k in renamed
        if k in expected and renamed[k].shape != expected[k]
    ]
    if mismatched:
        problems.append(f"wrong shapes (source -> target: checkpoint vs model): {mismatched}")
    if problems:
        raise ValueError("The checkpoint does not match the converted model's layout:\n  " + "\n  ".join(problems))
    return tied


def _load_into(model: torch.nn.Module, renamed: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    result = model.load_state_dict(renamed, strict=False)
    if set(result.missing_keys) - set(tied) or result.unexpected_keys:  # guarded by check_against_target
        raise ValueError(f"Loading failed: missing {result.missing_keys}, unexpected {result.unexpected_keys}.")
    model.tie_weights()
    for key, source in tied.items():
        if model.get_parameter(key) is not model.get_parameter(source):
            raise ValueError(f"{key} is not tied to {source} after loading.")


def _parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    def count(module):
        return sum(p.numel() for p in module.parameters())

    if isinstance(model, CalmForCausalLM):
        counts = {"total": count(model), "autoencoder": count(model.autoencoder)}
        counts["calm"] = counts["total"] - counts["autoencoder"]  # what the paper's table reports
        counts.update(backbone=count(model.model), chunk_proj=count(model.chunk_proj), head=count(model.head))
        return counts
    return {"total": count(model)}


def _build(model_class, config):
    # Every weight is overwritten by the checkpoint (the strict check guarantees it): skip the random init.
    with no_init_weights():
        model = model_class(config)
    model.tie_weights()  # no_init_weights also skips the tying done in post_init
    return model


def _unused_layer_prefixes(unused_layers: dict[str, int], prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{part}.{part}_layers.{index}.": UNUSED_LAYER_REASON for part, index in unused_layers.items()}


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}.")
    return dtypes[name]


# ------------------------------------------------------------------------------------------------------------------
# Conversions
# ------------------------------------------------------------------------------------------------------------------

def convert_autoencoder(
    autoencoder_dir: str | Path, dtype: str = "float32"
) -> tuple[CalmAutoencoder, ConversionReport]:
    """Convert the authors' autoencoder folder (config.json + weights) into a `CalmAutoencoder` (eval mode).

    Args:
        autoencoder_dir: folder with the authors' `config.json` and weights (`pytorch_model.bin` or safetensors,
            sharded or not).
        dtype: "float32" or "bfloat16", the dtype of the converted weights.
    """
    torch_dtype = _dtype(dtype)
    folder = Path(autoencoder_dir)
    original = read_json(folder / "config.json")
    config, unused_layers = autoencoder_config_from_original(original, str(folder / "config.json"))
    state, files = load_state_dict(folder)
    check_tied(state, AUTOENCODER_TIED_KEYS)
    renamed, origin, dropped, unmatched = rename_state_dict(
        state, AUTOENCODER_KEY_MAP, _unused_layer_prefixes(unused_layers)
    )
    model = _build(CalmAutoencoder, config)
    tied = check_against_target(renamed, origin, unmatched, model)
    _load_into(model, renamed, tied)
    model.to(torch_dtype).eval()
    check_finite(model.state_dict().items(), f"The converted model ({dtype})")
    report = ConversionReport(
        source_files=[str(f) for f in files], source_keys=len(state), mapped=len(renamed), dropped=dropped,
        tied=tied, dtype=dtype, parameters=_parameter_counts(model),
        ignored_config_fields={"autoencoder config.json": ignored_config_fields(original, AUTOENCODER_CONFIG_FIELDS)},
    )
    if unused_layers:
        report.notes.append(f"odd layer counts: converted with {unused_layers} as the (dropped) unused layer index")
    return model, report


def _with_autoencoder_weights(
    state: dict[str, torch.Tensor], autoencoder_dir: Path, allow_mismatch: bool
) -> tuple[dict[str, torch.Tensor], list[Path], list[str]]:
    """The CALM state dict with its `ae_model.*` autoencoder: the CALM's own copy (what the reference runs after
    `from_pretrained`), checked against the autoencoder folder's weights; or those weights when there is no copy.

    Returns:
        `(state, files_read, notes)`.
    """
    prefix = CALM_AUTOENCODER_PREFIX
    copy = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any((autoencoder_dir / n).is_file() for n in WEIGHT_FILES):
        if not copy:
            raise ValueError(
                f"No autoencoder weights: the CALM checkpoint has no {prefix}* keys and {autoencoder_dir} holds no "
                f"weights ({', '.join(WEIGHT_FILES)})."
            )
        return state, [], [f"autoencoder weights: the CALM's {prefix}* copy ({autoencoder_dir} has only a config)"]
    ae_state, files = load_state_dict(autoencoder_dir)
    check_tied(ae_state, AUTOENCODER_TIED_KEYS)
    if not copy:
        state = {**state, **{prefix + k: v for k, v in ae_state.items()}}
        return state, files, [f"no {prefix}* copy in the CALM checkpoint: autoencoder weights from {autoencoder_dir}"]
    differ = sorted(
        k for k in set(copy) | set(ae_state)
        if k not in copy or k not in ae_state or copy[k].shape != ae_state[k].shape
        or not torch.equal(copy[k], ae_state[k].to(copy[k].dtype))
    )
    if differ and not allow_mismatch:
        raise ValueError(
            f"The autoencoder in {autoencoder_dir} differs from the CALM's own copy ({prefix}*) in "
            f"{differ[:10]}{' ...' if len(differ) > 10 else ''}: is it the autoencoder this CALM was trained with? "
            "Pass allow_autoencoder_mismatch to convert with the CALM's copy anyway."
        )
    if differ:
        return state, files, [f"the autoencoder folder differs from the CALM's copy in {len(differ)} tensors; "
                              "used the copy"]
    return state, files, ["the CALM's autoencoder copy equals the autoencoder folder's weights"]


def convert_calm(
    calm_dir: str | Path,
    autoencoder_dir: str | Path,
    dtype: str = "float32",
    allow_autoencoder_mismatch: bool = False,
) -> tuple[CalmForCausalLM, ConversionReport]:
    """Convert the authors' CALM folder (plus their autoencoder folder) into a `CalmForCausalLM` (eval mode).

    The autoencoder's hyper-parameters come from `autoencoder_dir/config.json` (the CALM config does not repeat
    them, and its `ae_path` is a stale absolute path). Its weights come from the CALM checkpoint's own `ae_model.*`
    copy, the one the reference runs; when `autoencoder_dir` has weights too they must be equal to that copy.

    Args:
        calm_dir: the authors' CALM folder (config.json + weights).
        autoencoder_dir: the authors' autoencoder folder (config.json, weights optional if the CALM has a copy).
        dtype: "float32" or "bfloat16".
        allow_autoencoder_mismatch: convert even if the two autoencoder copies differ (the CALM's copy is used).
    """
    torch_dtype = _dtype(dtype)
    calm_dir, autoencoder_dir = Path(calm_dir), Path(autoencoder_dir)
    calm_original = read_json(calm_dir / "config.json")
    ae_original = read_json(autoencoder_dir / "config.json")
    ae_config, unused_layers = autoencoder_config_from_original(ae_original, str(autoencoder_dir / "config.json"))
    state, files = load_state_dict(calm_dir)
    head_type, head_prefix = infer_head_type(state)
    config = calm_config_from_original(
        calm_original, ae_config, head_type, str(calm_dir / "config.json"), str(autoencoder_dir / "config.json")
    )
    check_tied(state, AUTOENCODER_TIED_KEYS, prefix=CALM_AUTOENCODER_PREFIX)
    state, ae_files, notes = _with_autoencoder_weights(state, autoencoder_dir, allow_autoencoder_mismatch)
    files += ae_files

    if head_prefix == HEAD_PREFIX:
        check_duplicate_prefix(state, DUPLICATE_HEAD_PREFIX, HEAD_PREFIX)
        key_map = calm_key_map(head_type)
    else:  # only the second registration was saved: read the head from it
        duplicate = re.escape(DUPLICATE_HEAD_PREFIX)
        key_map = {k: v for k, v in calm_key_map(head_type).items() if not k.startswith(duplicate)}
        key_map.update(_prefixed(HEAD_KEY_MAPS[head_type], DUPLICATE_HEAD_PREFIX, "head."))
    renamed, origin, dropped, unmatched = rename_state_dict(
        state, key_map, _unused_layer_prefixes(unused_layers, CALM_AUTOENCODER_PREFIX)
    )
    model = _build(CalmForCausalLM, config)
    tied = check_against_target(renamed, origin, unmatched, model)
    _load_into(model, renamed, tied)
    model.to(torch_dtype).eval()
    check_finite(model.state_dict().items(), f"The converted model ({dtype})")
    if unused_layers:
        notes.append(f"odd autoencoder layer counts: dropped the unused layer index {unused_layers}")

    report = ConversionReport(
        source_files=[str(f) for f in files], source_keys=len(state), mapped=len(renamed), dropped=dropped,
        tied=tied, dtype=dtype, head_type=head_type, parameters=_parameter_counts(model),
        ignored_config_fields={
            "CALM config.json": ignored_config_fields(calm_original, LLAMA_CONFIG_FIELDS + CALM_CONFIG_FIELDS),
            "autoencoder config.json": ignored_config_fields(ae_original, AUTOENCODER_CONFIG_FIELDS),
        },
        notes=notes,
    )
    return model, report
