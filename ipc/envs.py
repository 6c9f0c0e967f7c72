"""Every environment variable pagedserve reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models live: $PAGEDSERVE_CACHE, else ~/.cache/pagedserve."""
    return Path(os.environ.get("PAGEDSERVE_CACHE") or Path.home() / ".cache" / "pagedserve")


def cpu_kv_cache_bytes() -> int:
    """KV-cache budget on CPU: $PAGEDSERVE_CPU_KVCACHE_SPACE GiB (default 1)."""
    return int(float(os.environ.get("PAGEDSERVE_CPU_KVCACHE_SPACE", "1")) * (1 << 30))


def api_key() -> str | None:
    return os.environ.get("PAGEDSERVE_API_KEY") or None


def log_level() -> str:
    return os.environ.get("PAGEDSERVE_LOG_LEVEL", "WARNING").upper()
