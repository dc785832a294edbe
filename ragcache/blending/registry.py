"""One registry of fusion methods: each name, the class that implements it and the
parameters it reads. Defaults live in the method classes and in ``FusionConfig``;
nothing here restates them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ragcache.blending.cachecraft import CacheCraft
from ragcache.blending.config import FusionConfig
from ragcache.blending.focus import ORDERS, CacheFocus, FocusParameterError
from ragcache.blending.gradual import ALL_LAYERS, GradualBlend
from ragcache.blending.methods import (
    CacheBlend,
    FullPrefill,
    FullReuse,
    FusionMethod,
    LegoLink,
    MethodParam,
    PrefixOnly,
    SinkAwareBlend,
)


@dataclass(frozen=True, slots=True)
class MethodEntry:
    """A method's class, its parameters (parameter name -> field of the class) and the
    field values that make this name differ from the class's own defaults."""

    cls: type
    params: Mapping[str, str] = field(default_factory=dict)
    preset: Mapping[str, Any] = field(default_factory=dict)

    def build(self, params: Mapping[str, MethodParam]) -> FusionMethod:
        types = {f.name: f.type for f in dataclasses.fields(self.cls)}
        values = dict(self.preset)
        for param, field_name in self.params.items():
            if param in params:
                convert = int if types[field_name] == "int" else float
                values[field_name] = convert(params[param])
        method: FusionMethod = self.cls(**values)
        return method


_GRADUAL = {
    "ratio": "ratio",
    "check_layer": "first_check",
    "last_check": "last_check",
    "widen": "widen",
    "query_weight": "query_weight",
    "query_layers": "query_layers",
}
_BLEND = {"ratio": "ratio", "check_layer": "check_layer"}

METHODS: dict[str, MethodEntry] = {
    "full_prefill": MethodEntry(FullPrefill),
    "prefix_only": MethodEntry(PrefixOnly),
    "full_reuse": MethodEntry(FullReuse),
    "cacheblend": MethodEntry(CacheBlend, _BLEND),
    "legolink": MethodEntry(LegoLink, {"k": "k"}),
    "sinkblend": MethodEntry(
        SinkAwareBlend, {**_BLEND, "sink_tokens": "sink_tokens", "query_weight": "query_weight"}
    ),
    "gradual": MethodEntry(GradualBlend, _GRADUAL),
    # gradual filtering with scores weighted by the query's attention at the scoring layer
    "gradual_weighted": MethodEntry(
        GradualBlend, _GRADUAL, {"name": "gradual_weighted", "query_weight": 1.0}
    ),
    # Cache-Craft: per-chunk budgets from measured deviation, repaired variants reused.
    "cachecraft": MethodEntry(
        CacheCraft,
        {**_BLEND, "insensitive": "insensitive", "min_contexts": "min_contexts"},
    ),
    # queryblend: gradual filtering weighted by what the query reads over every layer.
    "queryblend": MethodEntry(
        GradualBlend,
        _GRADUAL,
        {"name": "queryblend", "query_weight": 2.0, "query_layers": ALL_LAYERS},
    ),
}
FOCUS_PARAMS = ("keep", "layers", "order", "base")
METHOD_NAMES = (*METHODS, "cachefocus")
BASE_METHODS = tuple(METHODS)
# Parameters whose values are names, not numbers, and the names each accepts.
TEXT_PARAMS: dict[str, tuple[str, ...]] = {"order": ORDERS, "base": BASE_METHODS}
# Request fields (same names as in FusionConfig) -> method parameters.
REQUEST_FIELDS = {
    "recompute_ratio": "ratio",
    "check_layer": "check_layer",
    "legolink_k": "k",
    "craft_insensitive": "insensitive",
    "craft_min_contexts": "min_contexts",
    "focus_keep": "keep",
    "focus_layers": "layers",
    "focus_order": "order",
    "focus_base": "base",
}


