"""How long torch's OpenMP workers busy-wait after a parallel op: set once, before torch loads.

libgomp's workers spin for milliseconds after every parallel torch op before they sleep. Quill's kernels
run on their own thread pool (quill.kernels), whose helper thread then shares a core with a spinning worker
and is slowed until the spin ends. A spin of SPIN_COUNT pauses is far shorter, yet still longer
than the gaps between back-to-back torch ops, so torch's own ops keep their workers awake; no spin at all
(`OMP_WAIT_POLICY=PASSIVE`) would make every small torch op pay a futex wake-up instead. The measurements
behind both choices are in docs/performance.md ("torch's spinning OpenMP workers").
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
