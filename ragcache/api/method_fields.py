"""Request fields that tune the fusion method, shared by the native and OpenAI bodies;
their names are the fusion config's, and the registry checks their values."""

from __future__ import annotations

from pydantic import BaseModel

from ragcache.blending.methods import MethodParam
from ragcache.blending.registry import REQUEST_FIELDS


class MethodFields(BaseModel):
    recompute_ratio: float | None = None
    check_layer: int | None = None
    legolink_k: int | None = None
    craft_insensitive: float | None = None
    craft_min_contexts: int | None = None
    focus_keep: float | None = None
    focus_layers: int | None = None
    focus_order: str | None = None
    focus_base: str | None = None
    # Not a method parameter: reuse nothing whose bits could differ from a cold run.
    deterministic: bool | None = None

    def method_params(self) -> dict[str, MethodParam]:
        """The fields the caller set, by name."""
        values = {name: getattr(self, name) for name in (*REQUEST_FIELDS, "deterministic")}
        return {name: value for name, value in values.items() if value is not None}
