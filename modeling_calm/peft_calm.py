"""PEFT adapters (LoRA, IA3, LoHa, ...) for CALM: which linear layers they may touch, as a ready `PeftConfig`.

Not shipped to the Hub (the modeling files never import it); needs `peft` (a core dependency of the package).

The parts a PEFT method may adapt (everything but the frozen autoencoder):

| part (`target=`) | modules (names inside `CalmForCausalLM`) |
|---|---|
| `attention` | `model.layers.N.self_attn.{q,k,v,o}_proj` |
| `mlp` | `model.layers.N.mlp.{gate,up,down}_proj` |
| `compression` | `chunk_proj.{in,out}_proj` (K token embeddings -> one backbone input) |
| `head` | energy head: `head.{noise,hidden}_proj`, `head.blocks.N.{fc1,fc2,fc3,down_proj}`, `head.output.{fc1,fc2}`; |
| | flow head: `head.{input,hidden}_proj`, `head.time_proj.{0,2}`, `head.blocks.N.{fc1,fc2,modulation}`, |
| | `head.output.{fc1,fc2}` |

`backbone` = attention + mlp + compression, `all` = every part. The autoencoder is never a target: its latent space
is what the head was trained to predict, so changing it would silently invalidate the head and every BrierLM
number. The target modules are written as one regular expression that PEFT matches against the *full* module name
(`re.fullmatch`), anchored at the top of the model, so the autoencoder's own `gate_proj`/`down_proj` cannot match;
`exclude_modules` says it a second time where the method supports it.

The backbone patterns use the Llama names, shared by Mistral, Qwen2/3, Gemma and most decoder families;
`calm_targetable_modules(model)` lists what a pattern selects in a given model and warns when a part selects
nothing (a backbone family with other names).

Typical use:

    from peft import get_peft_model
    model = get_peft_model(CalmForCausalLM.from_pretrained("runs/calm"), calm_lora_config(r=8))
    ... train (CalmTrainer or transformers.Trainer) ...
    model.save_pretrained("runs/calm-lora")            # adapter_config.json + adapter_model.safetensors
    merged = model.merge_and_unload()                  # a plain CalmForCausalLM
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Part -> regular expression over module names of CalmForCausalLM (no anchors: PEFT uses re.fullmatch).
CALM_PEFT_PARTS: dict[str, str] = {
    "attention": r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "mlp": r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    "compression": r"chunk_proj\.(in_proj|out_proj)",
    "head": (
        # time_proj is Sequential(Linear, SiLU, Linear): only its entries 0 and 2 are layers PEFT can adapt.
        r"head\.(noise_proj|hidden_proj|input_proj|time_proj\.[02]"
        r"|blocks\.\d+\.(fc1|fc2|fc3|down_proj|modulation)|output\.(fc1|fc2))"
    ),
}
CALM_PEFT_ALIASES: dict[str, tuple[str, ...]] = {
    "backbone": ("attention", "mlp", "compression"),
    "all": tuple(CALM_PEFT_PARTS),
}
# Never adapted (see the module docstring).
CALM_PEFT_EXCLUDE = r"autoencoder(\..*)?"
# IA3 scales the *input* of "feed-forward" layers and the output of the others; the down projections (whose
# input is the gated hidden of an MLP) are the feed-forward ones, as in PEFT's own Llama defaults.
_FEEDFORWARD = r"model\.layers\.\d+\.mlp\.down_proj|head\.blocks\.\d+\.down_proj"

# Methods checked on CALM (tests/test_peft_calm.py): get_peft_model, training, save/reload and merge_and_unload.
CALM_PEFT_METHODS: dict[str, str] = {
    "lora": "LoraConfig",  # DoRA: method="lora", use_dora=True
    "ia3": "IA3Config",
    "loha": "LoHaConfig",
    "lokr": "LoKrConfig",
    "vera": "VeraConfig",
    "boft": "BOFTConfig",
    "oft": "OFTConfig",
    "fourierft": "FourierFTConfig",
    "hra": "HRAConfig",
    "vblora": "VBLoRAConfig",
}


def _parts(target: str) -> list[str]:
    if not isinstance(target, str) or not target:
        raise ValueError(f"`target` must be a non-empty string such as 'backbone+head', got {target!r}.")
    parts: list[str] = []
    for word in target.split("+"):
        word = word.strip()
        expanded = CALM_PEFT_ALIASES.get(word, (word,))
        for part in expanded:
            if part not in CALM_PEFT_PARTS:
                raise ValueError(
                    f"Unknown PEFT target {word!r} in {target!r}: join parts {sorted(CALM_PEFT_PARTS)} or aliases "
                    f"{sorted(CALM_PEFT_ALIASES)} with '+'. The autoencoder is never a target."
                )
            if part not in parts:
                parts.append(part)
    return parts


def calm_target_modules(target: str = "backbone+head") -> str:
    """The regular expression (for `re.fullmatch`, as PEFT uses a string `target_modules`) selecting `target`.

    Args:
        target: parts joined with "+": `attention`, `mlp`, `compression`, `head`, or the aliases `backbone`
            (attention + mlp + compression) and `all`.

    Returns:
        A regex such as `model\\.layers\\.\\d+\\.self_attn\\.(q_proj|...)|...|head\\.(...)`.
    """
    return "|".join(f"({CALM_PEFT_PARTS[part]})" for part in _parts(target))


def calm_targetable_modules(model: nn.Module, target: str = "backbone+head") -> list[str]:
    """Names of the modules of a CALM that `target` selects: exactly what a PEFT method will adapt.

    Args:
        model: a `CalmForCausalLM` (a `PeftModel` around one is unwrapped first).
        target: as for `calm_target_modules`.

    Returns:
        Module names in model order, e.g. `["model.layers.0.self_attn.q_proj", ..., "head.output.fc2"]`.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    parts = _parts(target)
    names = [name for name, _ in model.named_modules()]
    selected: list[str] = []
    for part in parts:
        matches = [name for name in names if re.fullmatch(CALM_PEFT_PARTS[part], name)]
        if not matches:
            backbone = getattr(getattr(model, "config", None), "backbone_config", None)
            logger.warning(
                f"The PEFT target part {part!r} selects no layer of this model (backbone "
                f"{getattr(backbone, 'model_type', '?')!r}): its layers use other names; pass your own "
                "`target_modules` to peft instead."
            )
        selected.extend(matches)
    chosen = set(selected)
    return [name for name in names if name in chosen]


