"""A tiny real model folder (random weights, a byte-level BPE trained on the samples)
and a shared MiniLM embedder, built once per process for the service, CLI and API tests."""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from pathlib import Path

from ragcache.config import Config, load_config
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import LoadedModel, load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def build_model_folder(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import random_hf_model

    texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLES.iterdir())]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    model = random_hf_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.cache
def tiny_model_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ragcache-tiny-model-"))
    return build_model_folder(folder)


@functools.cache
def tiny_loaded() -> LoadedModel:
    return load_model(ModelConfig(path=str(tiny_model_folder()), dtype="float32", device="cpu"))


@functools.cache
def minilm():
    from ragcache.retriever.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()


def tiny_flags(data_dir: Path) -> dict[str, object]:
    """Config flags of a small, fast service on the tiny model."""
    return {
        "data_dir": str(data_dir),
        "model.path": str(tiny_model_folder()),
        "model.dtype": "float32",
        "model.device": "cpu",
        "engine.kv_cache_bytes": 8 * 1024 * 1024,
        "retriever.chunk_tokens": 96,
        "retriever.top_k": 3,
        "service.max_tokens": 8,
        "chunkstore.disk_initial_map_bytes": 8 * 1024 * 1024,
    }


def tiny_config(data_dir: Path) -> Config:
    return load_config(flags=tiny_flags(data_dir), environ={})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
