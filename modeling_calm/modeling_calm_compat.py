"""What the installed transformers can do, detected once: the one place that knows about library differences.

The shipped files run as remote code on whatever transformers release a user has (the package allows
``transformers>=5.17,<6``), so they never compare version strings. They ask this module instead, which inspects
the library's own classes and signatures at import:

- the name of the KV-cache field in model outputs (``past_key_values`` up to 5.23, ``cache`` from 5.24, whose
  ``ModelOutput`` rewrites the old keyword and warns on the old attribute);
- the keyword a backbone's ``forward`` takes for its cache (the same rename, decided per backbone class, since a
  family may lag behind Llama).

When neither name is found, a future rename would otherwise fail deep inside a forward or, worse, run without a
cache: the checks here raise at once, naming the transformers version and the missing capability.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast


__all__ = [
    "CACHE_NAMES",
    "OUTPUT_CACHE_FIELD",
    "MissingCapabilityError",
    "backbone_cache_kwarg",
    "cache_kwargs",
    "detect_output_cache_field",
    "output_cache",
    "with_cache_field",
]

# Names transformers has used for the KV cache, newest first.
CACHE_NAMES = ("cache", "past_key_values")


class MissingCapabilityError(RuntimeError):
    """The installed transformers lacks something the shipped CALM code needs (raised early, never silently)."""


def _missing(what: str) -> MissingCapabilityError:
    return MissingCapabilityError(
        f"CALM could not find {what} in transformers {transformers.__version__}. This release is outside what the "
        f"CALM code was written for; install a release in the supported range (transformers>=5.17,<6) or a newer "
        f"copy of the model's code."
    )


def detect_output_cache_field(output_class: type = BaseModelOutputWithPast) -> str:
    """The name of the KV-cache field of a transformers output dataclass; raises if it has neither name."""
    names = {field.name for field in dataclasses.fields(output_class)}
    for name in CACHE_NAMES:
        if name in names:
            return name
    raise _missing(
        f"a KV-cache field ({' or '.join(CACHE_NAMES)}) in {output_class.__name__} (fields: {sorted(names)})"
    )


#: Field name of the KV cache in this transformers' ``ModelOutput`` classes.
OUTPUT_CACHE_FIELD = detect_output_cache_field()


def with_cache_field(cls: type) -> type:
    """Class decorator, applied under ``@dataclass``: rename a ``past_key_values`` field to ``OUTPUT_CACHE_FIELD``.

    An output dataclass written with ``past_key_values`` then has the field transformers' own outputs have, so
    ``ModelOutput``'s keyword rewriting (5.24+) finds the field it expects and ``out.past_key_values`` keeps
    working on every release (as a field, or as transformers' alias property).
    """
    old = "past_key_values"
    if OUTPUT_CACHE_FIELD == old or old not in cls.__dict__.get("__annotations__", {}):
        return cls
    cls.__annotations__ = {
        (OUTPUT_CACHE_FIELD if name == old else name): kind for name, kind in cls.__annotations__.items()
    }
    default = cls.__dict__[old]
    delattr(cls, old)
    setattr(cls, OUTPUT_CACHE_FIELD, default)
    return cls


def output_cache(outputs: Any):
    """The KV cache of a model's output (``None`` when it has none), without touching deprecated aliases.

    transformers outputs hold it under ``OUTPUT_CACHE_FIELD``; other causal LMs (remote code written for another
    release, hand-written models) may use the other name, read from the instance itself so that an alias property
    that only warns is never called.
    """
    cache = getattr(outputs, OUTPUT_CACHE_FIELD, None)
    if cache is not None:
        return cache
    fields = getattr(outputs, "__dict__", {})
    for name in CACHE_NAMES:
        if fields.get(name) is not None:
            return fields[name]
    return None


@functools.lru_cache(maxsize=None)
def _forward_cache_kwarg(forward_owner: type) -> str:
    forward = forward_owner.forward
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a C-level or odd callable: assume the output's convention
        return OUTPUT_CACHE_FIELD
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return OUTPUT_CACHE_FIELD
    raise _missing(
        f"a cache keyword ({' or '.join(CACHE_NAMES)}) in {forward_owner.__qualname__}.forward "
        f"(parameters: {list(parameters)})"
    )


def backbone_cache_kwarg(module) -> str:
    """The keyword that ``module.forward`` takes for its KV cache (``cache`` or ``past_key_values``)."""
    return _forward_cache_kwarg(type(module))


def cache_kwargs(module, cache) -> dict:
    """``{keyword: cache}`` for calling ``module`` (a transformers model, a PEFT wrapper or a CALM) with a cache."""
    return {backbone_cache_kwarg(module): cache}
