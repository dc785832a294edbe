"""The data directory's manifest: which model and embedder its state was built for.

Chunk records hold token ids of one tokenizer, chunk caches hold KV of one model's
weights and the indexes hold vectors of one embedder, so a directory built for
another model or embedder is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ragcache.errors import DataDirError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# What a used data directory holds beside its manifest.
DATA_NAMES = ("corpora.lmdb", "chunks", "indexes")


@dataclass(slots=True)
class Manifest:
    model_name: str
    model_fingerprint: str
    embedder: str
    embedding_dim: int
    format: int = MANIFEST_FORMAT


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def open_manifest(data_dir: Path, wanted: Manifest) -> Manifest:
    """The directory's manifest, written on first use; refuses a mismatch."""
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        held = [name for name in DATA_NAMES if (data_dir / name).exists()]
        if held:
            raise DataDirError(
                f"{data_dir} holds ragcache data ({', '.join(held)}) but no {MANIFEST_FILE}, "
                "so the model and embedder it was built for are unknown. Restore "
                f"{MANIFEST_FILE} from a backup, or use an empty data_dir.",
                param="data_dir",
            )
        data_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(asdict(wanted), indent=2))
        return wanted
    try:
        found = Manifest(**json.loads(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError:
        raise DataDirError(
            f"{path} is not UTF-8 text, so it is not a ragcache manifest (it is damaged). "
            "Restore it from a backup, or use an empty data_dir.",
            param="data_dir",
        ) from None
    except (json.JSONDecodeError, TypeError) as error:
        raise DataDirError(
            f"{path} is not a ragcache manifest ({error}). Restore it from a backup, or "
            "use an empty data_dir.",
            param="data_dir",
        ) from None
    if found.format != MANIFEST_FORMAT:
        raise DataDirError(
            f"{path} has format {found.format}; this version reads {MANIFEST_FORMAT}"
        )
    if found.model_fingerprint != wanted.model_fingerprint:
        raise DataDirError(
            f"data directory {data_dir} was built for model {found.model_name} (fingerprint "
            f"{found.model_fingerprint[:12]}), but the loaded model is {wanted.model_name} "
            f"({wanted.model_fingerprint[:12]}); its token ids and chunk caches do not fit. "
            "Use another data_dir, or load the model it was built for.",
            param="data_dir",
        )
    if (found.embedder, found.embedding_dim) != (wanted.embedder, wanted.embedding_dim):
        raise DataDirError(
            f"data directory {data_dir} holds vectors of embedder {found.embedder} "
            f"(dim {found.embedding_dim}), but retriever.embedder is {wanted.embedder} "
            f"(dim {wanted.embedding_dim}). Use another data_dir or the same embedder.",
            param="retriever.embedder",
        )
    return found
