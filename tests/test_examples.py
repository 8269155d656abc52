"""The examples run as users run them (a subprocess each) and say what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=EXAMPLES.parent,
        check=False,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(60)
def test_cache_fill(redis_url: str) -> None:
    out = run_example("cache_fill.py", redis_url, timeout=45)
    assert "database queries: 1\n" in out
    assert "callers served: 20/20\n" in out


@pytest.mark.timeout(60)
def test_async_handler(redis_url: str) -> None:
    out = run_example("async_handler.py", redis_url, timeout=45)
    assert out.count("  executions: 1\n") == 2
    assert "  50 x 200 {'report': 'q3-sales', 'rows': 1234}\n" in out
    assert "  50 x 500 {'error': 'the report backend is down'}\n" in out


@pytest.mark.timeout(60)
def test_adhoc_call(redis_url: str) -> None:
    out = run_example("adhoc_call.py", redis_url, timeout=45)
    assert out.count("1 distinct result for 5 callers") == 2
    tokens = [int(t) for t in re.findall(r"flight key 'token-refresh', fencing token (\d+)", out)]
    assert len(tokens) == 2 and tokens[0] < tokens[1], out


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo() -> None:
    out = run_example("demo.py", timeout=75)  # starts its own redis-server
    rows = re.findall(r"^  (daily|weekly|monthly) +\| +(\d+) \| +(\d+) of (\d+) ", out, re.M)
    assert len(rows) == 3, out
    for _key, executions, served, callers in rows:
        assert executions == "1" and served == callers, out
    assert "verdict: every key ran once; all 36 callers served" in out
    assert re.search(r"takeover: pid \d+ .* took over [\d.]+ s after the kill", out), out
    assert "8 of 8 surviving callers got" in out
