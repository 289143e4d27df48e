"""On-disk cache of chat-completions replies, so a killed batch run resumes without paying twice.

A reply is keyed by the SHA-256 of what decides it (model, messages, sampling parameters), never by
the API key, and appended to a JSONL file as soon as it arrives. A run killed mid-write leaves at most
a half-written last line, which is cut off when the cache is opened again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from medllava.io import JsonlLog, read_jsonl

log = logging.getLogger(__name__)


def request_hash(model: str, messages: list[dict], params: dict) -> str:
    """Cache key: SHA-256 of the canonical JSON of what decides the reply (never the API key)."""
    canonical = json.dumps({"model": model, "messages": messages, "params": params},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Append-only JSONL of successful replies keyed by request hash; survives being killed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._log = JsonlLog(self.path)  # opening cuts off a half-written last line
        self._rows: dict[str, dict] = {}
        errors: list[str] = []
        for _, row in read_jsonl(self.path, skip_bad=True, errors=errors):
            if isinstance(row.get("hash"), str) and isinstance(row.get("text"), str):
                self._rows.setdefault(row["hash"], row)
        if errors:
            log.warning("cache %s: %d unreadable lines ignored (first: %s)", self.path, len(errors), errors[0])
        self._lock = threading.Lock()

    def get(self, h: str) -> dict | None:
        with self._lock:
            return self._rows.get(h)

    def put(self, h: str, key: str, reply: dict) -> None:
        row = {"hash": h, "key": key, **reply}
        with self._lock:
            if h not in self._rows:
                self._rows[h] = row
                self._log.append(row)

    def close(self) -> None:
        self._log.close()
