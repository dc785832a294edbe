"""LoRA adapters in the PEFT format, read and checked against the served base model.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
with ``...layers.{i}.{self_attn|mlp}.{target}.lora_A.weight`` [r, in] and
``lora_B.weight`` [out, r] per adapted projection. The update of a projection is
``x @ A.T @ B.T * scaling`` with scaling ``alpha / r`` (``alpha / sqrt(r)`` under
rsLoRA). The engine fuses q/k/v and gate/up into one projection each, so a target also
names the slice of the fused output that its update lands on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragcache.engine.spec import ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\."
    r"(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
_UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA adapters",
    "modules_to_save": "adapters that save whole modules (modules_to_save)",
    "layer_replication": "layer replication",
    "target_parameters": "adapters on parameters (target_parameters)",
    "lora_bias": "adapters with a LoRA bias",
}


class LoraLoadError(ValueError):
    """An adapter that cannot be served on this base model; the message says why."""


class UnknownAdapterError(LookupError):
    """A request or command named an adapter that is not loaded."""


@dataclass(frozen=True, slots=True)
class TargetSlice:
    """Where a PEFT target lands in the engine's model: module, output columns, sizes."""

    module: str
    offset: int
    in_features: int
    out_features: int


def target_slice(spec: ModelSpec, target: str) -> TargetSlice:
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    hidden, inter = spec.hidden_size, spec.intermediate_size
    slices = {
        "q_proj": TargetSlice("self_attn.qkv_proj", 0, hidden, q),
        "k_proj": TargetSlice("self_attn.qkv_proj", q, hidden, kv),
        "v_proj": TargetSlice("self_attn.qkv_proj", q + kv, hidden, kv),
        "o_proj": TargetSlice("self_attn.o_proj", 0, q, hidden),
        "gate_proj": TargetSlice("mlp.gate_up_proj", 0, hidden, inter),
        "up_proj": TargetSlice("mlp.gate_up_proj", inter, hidden, inter),
        "down_proj": TargetSlice("mlp.down_proj", 0, inter, hidden),
    }
    return slices[target]


@dataclass(slots=True)
class LoraAdapter:
    """An adapter's weights on the host: per (layer, target), A [in, r] and B [r, out]
    in fp32 with the scaling folded into B."""

    name: str
    path: Path
    fingerprint: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def id(self) -> str:
        """Name and content: what chunk-cache keys and prefix-cache salts carry."""
        return f"{self.name}@{self.fingerprint}"

    @property
    def rank(self) -> int:
        return max(a.shape[1] for a, _ in self.weights.values())

    @property
    def targets(self) -> list[str]:
        return sorted({target for _, target in self.weights}, key=TARGET_MODULES.index)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LoraLoadError(
            f"adapter name {name!r} is invalid; use 1-128 letters, digits and . _ : / - "
            "starting with a letter or digit"
        )
    return name


def adapter_salt(cache_salt: str, adapter_id: str) -> str:
    """The engine prefix-cache salt of a request under an adapter: KV made under one
    adapter (or the base model) never serves a request under another."""
    return f"{cache_salt}\x1flora:{adapter_id}"


def parse_adapter_spec(text: str) -> tuple[str, str]:
    """``"name=path"`` -> (name, path), as ``--lora`` and ``lora.adapters`` take it."""
    name, sep, path = text.partition("=")
    if not sep or not path.strip():
        raise LoraLoadError(f"adapter {text!r} is not of the form name=path")
    return check_adapter_name(name.strip()), path.strip()


def read_lora_adapter(
    path: str | Path, spec: ModelSpec, name: str | None = None, max_rank: int = 64
) -> LoraAdapter:
    """Read and validate a PEFT LoRA folder for the base model ``spec``."""
    folder = Path(path).expanduser()
    name = check_adapter_name(name or folder.name)
    if not (folder / CONFIG_FILE).is_file():
        raise LoraLoadError(
            f"adapter {name!r}: {folder} has no {CONFIG_FILE}; expected a PEFT LoRA folder "
            f"({CONFIG_FILE} and {WEIGHTS_FILE}, as save_pretrained writes it)"
        )
    config = _read_config(folder / CONFIG_FILE, name)
    pairs = _pair_tensors(_read_tensors(folder, name), name, spec)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), (lora_a, lora_b) in sorted(pairs.items(), key=_projection_order):
        rank = _check_shapes(name, spec, layer, target, lora_a, lora_b, max_rank)
        scaling = _scaling(config, f"model.layers.{layer}.{_group(target)}.{target}", rank)
        weights[(layer, target)] = (
            lora_a.float().t().contiguous(),
            (lora_b.float().t() * scaling).contiguous(),
        )
    return LoraAdapter(name, folder, adapter_fingerprint(weights), weights)


