"""Reprise's latent cache: Qdrant-backed exact and approximate (NIRVANA) reuse of generations."""

from cache.embedding import CallableEmbedder, PromptEmbedder
from cache.keys import CacheKey
from cache.latent_cache import ApproxHit, ExactHit, HitCounter, LatentCache, state_checksum
from cache.policies import EntryStats, make_policy, plan_eviction
from cache.settings import CacheSettings
from cache.skip_table import CLIP_SKIP_TABLE, MINILM_SKIP_TABLE, choose_k, choose_skip_fraction
from cache.store import CacheError, CacheLockedError, CacheSchemaError, CacheUnavailableError

__all__ = [
    "ApproxHit",
    "CLIP_SKIP_TABLE",
    "CacheError",
    "CacheKey",
    "CacheLockedError",
    "CacheSchemaError",
    "CacheSettings",
    "CacheUnavailableError",
    "CallableEmbedder",
    "EntryStats",
    "ExactHit",
    "HitCounter",
    "LatentCache",
    "MINILM_SKIP_TABLE",
    "PromptEmbedder",
    "choose_k",
    "choose_skip_fraction",
    "make_policy",
    "plan_eviction",
    "state_checksum",
]
