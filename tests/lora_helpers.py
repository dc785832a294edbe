"""Real PEFT LoRA adapters on the tiny random models, saved as PEFT saves them, with the
adapter merged into the weights as the reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import LoadedModel, load_model
from tests.conftest import loaded_from_hf, random_hf_model
from tests.service_helpers import tiny_model_folder

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(slots=True)
class PeftAdapter:
    path: Path
    merged: LoadedModel


def make_peft_adapter(
    folder: Path,
    seed: int,
    model: dict[str, Any] | None = None,
    targets: list[str] | None = None,
    **lora: Any,
) -> PeftAdapter:
    """A LoRA with random A and B (peft's init_lora_weights=False) on the tiny base model
    that ``random_hf_model(**model)`` builds, saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    settings: dict[str, Any] = {"r": 8, "lora_alpha": 16, "init_lora_weights": False}
    settings.update(lora)
    base = random_hf_model(**(model or {}))
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=targets or ALL_TARGETS, **settings)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload()
    return PeftAdapter(folder, loaded_from_hf(merged))


def fresh_tiny_model() -> LoadedModel:
    """The service tests' tiny model, loaded anew: serving adapters wraps the model's
    projections, so tests with adapters never share the cached one."""
    return load_model(ModelConfig(path=str(tiny_model_folder()), dtype="float32", device="cpu"))
