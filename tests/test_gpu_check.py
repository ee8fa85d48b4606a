"""scripts/gpu_check.sh: its stage limits fit the lent machine's 7 minutes and it runs the tuner."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
STAGE = re.compile(r"^stage (\w+) (\d+) (.*)$", re.MULTILINE)


def stages() -> dict[str, tuple[int, str]]:
    return {name: (int(limit), cmd) for name, limit, cmd in STAGE.findall(SCRIPT.read_text())}


def test_stage_limits_fit_in_seven_minutes():
    found = stages()
    assert {"build", "tests", "bench", "pytest_benchmarks", "tune"} <= set(found)
    # about 400 s of stages leaves the rest of 7 minutes for the machine's start-up and transfers
    assert sum(limit for limit, _ in found.values()) <= 400


def test_tune_stage_writes_tune_json_within_its_limit():
    limit, cmd = stages()["tune"]
    assert "perfml.bench.autotune" in cmd and '"$OUT/tune.json"' in cmd
    budget = float(re.search(r"--budget-s (\S+)", cmd).group(1))
    assert budget < limit  # the tuner stops and writes before the stage is killed


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
