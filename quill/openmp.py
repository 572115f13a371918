"""How long torch's OpenMP workers busy-wait after a parallel op: set once, before torch loads.

libgomp's workers spin ~300,000 pauses (~10 ms on the AVX2 machine) after every parallel torch op before
they sleep. Quill's kernels run on their own thread pool (quill.kernels), whose helper then shares a core
with a spinning worker: the prefill attention kernel took 6.5 ms right after a torch op against 3.2 ms
otherwise (2 cores, docs/performance.md). 20,000 pauses (~0.7 ms) still bridge the microseconds between
back-to-back torch ops, so torch's own speed is unchanged (training steps measured the same), while
`OMP_WAIT_POLICY=PASSIVE` (no spin at all) slowed a small model's training step from ~15 to ~23 ms.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 20_000
_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def shorten_spin() -> bool:
    """Load torch with libgomp's spin count at SPIN_COUNT; False (nothing changed) when torch is already
    loaded or the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY. The variable is removed again once torch has
    loaded (libgomp reads it at load), so child processes (benchmark peers, the user's) see the user's env."""
    if "torch" in sys.modules or any(v in os.environ for v in _VARIABLES):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        import torch  # noqa: F401  (libgomp, loaded with torch, reads GOMP_SPINCOUNT now)
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    return True
