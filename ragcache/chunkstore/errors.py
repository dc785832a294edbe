"""Errors of the chunk store's records, shared by the record format and the codecs."""

from __future__ import annotations


class CorruptEntryError(ValueError):
    """A stored record whose bytes do not match its checksum or layout."""
