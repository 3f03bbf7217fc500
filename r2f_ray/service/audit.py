"""The append-only audit log: one JSON object per line, fsynced before the call returns."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, event: str, actor: str, **fields) -> dict:
        """Record ``event`` by ``actor`` (a token's name, never the token) with its details."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "unix": round(time.time(), 3),
                  "event": event, "actor": actor, **fields}
        line = json.dumps(record, sort_keys=False, default=str) + "\n"
        with self._lock:
            # O_APPEND: each record lands whole at the end, even with another writer on the file.
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a record torn by a crash: start a new line
                    line = "\n" + line
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def read(self) -> list[dict]:
        """All records in order; a torn last line (power loss mid-write) is skipped."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
