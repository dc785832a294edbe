"""Whether an LMDB data file can be opened safely, and moving a damaged one aside.

LMDB maps the file and trusts its meta pages: a file shorter than the pages its meta
page names kills the process with SIGBUS at the first read past the end, so the size
is checked against the meta page before opening. The layout read here is LMDB's
on-disk format on 64-bit builds (a page header of 16 bytes, then MDB_meta).
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import time
from pathlib import Path

import lmdb

logger = logging.getLogger(__name__)

META_MAGIC = 0xBEEFC0DE
META_VERSION = 1
PAGE_HEADER_BYTES = 16
PAGE_SIZE_OFFSET = PAGE_HEADER_BYTES + 24  # the free DB's md_pad holds the page size
LAST_PAGE_OFFSET = PAGE_HEADER_BYTES + 120  # mm_last_pg, then mm_txnid
FALLBACK_PAGE_SIZE = 4096
MAX_PLAUSIBLE_BYTES = 1 << 50
WALK_FAILED = 3


def _page_size(head: bytes) -> int:
    size = struct.unpack_from("<I", head, PAGE_SIZE_OFFSET)[0]
    if 512 <= size <= 65536 and size & (size - 1) == 0:
        return size
    return FALLBACK_PAGE_SIZE


def data_file_problem(data_file: Path) -> str | None:
    """Why ``data_file`` is unsafe to open, or None when its meta pages are sound and
    the file holds every page they name (a missing or empty file is fine: LMDB
    creates it)."""
    if not data_file.exists():
        return None
    size = data_file.stat().st_size
    if size == 0:
        return None
    with open(data_file, "rb") as handle:
        head = handle.read(2 * 65536)
    page_size = _page_size(head)
    if size < 2 * page_size:
        return f"the file is {size} bytes, shorter than its two meta pages"
    metas = []
    for number in (0, 1):
        offset = number * page_size
        if offset + LAST_PAGE_OFFSET + 16 > len(head):
            continue
        magic, version = struct.unpack_from("<II", head, offset + PAGE_HEADER_BYTES)
        if magic == META_MAGIC and version == META_VERSION:
            last_page, txn_id = struct.unpack_from("<QQ", head, offset + LAST_PAGE_OFFSET)
            metas.append((txn_id, last_page))
    if not metas:
        return "neither meta page is valid (garbled)"
    _, last_page = max(metas)
    needed = (last_page + 1) * page_size
    if needed > MAX_PLAUSIBLE_BYTES:
        return f"its meta page is garbled (it names a file of {needed:,} bytes)"
    if size < needed:
        return f"the file is {size:,} bytes but its meta page names {needed:,} (truncated)"
    return None


def move_aside(directory: Path, problem: str, what: str) -> Path:
    """Renames a damaged environment folder out of the way and says so."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = directory.with_name(f"{directory.name}.damaged-{stamp}")
    number = 1
    while target.exists():
        number += 1
        target = directory.with_name(f"{directory.name}.damaged-{stamp}-{number}")
    directory.rename(target)
    logger.error(
        "%s at %s cannot be read: %s. Moved it aside to %s and started an empty one; "
        "it is a cache, so entries are recomputed as they are needed. Delete %s once "
        "it is no longer wanted for inspection.",
        what,
        directory,
        problem,
        target,
        target,
    )
    return target


def _walk(directory: Path, named_dbs: tuple[bytes, ...]) -> None:
    env = lmdb.open(str(directory), readonly=True, lock=False, max_dbs=len(named_dbs) or 0)
    try:
        dbs = [env.open_db(name, create=False) for name in named_dbs] or [None]
        with env.begin(buffers=True) as txn:
            for db in dbs:
                for key, value in txn.cursor(db=db):
                    bytes(key[:1])
                    bytes(value[:1])
                    bytes(value[-1:])
    finally:
        env.close()


def walk_problem(directory: Path, named_dbs: tuple[bytes, ...] = ()) -> str | None:
    """Why reading every record of the environment fails, or None. The walk runs in a
    forked child: a garbled page can point LMDB past the end of the file, and the
    SIGBUS that follows then ends the child, not this process."""
    if not (directory / "data.mdb").exists():
        return None
    child = os.fork()
    if child == 0:
        code = 0
        try:
            _walk(directory, named_dbs)
        except lmdb.Error:
            code = WALK_FAILED
        except BaseException:
            code = WALK_FAILED + 1
        os._exit(code)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return f"reading its pages crashed with {signal.Signals(os.WTERMSIG(status)).name}"
    if os.WEXITSTATUS(status) != 0:
        return "its pages do not read back (LMDB reports them corrupted)"
    return None
