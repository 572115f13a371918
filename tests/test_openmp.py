"""quill.openmp: torch loads with libgomp's spin count shortened, and the environment is left as it was."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quill import openmp

# Records GOMP_SPINCOUNT at the moment torch starts loading (when libgomp reads it), then imports quill.
SPY = """
import importlib.abc, os, sys
seen = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
sys.meta_path.insert(0, Spy())
import quill
print(seen[0], os.environ.get("GOMP_SPINCOUNT"))
"""


@pytest.mark.parametrize("user_env, expected", [
    ({}, f"{openmp.SPIN_COUNT} None"),  # set while torch loads, then removed
    ({"GOMP_SPINCOUNT": "5"}, "5 5"),  # the user's own setting wins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "None None"),
])
def test_torch_loads_with_short_spin(user_env, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SPY], env={**env, **user_env}, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == expected.split()


def test_nothing_changes_once_torch_is_loaded():
    assert "torch" in sys.modules
    before = dict(os.environ)
    assert not openmp.shorten_spin() and dict(os.environ) == before
