"""The reload audit trail: every reload event appended to a JSON-lines file, fsynced.

The in-memory reload log ends with the process; this file does not, so `GET /admin/reloads`
can show what happened before a restart. Lines are only ever appended; a drain that
finishes later appends the event again with its drain time (`"drained": true`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

from hotweights.core import Notice, ReloadFinished

log = logging.getLogger("hotweights.audit")


class AuditTrail:
    """Reloader observer that appends to `path`. Thread-safe; a write error is logged and
    never fails a reload."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, notice: Notice) -> None:
        if not isinstance(notice, ReloadFinished):
            return
        record = {"model": notice.model, "drained": notice.drained, **notice.event.to_dict()}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                with self.path.open("a", encoding="utf-8") as file:
                    file.write(line)
                    file.flush()
                    os.fsync(file.fileno())
            except OSError:
                log.exception("cannot append to the reload audit file %s", self.path)

    def read(self, limit: int, model: str | None = None) -> list[dict[str, Any]]:
        """The last `limit` events (drain updates folded into their event), most recent
        first; lines that do not parse (a torn last write) are skipped."""
        kept: deque[dict[str, Any]] = deque(maxlen=limit)
        try:
            with self.path.open(encoding="utf-8") as file:
                for line in file:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if model is not None and record.get("model") != model:
                        continue
                    if not (record.get("drained") and _fold(kept, record)):
                        kept.append(record)
        except FileNotFoundError:
            return []
        return list(reversed(kept))


def _fold(kept: deque[dict[str, Any]], update: dict[str, Any]) -> bool:
    """Replace the event `update` completes (same model, id and start); False if absent."""
    key = (update.get("model"), update.get("id"), update.get("started_at"))
    for index in range(len(kept) - 1, -1, -1):
        record = kept[index]
        if (record.get("model"), record.get("id"), record.get("started_at")) == key:
            kept[index] = update
            return True
    return False
