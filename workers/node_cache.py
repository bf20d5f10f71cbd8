"""The node's latent cache: which settings and embedder serve this model (clip: the pipeline's own text encoders, pooled), opened at start or, while the cache is away, reopened in the background."""

from __future__ import annotations

import logging
import time

import torch

from scheduler.settings import ClusterSettings
from workers.resilient_cache import CacheReopener, RedisClock, ResilienceSettings
from workers.service import GenerationService
from workers.settings import WorkerSettings

log = logging.getLogger("reprise.worker")


def text_memo_for(worker: WorkerSettings):
    if worker.text_memo_entries <= 0:
        return None
    from workers.text_memo import TextEmbeddingMemo

    return TextEmbeddingMemo(max_entries=worker.text_memo_entries, max_bytes=worker.text_memo_bytes)


def open_cache(redis_client, components, key_prefix: str, text_memo=None, cpu_node: bool = False):
    """The node's cache. ``cpu_node``: some device of the node is the CPU, so REPRISE_CACHE_EMBED_PROCESS=auto
    embeds in this process (a child would take the cores the device's threads compute on), else in a child."""
    from cache import CacheSettings, LatentCache
    from workers.skip_table_choice import stored_clip_calibration

    settings, embedder = cache_settings_for(
        CacheSettings(), components, text_memo, clip_calibrated=stored_clip_calibration(redis_client)
    )
    if settings.embed_process == "auto":
        settings = settings.model_copy(update={"embed_process": "off" if cpu_node else "on"})
    # Expiry by the Redis server's clock: nodes with skewed wall clocks agree on every entry's TTL.
    clock = (
        RedisClock(redis_client, ResilienceSettings().redis_clock_refresh_s) if redis_client is not None else time.time
    )
    return LatentCache.open(settings, redis=redis_client, embedder=embedder, clock=clock, key_prefix=key_prefix)


def open_cache_or_defer(redis_client, components, cluster, text_memo=None, cpu_node: bool = False):
    """(cache, None), or (None, why) when the cache cannot open now: a node never needs its cache to serve."""
    try:
        return open_cache(redis_client, components, cluster.queue_prefix, text_memo, cpu_node), None
    except Exception as exc:
        log.error(
            "CACHE UNAVAILABLE at start (%s: %s): serving every job uncached and retrying in the background",
            type(exc).__name__,
            exc,
        )
        return None, type(exc).__name__


def reopen_later(
    service: GenerationService,
    redis_client,
    cluster: ClusterSettings,
    components,
    every_s: float,
    text_memo=None,
    cpu_node: bool = False,
) -> None:
    def on_open(cache) -> None:
        from workers import cache_control as control

        service.cache = cache
        service.cache_note = None
        control.start_control(service, redis_client, cluster)

    CacheReopener(
        lambda: open_cache(redis_client, components, cluster.queue_prefix, text_memo, cpu_node), on_open, every_s
    ).start()


def cache_settings_for(settings, components=None, text_memo=None, clip_calibrated=None):
    """(settings, embedder) of a cache that serves ``components``: with the `clip` embedder, the model's own
    text encoder and, unless a table is set, the table calibrated for it (model_index.json → reprise →
    clip_skip_table), since thresholds belong to one encoder; embedder None means the settings' default.
    `auto` resolves to clip or minilm here (workers.skip_table_choice.auto_embedder; ``clip_calibrated(fingerprint)``:
    whether a clip table is stored for that model version)."""
    if settings.embedder == "auto":
        from workers.skip_table_choice import auto_embedder

        chosen = auto_embedder(components, clip_calibrated)
        update = {"embedder": chosen}
        if chosen == "clip":  # its vectors live apart from MiniLM's (other size, other space)
            update["collection"] = f"{settings.collection}-clip"
        settings = settings.model_copy(update=update)
    if settings.embedder != "clip" or components is None:
        return settings, None
    update = {"clip_dim": components.family.pooled_dim(components)}
    if settings.skip_table is None and components.extra.get("clip_skip_table"):
        update["skip_table"] = [tuple(row) for row in components.extra["clip_skip_table"]]
    return settings.model_copy(update=update), clip_embedder(components, text_memo)


def clip_embedder(components, text_memo=None):
    """The pipeline's own text encoders, pooled as its family pools them (SDXL: the second encoder's projection;
    SD3: both CLIPs' projections; Flux: CLIP's pooled output): the `clip` prompt embedder of the cache. The same
    pass gives the prompt's conditioning: it goes into the node's text memo, so the device stage does not
    encode again."""

    @torch.no_grad()
    def embed(prompt: str):
        # No lock: inference only, and torch releases the GIL, so the lookups of several jobs run together.
        with components.text_lock.shared():  # never while a request's LoRA changes the text encoder
            conditioning, pooled = components.family.encode(components, prompt)
        if text_memo is not None:
            text_memo.put(components.fingerprint, prompt, conditioning)
        return pooled[0].float().cpu().numpy()

    return embed
