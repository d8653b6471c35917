"""The chaos campaign (benchmarks/chaos.py), short and seeded: random faults on a running study, rerun
until it completes, then compared bit for bit with the undisturbed study."""
import subprocess
import sys

import pytest

from conftest import REPO, launch_env


@pytest.mark.launches
def test_a_short_seeded_chaos_campaign_loses_nothing_changes_nothing_and_leaves_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/chaos.py", "--faults", "4", "--seed", "1", "--small",
                           "--keep", str(tmp_path / "chaos")], cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=900)
    report = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    for line in ("results lost: 0", "results differing: 0", "processes left behind: 0", "runs that hung (over 240 s): 0"):
        assert line in proc.stdout, report
    assert "4 faults over" in proc.stdout, report
