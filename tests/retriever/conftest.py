from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLES = Path(__file__).resolve().parents[2] / "samples"

TRAINING_TEXT = """\
Tokenizers learn merges from text. This short passage adds numbers like 1863 and 1776,
punctuation such as commas, semicolons; dashes -- and quotes "like these".
Accented words: café, naïve, Zürich. Symbols: € £ ° and an emoji 😀.
"""


@pytest.fixture(scope="session")
def byte_bpe():
    """A real byte-level BPE tokenizer (the SmolLM2 family's kind), trained on the samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLES.iterdir())]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*texts, TRAINING_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="session")
def minilm():
    from ragcache.retriever.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()
