"""Durable attempt records, so a prompt that kills the engine every time is quarantined, not retried forever.

A dead engine actor is restarted by Ray with no memory, and Ray retries the batch it was working on.
Before each try the engine writes a small record under ``<output.dir>/_attempts/`` (through the same
pyarrow file system as the shards, so it works on object stores too) and removes it once the try
returns. A record still present when a batch starts means an earlier try of that batch killed its engine:
the batch then runs one row at a time, each row charged separately, and a row whose record says it has
been tried ``max_row_attempts`` times is handed back as quarantined instead of being tried again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from ..corpus.schema import ATTEMPTS_DIR
from ..paths import filesystem, join, makedirs, writing



class AttemptLog:
    """Attempt counters of batches and rows of one output dir; picklable (built on the driver)."""

    def __init__(self, out_dir: str, max_row_attempts: int):
        self.out_dir, self.max_row_attempts = out_dir, max_row_attempts

    def _path(self, kind: str, key: str) -> tuple[object, str]:
        fs, root = filesystem(self.out_dir)
        return fs, join(root, ATTEMPTS_DIR, f"{kind}-{key}.json")

    def _count(self, kind: str, key: str) -> int:
        import pyarrow.fs as pafs

        fs, path = self._path(kind, key)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return 0
        with fs.open_input_stream(path) as f:
            return int(json.loads(f.read().decode())["attempts"])

    def _record(self, kind: str, key: str, attempts: int) -> None:
        fs, path = self._path(kind, key)
        record = {"attempts": attempts, "pid": os.getpid(), "time": time.time()}
        with writing():
            makedirs(fs, path.rsplit("/", 1)[0])
            with fs.open_output_stream(path) as f:  # one small object: a single put on object stores
                f.write(json.dumps(record).encode())

    def _clear(self, kind: str, key: str) -> None:
        import pyarrow.fs as pafs

        fs, path = self._path(kind, key)
        with writing():
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_file(path)

    # ---- batches: keyed by their sample ids, so a retried batch finds its record
    @staticmethod
    def batch_key(sample_ids: list[str]) -> str:
        return hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()[:24]

    def begin_batch(self, sample_ids: list[str]) -> int:
        """Record one more try of this batch; returns how many tries were recorded before it."""
        key = self.batch_key(sample_ids)
        before = self._count("batch", key)
        self._record("batch", key, before + 1)
        return before

    def end_batch(self, sample_ids: list[str]) -> None:
        self._clear("batch", self.batch_key(sample_ids))

    # ---- rows: keyed by sample id (content hashes made by corpus/prompts.py, safe in a file name)
    def begin_row(self, sample_id: str) -> int:
        """Tries recorded before this one; at ``max_row_attempts`` nothing more is recorded (quarantined)."""
        before = self._count("row", sample_id)
        if before < self.max_row_attempts:
            self._record("row", sample_id, before + 1)
        return before

    def end_row(self, sample_id: str) -> None:
        self._clear("row", sample_id)
