"""The one cache directory of scripts, tests and benchmarks, outside the repository.

Why one definition: `scripts/bootstrap`, `scripts/testbed` and `scripts/images` keep the
virtualenv, the control plane's binaries and the images' build cache there, and the Python
side keeps generated media, quantized models and benchmark inputs beside them. Spelled out in
each module, the copies drifted: some took an empty DHARMA_CACHE for the current directory,
where bash's `${DHARMA_CACHE:-…}` takes it for unset.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """DHARMA_CACHE, or ~/.cache/dharma-stream when it is unset or empty (as in the scripts)."""
    return Path(os.environ.get("DHARMA_CACHE") or Path.home() / ".cache" / "dharma-stream")


#: The cache directory, read once at import.
CACHE = cache_dir()
#: Benchmark inputs that take long to make (bench/*.py).
BENCH_CACHE = CACHE / "bench"
