"""Job ids of functions defined in ``__main__`` match across multiprocessing start methods.

A script's functions are ``__main__.<qualname>`` in the process that runs it, but spawn
and forkserver children (the default start method on macOS and Windows) import the script
again as ``__mp_main__``: ids derived from that name would differ, and the job would run
once per start method. tests/main_module_jobs.py is run as a real script, against a real
redis-server, with two spawn children and a forkserver child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "main_module_jobs.py"


@pytest.mark.timeout(60)
def test_main_module_ids_match_in_spawn_and_forkserver_children_and_the_job_runs_once(
    redis_url: str, prefix: str
) -> None:
    env = {**os.environ, "MAIN_JOBS_URL": redis_url, "MAIN_JOBS_PREFIX": prefix}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=55, env=env
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = {name: found for kind, name, found in report["results"] if kind == "ids"}
    assert len(ids) == len(report["methods"]) + 1  # the parent and every child reported
    parent = ids.pop("parent")
    assert parent["build"] == "__main__.build:report:daily"
    assert parent["area"].startswith("__main__.area:")
    for name, found in ids.items():
        assert found == parent, (name, found, parent)
    values = {name: value for kind, name, value in report["results"] if kind == "value"}
    errors = [r for r in report["results"] if r[0] == "error"]
    assert not errors, errors
    assert len(set(values.values())) == 1, values  # one leader's value for every process
    assert report["runs"] == 1
