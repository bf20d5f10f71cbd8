"""Calibrated similarity -> K tables, stored in Redis with the model version they were fitted for.

One record per (model fingerprint, embedder) under ``{prefix}:skip-table:{fingerprint}:{embedder}``
(prefix: the cluster's ``queue_prefix``). The fingerprint hashes every weight and config
(``workers.model_loading.fingerprint``), so new weights find no record: their table is uncalibrated until
someone calibrates them. Every worker serving that version reads the record (at start and then every
``REPRISE_TABLE_REFRESH_S``) and serves with it. A record:

    {"model": "shapes", "fingerprint": "f1edf358eee05219", "embedder": "minilm",
     "table": [[0.99, 0.5], [0.9, 0.2]], "tolerance": 2.0, "scorer": "pixel", "steps": 25,
     "pairs": 40, "source": "reprise calibrate", "stored_at": 1764713000.0}
"""

from __future__ import annotations

import json
import time

from cache.skip_table import SkipTable, validate_table

EMBEDDERS = ("minilm", "clip")


class TableStoreError(ValueError):
    """A record that cannot be stored or read back (bad table, unknown embedder, no version)."""


class TableStore:
    def __init__(self, client, prefix: str = "reprise") -> None:
        self.r = client
        self.prefix = prefix

    def key(self, fingerprint: str, embedder: str) -> str:
        return f"{self.prefix}:skip-table:{fingerprint}:{embedder}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:skip-table"

    def set(self, model: str, fingerprint: str, embedder: str, table, **meta) -> dict:
        """Store ``table`` for this model version and embedder (replacing any earlier one); returns the record."""
        if not fingerprint:
            raise TableStoreError(f"no model version (fingerprint) for {model!r}: start a worker for it or pass one")
        if embedder not in EMBEDDERS:
            raise TableStoreError(f"unknown embedder {embedder!r}: one of {', '.join(EMBEDDERS)}")
        try:
            rows = validate_table(table)
        except (TypeError, ValueError) as exc:
            raise TableStoreError(f"bad skip table {table!r}: {exc}") from None
        record = {
            **meta,
            "model": model,
            "fingerprint": fingerprint,
            "embedder": embedder,
            "table": [list(r) for r in rows],
            "stored_at": time.time(),
        }
        self.r.set(self.key(fingerprint, embedder), json.dumps(record))
        self.r.publish(self.channel, json.dumps({"fingerprint": fingerprint, "embedder": embedder}))
        return record

    def get(self, fingerprint: str, embedder: str) -> dict | None:
        raw = self.r.get(self.key(fingerprint, embedder))
        return json.loads(raw) if raw else None

    def table(self, fingerprint: str, embedder: str) -> SkipTable | None:
        record = self.get(fingerprint, embedder)
        return validate_table(record["table"]) if record else None

    def delete(self, fingerprint: str, embedder: str) -> bool:
        return bool(self.r.delete(self.key(fingerprint, embedder)))

    def records(self, model: str | None = None) -> list[dict]:
        """Every stored record (of ``model`` when given), newest first."""
        out = []
        for key in self.r.scan_iter(f"{self.prefix}:skip-table:*:*"):
            raw = self.r.get(key)
            if raw:
                record = json.loads(raw)
                if model is None or record.get("model") == model:
                    out.append(record)
        return sorted(out, key=lambda r: -float(r.get("stored_at", 0)))
