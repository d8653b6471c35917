"""Time to exit of every failure case on the troubleshooting page (docs/troubleshooting.md).

Runs the tests that back the table (real ranks, np=2) and prints, for each, the seconds from the
launch (or from the fault, for faults injected into a running job) until every rank had exited, as
recorded by the tests themselves (``record_property("time_to_exit_s", ...)``).

    python benchmarks/failure_times.py            # or: make failure-times
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from common import REPO

TESTS = [
    "tests/test_failures.py",
    "tests/test_train.py::test_bad_input_fails_on_every_rank_without_hanging",
    "tests/test_train.py::test_a_mask_mismatch_stops_every_rank",
    "tests/test_study.py::test_bad_study_inputs_fail_on_every_rank_with_one_line",
    "tests/test_study.py::test_changed_spec_in_an_existing_study_dir_is_refused_on_every_rank",
    "tests/test_study.py::test_one_rank_killed_mid_study_ends_the_job_and_the_rerun_measures_the_same",
    "tests/test_checkpoint.py::test_killed_run_resumes_with_identical_measurements",
    "tests/test_slurm.py::test_a_rank_killed_under_srun_ends_the_job_and_keeps_the_log",
    "tests/test_slurm.py::test_no_rank_outlives_a_killed_srun_or_batch_script",
    "tests/test_watch.py",
    "tests/test_engines.py::test_a_killed_torchrun_rank_ends_the_job_and_the_rerun_resumes_to_horovods_measurements",
    "tests/test_engines.py::test_the_wrong_backend_for_the_launcher_is_one_line_and_exit_2_on_every_rank",
    "tests/test_multinode.py::test_a_host_that_dies_ends_the_job_on_the_other_and_the_rerun_resumes",
    "tests/test_multinode.py::test_a_host_cut_off_the_network_ends_the_job_instead_of_hanging_it",
    "tests/test_multinode.py::test_a_host_lost_under_torchrun_ends_the_job_with_one_line",
]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=legacy",
                               f"--junitxml={report}",
                               *TESTS], cwd=REPO)
        rows = []
        for case in ET.parse(report).getroot().iter("testcase"):
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            outcome = "FAILED" if failed else "skipped" if skipped else "passed"
            rows.append((f"{case.get('classname').split('.')[-1]}::{case.get('name')}", props.get("time_to_exit_s", "-"),
                         outcome))
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'test':<{width}}  time to exit (s)  outcome")
    for name, seconds, outcome in rows:
        print(f"{name:<{width}}  {seconds:>16}  {outcome}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