class MethodParameterError(ValueError):
    """A fusion method or parameter a request cannot use; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _craft_params(fields: Mapping[str, Any]) -> dict[str, MethodParam]:
    insensitive, min_contexts = fields["craft_insensitive"], fields["craft_min_contexts"]
    if isinstance(insensitive, str) or not float(insensitive) >= 0.0:
        raise MethodParameterError(
            f"craft_insensitive={insensitive!r} must be a number >= 0", "craft_insensitive"
        )
    if not isinstance(min_contexts, int) or min_contexts < 1:
        raise MethodParameterError(
            f"craft_min_contexts={min_contexts!r} must be an integer >= 1", "craft_min_contexts"
        )
    return {"insensitive": float(insensitive), "min_contexts": min_contexts}


def make_method(name: str, **params: MethodParam) -> FusionMethod:
    """The method called ``name``; parameters it does not read are ignored."""
    if name == "cachefocus":
        return _focus(params)
    entry = METHODS.get(name)
    if entry is None:
        raise ValueError(f"fusion method {name!r} is unknown; use one of {', '.join(METHOD_NAMES)}")
    return entry.build(params)


def _focus(params: Mapping[str, MethodParam]) -> CacheFocus:
    """CacheFocus from flat parameters; the ones it does not own configure the base."""
    base = str(params.get("base", "full_reuse"))
    if base not in BASE_METHODS:
        raise FocusParameterError(
            f"cachefocus base={base!r} is not allowed; use one of {', '.join(BASE_METHODS)}",
            "base",
        )
    focus: dict[str, Any] = {}
    if "keep" in params:
        keep = params["keep"]
        if isinstance(keep, str):
            raise FocusParameterError(f"cachefocus keep={keep!r} must be a number", "keep")
        focus["keep"] = float(keep)
    if "layers" in params:
        layers = params["layers"]
        focus["layers"] = (
            int(layers) if isinstance(layers, float) and layers.is_integer() else layers
        )
    if "order" in params:
        focus["order"] = str(params["order"])
    rest = {key: value for key, value in params.items() if key not in FOCUS_PARAMS}
    return CacheFocus(**focus, base=METHODS[base].build(rest))


def method_for_request(
    name: str | None,
    request: Mapping[str, MethodParam],
    config: FusionConfig,
    num_layers: int,
    max_prompt_tokens: int,
) -> tuple[FusionMethod, dict[str, MethodParam]]:
    """The method a request asks for, its request fields checked and the config's
    defaults filled in; also the parameters used, for the fusion report."""
    name = name or config.method
    if name not in METHOD_NAMES:
        raise MethodParameterError(
            f"fusion method {name!r} is unknown; use one of {', '.join(METHOD_NAMES)}", "method"
        )
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise MethodParameterError(
            f"unknown method parameter {unknown[0]!r}; known: {sorted(REQUEST_FIELDS)}",
            unknown[0],
        )
    fields = {key: request.get(key, getattr(config, key)) for key in REQUEST_FIELDS}
    ratio = float(fields["recompute_ratio"])
    check_layer, legolink_k = fields["check_layer"], fields["legolink_k"]
    if not 0.0 <= ratio <= 1.0:
        raise MethodParameterError(f"recompute_ratio={ratio} must be in [0, 1]", "recompute_ratio")
    # V at layer 0 does not depend on other tokens: deviations there are all zero.
    if not isinstance(check_layer, int) or not 1 <= check_layer < num_layers - 1:
        raise MethodParameterError(
            f"check_layer={check_layer!r} must be an integer in [1, {num_layers - 2}]",
            "check_layer",
        )
    if not isinstance(legolink_k, int) or legolink_k < 0:
        raise MethodParameterError(
            f"legolink_k={legolink_k!r} must be an integer >= 0", "legolink_k"
        )
    used: dict[str, MethodParam] = {"ratio": ratio, "check_layer": check_layer, "k": legolink_k}
    if name == "cachecraft":
        used.update(_craft_params(fields))
    if name != "cachefocus":
        method = make_method(name, **used)
        if isinstance(method, GradualBlend) and check_layer >= method.last_check:
            raise MethodParameterError(
                f"check_layer={check_layer} must be below {name}'s last check layer "
                f"{method.last_check}",
                "check_layer",
            )
        return method, used
    used.update(
        {REQUEST_FIELDS[key]: fields[key] for key in REQUEST_FIELDS if key.startswith("focus_")}
    )
    try:
        method = _focus(used)
    except FocusParameterError as error:
        raise MethodParameterError(str(error), f"focus_{error.param}") from None
    if method.layers > num_layers:
        raise MethodParameterError(
            f"focus_layers={method.layers} exceeds the model's {num_layers} layers",
            "focus_layers",
        )
    method.max_prompt_tokens = max_prompt_tokens
    return method, used