def calm_peft_config(method: str = "lora", target: str = "backbone+head", **kwargs: Any):
    """A PEFT config of `method` for a CALM: `task_type="CAUSAL_LM"`, the `target` layers, never the autoencoder.

    Args:
        method: one of `CALM_PEFT_METHODS` (`"lora"`, `"ia3"`, `"loha"`, `"lokr"`, `"vera"`, `"boft"`, `"oft"`,
            `"fourierft"`, `"hra"`, `"vblora"`).
        target: the parts to adapt, see `calm_target_modules`.
        **kwargs: passed on to the method's config class (`r`, `lora_alpha`, `use_dora`, `modules_to_save`, ...).
            `target_modules`, `exclude_modules` and `task_type` are set here and may not be given.

    Returns:
        A `peft.PeftConfig` for `peft.get_peft_model(model, config)`.
    """
    import peft

    if method not in CALM_PEFT_METHODS:
        raise ValueError(f"`method` must be one of {sorted(CALM_PEFT_METHODS)}, got {method!r}.")
    for fixed in ("target_modules", "exclude_modules", "task_type"):
        if fixed in kwargs:
            raise ValueError(
                f"`{fixed}` is set by calm_peft_config (pick layers with target=, e.g. 'attention+head'); "
                f"build a `peft.{CALM_PEFT_METHODS[method]}` yourself for anything else."
            )
    for name in kwargs.get("modules_to_save") or ():
        if re.fullmatch(CALM_PEFT_EXCLUDE, name) or name.startswith("autoencoder"):
            raise ValueError(f"`modules_to_save` contains {name!r}: the autoencoder of a CALM stays frozen.")
    config_class = getattr(peft, CALM_PEFT_METHODS[method])
    fields = getattr(config_class, "__dataclass_fields__", {})
    values: dict[str, Any] = dict(task_type="CAUSAL_LM", target_modules=calm_target_modules(target))
    if "exclude_modules" in fields:  # VeRA has no exclude_modules; the anchored regex alone keeps it off the AE
        values["exclude_modules"] = CALM_PEFT_EXCLUDE
    if method == "ia3" and "feedforward_modules" not in kwargs:
        values["feedforward_modules"] = _FEEDFORWARD
    values.update(kwargs)
    return config_class(**values)


def calm_lora_config(
    r: int = 8, alpha: int = 16, dropout: float = 0.0, target: str = "backbone+head", **kwargs: Any
):
    """A `peft.LoraConfig` for a CALM (see `calm_peft_config`).

    Args:
        r: rank of the update `B @ A`.
        alpha: `lora_alpha`; the update is scaled by `alpha / r`.
        dropout: `lora_dropout` on the adapter's input.
        target: the parts to adapt (default: the backbone with its input compression, and the head).
        **kwargs: other `LoraConfig` fields (`use_dora`, `use_rslora`, `modules_to_save`, `init_lora_weights`...).

    Returns:
        A `peft.LoraConfig` with `task_type="CAUSAL_LM"`.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"`r` must be an integer >= 1, got {r!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be a probability in [0, 1), got {dropout!r}.")
    return calm_peft_config("lora", target, r=r, lora_alpha=alpha, lora_dropout=dropout, **kwargs)
