"""The README's demo (examples/demo.sh) as a user runs it: it must train, learn, and answer."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_demo_trains_learns_and_answers(tmp_path):
    env = {**os.environ, "DEMO_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        ["bash", str(REPO / "examples" / "demo.sh")], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"^\s+\d+\s+(\d+\.\d+)$", done.stdout, flags=re.MULTILINE)]
    assert len(losses) == 30 and losses[-1] < losses[0] / 10, done.stdout
    answers = dict(re.findall(r"^'(.+)' -> '(.*)'$", done.stdout, flags=re.MULTILINE))
    assert answers == {
        "@ShopCo my refund never came": "complaint",
        "@NetFast thanks for the quick delivery": "no complaint",
    }, done.stdout
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
