"""The durable usage spool: every finished request's usage entry is on local disk before the
response ends, and reaches the event store in batches, exactly once.

Imports: stdlib, msgspec, domain. Entries are appended as JSON lines to the open segment (a plain write:
it survives a killed process; only a power cut can lose what was not yet fsynced).
The background task fsyncs the open segment every `fsync_interval_s` (off the event loop). A segment
closes after `segment_entries_max` entries or `segment_age_s` seconds; closed segments are
recorded in order, each as one usage batch whose id derives from the spool's instance and the
segment's number, so a segment replayed after a crash is recognised as already recorded. A segment
file is deleted only after its batch is in the log. On start, segments left by earlier processes
(under their own instance folders, claimed with a file lock) are replayed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from domain.accounting import Accounting, RecordedUsage
from domain.errors import DuplicateRequest
from domain.usage import UsageEntry

log = logging.getLogger(__name__)

SPOOL_NAMESPACE = uuid.UUID("8c1f3a52-2f7e-4f0e-9d8e-6c1b5b0e4a11")
SEGMENT_ENTRIES_MAX = 1_000
SEGMENT_AGE_S = 0.2
FSYNC_INTERVAL_S = 0.05
RETRY_DELAY_S_MAX = 5.0
SEGMENT_SUFFIX = ".jsonl"
SEGMENTS_KEPT_MAX = 50
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


@dataclass(frozen=True)
class FlushedBatch:
    request_ids: list[str]
    position: int
    charged_request_ids: list[str]  # those that cost credits: until projected, they count against budgets


class Spool:
    def __init__(
        self,
        root: Path,
        accounting: Accounting,
        *,
        on_recorded: Callable[[FlushedBatch], Awaitable[None]] | None = None,
        segment_entries_max: int = SEGMENT_ENTRIES_MAX,
        segment_age_s: float = SEGMENT_AGE_S,
        fsync_interval_s: float = FSYNC_INTERVAL_S,
    ) -> None:
        self.root = root
        self.accounting = accounting
        self.on_recorded = on_recorded
        self.segment_entries_max = segment_entries_max
        self.segment_age_s = segment_age_s
        self.fsync_interval_s = fsync_interval_s
        self.instance = uuid.uuid4()
        self.folder = root / self.instance.hex
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = _claim(self.folder)
        self._segment_no = 0
        self._fd: int | None = None
        self._entries_in_segment = 0
        self._opened_at = 0.0
        self._dirty = False
        self._path = self.folder / "none"
        self._retiring: list[tuple[int, Path]] = []
        # what this process wrote, by completed segment path: recording it needs no re-reading and
        # re-parsing (a fifth of the metering's CPU); bounded, so that a long database outage only
        # costs reading back from disk
        self._written: dict[Path, list[UsageEntry]] = {}
        self._in_segment: list[UsageEntry] = []
        self._wake = asyncio.Event()
        self.entries_recorded = 0

    # ---- writing (the request path)

    def append(self, entry: UsageEntry) -> None:
        """Put one entry on disk; cheap enough for the request path (one write syscall)."""
        if self._fd is None:
            self._open_segment()
        assert self._fd is not None
        os.write(self._fd, _encode(entry.validate().to_row()) + b"\n")
        self._in_segment.append(entry)
        self._entries_in_segment += 1
        self._dirty = True
        if self._entries_in_segment >= self.segment_entries_max:
            self._retire_segment()

    def _open_segment(self) -> None:
        self._segment_no += 1
        self._path = self.folder / f"{self._segment_no:012d}{SEGMENT_SUFFIX}.open"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._entries_in_segment = 0
        self._in_segment = []
        self._opened_at = time.monotonic()

    def _retire_segment(self) -> None:
        """Stop writing to the open segment; the background task syncs, closes and completes it."""
        if self._fd is None:
            return
        self._retiring.append((self._fd, self._path))
        if len(self._written) < SEGMENTS_KEPT_MAX:
            self._written[self._path.with_suffix("")] = self._in_segment
        self._in_segment = []
        self._fd = None
        self._wake.set()

    async def _sync_open_segment(self) -> None:
        """fsync off the event loop (it can take milliseconds), on a duplicate of the descriptor so that
        retiring the segment meanwhile cannot make it sync — or close — another file."""
        if self._fd is None or not self._dirty:
            return
        self._dirty = False
        fd = os.dup(self._fd)
        try:
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)

    async def seal(self) -> None:
        """Complete every segment written so far, the open one included, so that it can be recorded."""
        self._retire_segment()
        await self._complete_retired()

    async def _complete_retired(self) -> None:
        while self._retiring:
            fd, path = self._retiring[0]
            await asyncio.to_thread(os.fsync, fd)
            self._retiring.pop(0)
            _complete(fd, path)

    def depth(self) -> int:
        """Entries on disk not yet in the event store (closed segments counted by lines)."""
        return sum(_count_lines(p) for p in self.root.glob(f"*/*{SEGMENT_SUFFIX}*"))

    # ---- flushing (a background task)

    async def run(self, stop: asyncio.Event) -> None:
        """Record closed segments until `stop`; then close the open one and record everything."""
        await self.replay_orphans()
        delay = 0.1
        while True:
            stopping = stop.is_set()
            await self._sync_open_segment()
            if self._fd is not None and (stopping or time.monotonic() - self._opened_at >= self.segment_age_s):
                self._retire_segment()
            await self._complete_retired()
            try:
                await self.flush_closed(self.folder, self.instance)
                delay = 0.1
            except Exception:  # the database may be away: keep the segments, retry with backoff
                log.exception("usage spool: recording failed; segments stay on disk and will be retried")
                delay = min(delay * 2, RETRY_DELAY_S_MAX)
                if stopping:
                    raise
            if stopping:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(self.fsync_interval_s, delay))

    async def flush_closed(self, folder: Path, instance: uuid.UUID) -> int:
        flushed = 0
        for path in sorted(folder.glob(f"*{SEGMENT_SUFFIX}")):
            flushed += await self._record_segment(path, instance)
        return flushed

    async def _record_segment(self, path: Path, instance: uuid.UUID) -> int:
        entries = self._written.get(path)
        if entries is None:
            entries = _read_segment(path)
        batch_id = uuid.uuid5(SPOOL_NAMESPACE, f"{instance}/{path.name}")
        if entries:
            result = await asyncio.to_thread(self._record, batch_id, entries)
            if not result.already_recorded:
                self.entries_recorded += len(entries)
            if self.on_recorded is not None:
                await self.on_recorded(FlushedBatch([e.request_id for e in entries], result.position,
                                                    [e.request_id for e in entries if e.cost_credits > 0]))
        path.unlink()
        self._written.pop(path, None)
        return len(entries)

    def _record(self, batch_id: uuid.UUID, entries: list[UsageEntry]) -> RecordedUsage:
        try:
            return self.accounting.record_usage(batch_id, entries)
        except DuplicateRequest as dup:
            # already charged elsewhere (never expected): keep the rest, under a batch id of its own
            log.exception("usage spool: %d entries were already recorded; recording the others", len(dup.request_ids))
            rest = [e for e in entries if e.request_id not in set(dup.request_ids)]
            if not rest:
                return RecordedUsage(batch_id, 0, already_recorded=True)
            return self.accounting.record_usage(uuid.uuid5(batch_id, "without-duplicates"), rest)

    async def replay_orphans(self) -> int:
        """Record segments left by processes that ended (their folders are no longer locked)."""
        replayed = 0
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.folder):
            lock = _try_claim(folder)
            if lock is None:
                continue  # a live process owns it
            try:
                for open_segment in folder.glob(f"*{SEGMENT_SUFFIX}.open"):
                    open_segment.rename(open_segment.with_suffix(""))
                replayed += await self.flush_closed(folder, uuid.UUID(folder.name))
                _release(lock)
                lock = None
                with contextlib.suppress(OSError):
                    (folder / ".lock").unlink()
                    folder.rmdir()
            finally:
                if lock is not None:
                    _release(lock)
        if replayed:
            log.info("usage spool: replayed %d entries left by an earlier process", replayed)
        return replayed

    def close(self) -> None:
        """Sync and complete every segment (they are recorded at the next start if not already)."""
        self._retire_segment()
        for fd, path in self._retiring:
            os.fsync(fd)
            _complete(fd, path)
        self._retiring.clear()
        _release(self._lock)


def _complete(fd: int, path: Path) -> None:
    os.close(fd)
    path.rename(path.with_suffix(""))  # drop ".open": the segment is complete


def _read_segment(path: Path) -> list[UsageEntry]:
    entries = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            entries.append(UsageEntry.from_row(_decode(line)).validate())
        except (ValueError, TypeError):  # a torn last line after a power cut
            log.exception("usage spool: unreadable entry %s:%d skipped", path, number)
    return entries


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def _claim(folder: Path) -> int:
    fd = _try_claim(folder)
    if fd is None:
        raise RuntimeError(f"spool folder {folder} is locked by another process")
    return fd


def _try_claim(folder: Path) -> int | None:
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
