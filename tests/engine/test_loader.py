"""Loading local Hugging Face folders, fingerprints, and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ragcache.engine.attention_metadata import contiguous_metadata
from ragcache.engine.config import ModelConfig
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import LoadedModel, ModelLoadError, load_model
from ragcache.engine.spec import SUPPORTED_MODEL_TYPES
from tests.engine.conftest import tiny_hf_model


def save_tiny_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(WordLevel(words, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="w0", bos_token="w1", eos_token="w2"
    )
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as transformers' save_pretrained writes it: config, safetensors, tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_hf_model("qwen2").save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)
    return folder


def load(folder: Path, dtype: str = "float32") -> LoadedModel:
    return load_model(ModelConfig(path=str(folder), dtype=dtype, device="cpu"))


def test_local_folder_loads_and_matches_its_transformers_model(tiny_folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert list(tiny_folder.glob("*.safetensors"))
    loaded = load(tiny_folder)
    assert loaded.spec.model_type == "qwen2" and loaded.spec.qkv_bias
    assert loaded.source == tiny_folder and loaded.dtype == torch.float32
    assert loaded.tokenizer.convert_tokens_to_ids(["w5", "w9", "w200"]) == [5, 9, 200]
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    ids = [5, 9, 200, 31, 77]
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
    ours = loaded.model
    assert torch.equal(ours.embed_tokens.weight, reference.model.embed_tokens.weight)
    pool = KVPool(loaded.spec, 1, 16, torch.float32)
    with torch.inference_mode():
        hidden = ours(torch.tensor(ids), torch.arange(len(ids)), contiguous_metadata([5], 16), pool)
        logits = ours.compute_logits(hidden)
    assert (logits - expected).abs().max().item() <= 1e-4


def test_fingerprint_is_stable_across_loads(tiny_folder: Path) -> None:
    assert load(tiny_folder).fingerprint == load(tiny_folder).fingerprint


def test_fingerprint_changes_when_one_weight_changes(tiny_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    changed.mkdir()
    for file in tiny_folder.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    weights = changed / "model.safetensors"
    state = load_file(weights)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = state[name].clone()
    state[name][3, 7] += 1e-3
    save_file(state, str(weights), metadata={"format": "pt"})
    assert load(changed).fingerprint != load(tiny_folder).fingerprint


def test_fingerprint_ignores_the_compute_dtype(tiny_folder: Path) -> None:
    """The fingerprint names the checkpoint; the KV dtype is a separate part of chunk keys."""
    assert load(tiny_folder, "bfloat16").fingerprint == load(tiny_folder).fingerprint


def test_unsupported_model_type_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ModelLoadError) as error:
        load(tmp_path)
    message = str(error.value)
    assert "gpt2" in message
    assert all(kind in message for kind in SUPPORTED_MODEL_TYPES)


def test_missing_path_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as error:
        load(missing)
    assert str(missing) in str(error.value)


def test_folder_without_config_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load(tmp_path)


def test_corrupt_safetensors_is_reported(tiny_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x93not a safetensors file" * 40)
    with pytest.raises(ModelLoadError, match="corrupt or unreadable") as error:
        load(tmp_path)
    assert "model.safetensors" in str(error.value)


def test_folder_without_weights_is_reported(tiny_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match=r"no \.safetensors"):
        load(tmp_path)


def test_invalid_dtype_lists_the_accepted_ones(tiny_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="int7") as error:
        load(tiny_folder, dtype="int7")
    assert "bfloat16" in str(error.value) and "float32" in str(error.value)
