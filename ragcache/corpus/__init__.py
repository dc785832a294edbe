"""Corpora on disk: the corpus store, ingestion, background jobs, the data-dir manifest."""
