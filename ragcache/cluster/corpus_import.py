"""Seeds the cluster's corpus log with the corpora of a single server's data directory,
so a deployment that grew out of one server starts with its corpora. A corpus the log
already holds is left alone, so seeding again is a no-op."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ragcache.cluster.corpus_log import AddedDocument, CorpusLog
from ragcache.corpus.store import CorpusStore
from ragcache.errors import ConflictError, DataDirError


def embedding_dim(data_dir: Path) -> int:
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        raise DataDirError(f"{data_dir} is not a ragcache data directory (no manifest.json)")
    return int(json.loads(manifest.read_text())["embedding_dim"])


def import_corpora(data_dir: Path, log: CorpusLog) -> list[str]:
    """Appends every corpus of ``data_dir`` the log lacks; returns their names."""
    store = CorpusStore(data_dir, embedding_dim(data_dir))
    imported = []
    try:
        for info in store.list():
            try:
                log.append_create(info.name, info.description)
            except ConflictError:
                continue
            ids, vectors = store.index(info.name).vectors()
            rows = {int(vector_id): row for row, vector_id in enumerate(ids.tolist())}
            added = []
            for record in store.documents(info.name):
                chunks = store.chunks(info.name, record.chunk_ids)
                present = [chunk for chunk in chunks if chunk is not None]
                doc_vectors = vectors[[rows[chunk.chunk_id] for chunk in present]]
                kept = [chunk.chunk_id for chunk in present]
                added.append(
                    AddedDocument(dataclasses.replace(record, chunk_ids=kept), present, doc_vectors)
                )
            if added:
                log.append_change(info.name, added, [])
            imported.append(info.name)
    finally:
        store.close()
    return imported