def adapter_fingerprint(weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> str:
    """Stable hash of every scaled weight: equal fingerprints give equal outputs."""
    digest = hashlib.blake2b(digest_size=12)
    for (layer, target), pair in sorted(weights.items()):
        digest.update(f"{layer}.{target}".encode())
        for tensor in pair:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _projection_order(item: tuple[tuple[int, str], object]) -> tuple[int, int]:
    (layer, target), _ = item
    return layer, TARGET_MODULES.index(target)


def _group(target: str) -> str:
    return "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def _read_config(path: Path, name: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraLoadError(f"adapter {name!r}: {path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraLoadError(f"adapter {name!r}: {path} must hold a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoraLoadError(f"adapter {name!r}: peft_type {kind!r} is not supported; only LORA")
    for key, what in _UNSUPPORTED_SETTINGS.items():
        if config.get(key):
            raise LoraLoadError(f"adapter {name!r}: {what} are not supported ({key} is set)")
    if config.get("bias", "none") != "none":
        raise LoraLoadError(f"adapter {name!r}: bias={config['bias']!r} is not supported")
    if config.get("fan_in_fan_out"):
        raise LoraLoadError(f"adapter {name!r}: fan_in_fan_out adapters are not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if str(t).rsplit(".", 1)[-1] not in TARGET_MODULES]
        if unknown:
            raise LoraLoadError(
                f"adapter {name!r}: target modules {unknown} are not supported; "
                f"supported: {', '.join(TARGET_MODULES)}"
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise LoraLoadError(f"adapter {name!r}: {key}={value!r} must be a positive number")
    return config


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / WEIGHTS_FILE
    if not file.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise LoraLoadError(
            f"adapter {name!r}: {folder} has no {WEIGHTS_FILE} (found: {found}); "
            "save the adapter with safe_serialization"
        )
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraLoadError(f"adapter {name!r}: {file} is corrupt or unreadable: {exc}") from None


def _pair_tensors(
    tensors: dict[str, torch.Tensor], name: str, spec: ModelSpec
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR.match(key)
        if match is None or match[3] not in TARGET_MODULES or _group(match[3]) != match[2]:
            raise LoraLoadError(
                f"adapter {name!r}: tensor {key!r} is not a LoRA weight of a supported "
                f"projection ({', '.join(TARGET_MODULES)})"
            )
        layer = int(match[1])
        if layer >= spec.num_layers:
            raise LoraLoadError(
                f"adapter {name!r} does not fit this base model: it adapts layer {layer}, "
                f"the base model has {spec.num_layers} layers"
            )
        halves.setdefault((layer, match[3]), {})[match[4]] = tensor
    if not halves:
        raise LoraLoadError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    pairs = {}
    for (layer, target), half in halves.items():
        if set(half) != {"A", "B"}:
            missing = "lora_B" if "A" in half else "lora_A"
            raise LoraLoadError(f"adapter {name!r}: layer {layer} {target} lacks its {missing}")
        pairs[(layer, target)] = (half["A"], half["B"])
    return pairs


def _check_shapes(
    name: str,
    spec: ModelSpec,
    layer: int,
    target: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    max_rank: int,
) -> int:
    geometry = target_slice(spec, target)
    rank = int(lora_a.shape[0]) if lora_a.dim() == 2 else -1
    want_a, want_b = (rank, geometry.in_features), (geometry.out_features, rank)
    if rank < 1 or tuple(lora_a.shape) != want_a or tuple(lora_b.shape) != want_b:
        raise LoraLoadError(
            f"adapter {name!r} does not fit this base model: layer {layer} {target} has "
            f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}, the base model "
            f"needs [r, {geometry.in_features}] and [{geometry.out_features}, r] "
            "(was it trained on another base model?)"
        )
    if rank > max_rank:
        raise LoraLoadError(
            f"adapter {name!r}: rank {rank} at layer {layer} {target} exceeds "
            f"lora.max_rank={max_rank}"
        )
    if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
        raise LoraLoadError(f"adapter {name!r}: layer {layer} {target} has NaN or inf weights")
    return rank


def _pattern_value(patterns: Any, module: str, default: float) -> float:
    """PEFT's per-module override: a key matches the module name or a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return float(value)
    return default


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, float(config["lora_alpha"]))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank
