"""Architecture numbers of a Llama-family model, read from a transformers config."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the engine's own forward pass implements."""


@dataclass(slots=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, per byte of the element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def canonical(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "qkv_bias": self.qkv_bias,
        }

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported; the engine runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"activation {act!r} is not supported; expected silu")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        theta, scaling = _rope_settings(config)
        eos = config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        window = getattr(config, "sliding_window", None)
        if (
            window
            and getattr(config, "use_sliding_window", True)
            and window < int(config.max_position_embeddings)
        ):
            log.warning(
                "sliding-window attention (%d tokens) is not implemented: prompts longer "
                "than the window attend to every earlier token",
                window,
            )
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=theta,
            max_position=int(config.max_position_embeddings),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rope_scaling=scaling,
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )


def _rope_settings(config: Any) -> tuple[float, dict[str, Any] | None]:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind in (None, "default") else dict(params)
        return theta, scaling
    theta = float(getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) != "default":
        return theta, dict(scaling)
    return theta, None
