"""Compacting an LMDB environment in place. LMDB keeps deleted records in free pages
until they are reused; a compacted copy holds only live records, so the bytes of
deleted ones leave the file. The caller holds every transaction of ``env`` off."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import lmdb


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def compact_environment(
    env: lmdb.Environment, directory: Path, reopen: Callable[[], lmdb.Environment]
) -> lmdb.Environment:
    """Replaces ``directory``'s data file by a compacted copy; returns the reopened
    environment (``env`` is closed)."""
    copy_dir = directory.with_name(f".{directory.name}.compact-{os.getpid()}")
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir(parents=True)
    try:
        env.copy(str(copy_dir), compact=True)
        _fsync(copy_dir / "data.mdb")
    except BaseException:
        shutil.rmtree(copy_dir, ignore_errors=True)
        raise
    env.close()
    try:
        os.replace(copy_dir / "data.mdb", directory / "data.mdb")
        _fsync(directory)
    finally:
        shutil.rmtree(copy_dir, ignore_errors=True)
        reopened = reopen()
    return reopened
