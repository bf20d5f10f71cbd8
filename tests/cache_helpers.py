"""Caches for the tests that resume from a stored state and check the images."""

from __future__ import annotations

from cache import CacheSettings, LatentCache


def resume_cache(path, fractions: list[float], fraction: float) -> LatentCache:
    """An embedded cache capturing at ``fractions`` whose every neighbour resumes at ``fraction``, with a
    generous lookup time box: these tests check the images, not the lookup's latency (at the default 50 ms a
    busy machine answers some lookups after the request has gone on fresh)."""
    settings = CacheSettings(
        backend="edge",
        path=str(path),
        state_fractions=fractions,
        skip_table=[(0.0, fraction)],
        lookup_timeout_ms=30_000,
    )
    return LatentCache.open(settings)
