"""The package's lazy public names (PEP 562): what importing them costs and changes in the host process."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import gc, sys
{setup}
import pr_loader
assert "torch" not in sys.modules or {torch_before}, "import pr_loader alone imported torch"
starts = []
gc.callbacks.append(lambda phase, info: phase == "start" and starts.append(phase))
from pr_loader import DataLoader, PostponeToNext
assert "pr_loader.dataloader" in sys.modules
print(gc.isenabled(), len(starts))
"""


@pytest.mark.parametrize(("setup", "enabled_after"), [("", True), ("gc.disable()", False)])
@pytest.mark.parametrize("torch_before", [False, True])
def test_a_lazy_import_pauses_the_collector_and_restores_its_state(
    setup: str, enabled_after: bool, torch_before: bool
) -> None:
    # a fresh interpreter: the names must not be imported yet (the collector would have nothing to pause)
    code = _PROBE.format(setup=setup + ("\nimport torch" if torch_before else ""), torch_before=torch_before)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = run.stdout.split()
    assert out[0] == str(enabled_after)  # the host's setting is kept
    # no collection ran while importing (hundreds do without the pause); the first allocation after the
    # collector is enabled again may start one
    assert int(out[1]) <= (1 if enabled_after else 0)
