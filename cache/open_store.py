"""The store factory: the one module that knows both stores, so that `cache/store.py` (the interface both
implement) imports neither of them."""

from __future__ import annotations

from cache.store import LatentStore, state_slot_names


def open_store(settings, prompt_dim: int) -> LatentStore:
    """The store selected by settings.backend, with one state slot per state fraction."""
    slots = state_slot_names(len(settings.state_fractions))
    if settings.backend == "edge":
        from cache.edge_store import EdgeStore

        return EdgeStore.open(settings, prompt_dim, slots)
    from cache.client_store import ClientStore

    return ClientStore.open(settings, prompt_dim, slots)
