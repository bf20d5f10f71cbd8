"""Which similarity -> K table a worker serves with, and keeping it in step with the stored one.

Precedence: a table set on the worker (REPRISE_CACHE_SKIP_TABLE) > the table calibrated for this exact
model version and embedder (``reprise calibrate --store`` / ``reprise cache table set``: Redis,
``cache.skip_table_store``) > the table shipped with the model (model_index.json, clip embedder) > the
embedder's default. The worker reads the stored table at start and again every
``REPRISE_TABLE_REFRESH_S`` seconds (default 15), and publishes what it uses in its registry entry
(``reprise models``): the table, where it came from, and whether it was calibrated for this version.
New weights have a new fingerprint, so a table stored for the old ones is not used: the worker says
``uncalibrated`` and names the version that table was fitted for.
"""

from __future__ import annotations

import logging
import threading

from cache.skip_table_store import TableStore

log = logging.getLogger("reprise.worker")


class TableWatcher(threading.Thread):
    def __init__(self, service, client, prefix: str, info: dict, every_s: float, announce_ttl_s: float = 30.0):
        super().__init__(name="reprise-table-watcher", daemon=True)
        self.service, self.store, self.info = service, TableStore(client, prefix), info
        self.every_s, self.announce_ttl_s = every_s, announce_ttl_s
        self.stopped = threading.Event()
        self._applied: tuple | None = None
        self._cache = None
        self._explicit = _explicit_table()

    def resolve(self, cache) -> tuple[tuple | None, dict]:
        """(table to serve with, or None for the settings' own; what to publish about it)."""
        fingerprint = self.service.components.fingerprint
        embedder = cache.settings.embedder
        base = [list(r) for r in cache.settings.table()]
        common = {"skip_table_embedder": embedder}
        if self._explicit:
            return None, {"skip_table": base, "skip_table_source": "settings", "skip_table_calibrated": False, **common}
        record = self.store.get(fingerprint, embedder)
        if record is not None:
            return tuple(map(tuple, record["table"])), {
                **common,
                "skip_table": record["table"],
                "skip_table_source": "calibrated",
                "skip_table_calibrated": True,
                "skip_table_for": {
                    k: record.get(k) for k in ("fingerprint", "embedder", "scorer", "tolerance", "steps", "stored_at")
                },
            }
        shipped = embedder == "clip" and bool(cache.settings.skip_table)  # the model's own calibrated clip table
        out = {
            **common,
            "skip_table": base,
            "skip_table_source": "model" if shipped else "default",
            "skip_table_calibrated": False,
        }
        stale = [
            r["fingerprint"]
            for r in self.store.records(self.service.model_name)
            if r.get("embedder") == embedder and r.get("fingerprint") != fingerprint
        ]
        if stale:  # calibrated for other weights: this version is not
            out["skip_table_uncalibrated"] = f"tables stored for other versions of {self.service.model_name}: {stale}"
        return None, out

    def refresh(self) -> bool:
        """Read the stored table; apply and publish it when it (or the cache) changed. True on a change."""
        cache = self.service.cache
        if cache is None or not hasattr(cache, "set_skip_table"):
            self.info.update(skip_table=None, skip_table_source="no cache", skip_table_calibrated=False)
            return False
        table, published = self.resolve(cache)
        key = (id(cache), table, published.get("skip_table_uncalibrated"))
        if key == self._applied:
            return False
        cache.set_skip_table(table)
        for k in ("skip_table_for", "skip_table_uncalibrated"):
            self.info.pop(k, None)
        self.info.update(published)
        self._applied = key
        log.info("skip table %s (%s)", published["skip_table"], published["skip_table_source"])
        self._announce()
        return True

    def _announce(self) -> None:
        registry = getattr(self.service, "registry", None)
        if registry is None or not self.info.get("node"):
            return
        registry.announce(self.service.model_name, self.info, ttl_s=self.announce_ttl_s)
        registry.announce_node(self.info["node"], self.info, ttl_s=self.announce_ttl_s)

    def start_watching(self) -> None:
        """Apply the stored table now (before the first heartbeat announces the node), then keep checking."""
        try:
            self.refresh()
        except Exception as exc:  # Redis restarting: the next round applies it
            log.warning("skip table refresh failed: %s", exc)
        self.start()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.refresh()
            except Exception as exc:  # Redis restarting: next round
                log.warning("skip table refresh failed: %s", exc)


def auto_embedder(components, clip_calibrated=None) -> str:
    """`REPRISE_CACHE_EMBEDDER=auto`: the model's own text encoder (`clip`: no extra pass, its output is the
    conditioning) where a table is calibrated for it, stored for this model version or shipped in the
    model's model_index.json; MiniLM otherwise (its default table is calibrated, NIRVANA's CLIP one is not)."""
    if components is None:
        return "minilm"
    if components.extra.get("clip_skip_table"):
        return "clip"
    if clip_calibrated is not None and clip_calibrated(components.fingerprint):
        return "clip"
    return "minilm"


def stored_clip_calibration(client):
    """fingerprint -> whether a clip table is stored for it (None without Redis); an unreachable Redis: no."""
    if client is None:
        return None
    from scheduler.settings import get_settings

    store = TableStore(client, get_settings().queue_prefix)

    def calibrated(fingerprint: str) -> bool:
        try:
            return store.get(fingerprint, "clip") is not None
        except Exception as exc:  # Redis down at start: MiniLM until the next start
            log.warning("could not read the stored clip table: %s", exc)
            return False

    return calibrated


def _explicit_table() -> bool:
    from cache import CacheSettings

    return CacheSettings().skip_table is not None
