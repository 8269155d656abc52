"""The examples run as users run them (a subprocess each, given a Redis URL) and say what they
promise; ``make demo``'s launcher gives the demo a private server."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dedupe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False, env=env
    )
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run_example(name: str, *args: str, timeout: float) -> str:
    return run([sys.executable, str(EXAMPLES / name), *args], timeout=timeout)


@pytest.mark.parametrize("name", SCRIPTS)
def test_examples_use_only_the_public_api(name: str) -> None:
    tree = ast.parse((EXAMPLES / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
            if node.module == "dedupe":
                private = [a.name for a in node.names if a.name not in dedupe.__all__]
                assert private == [], f"{name} imports {private} (not in dedupe.__all__)"
        else:
            continue
        for m in modules:
            top = m.split(".")[0]
            assert top not in ("devtools", "tests", "benchmarks"), f"{name} imports {m}"
            assert m == "dedupe" or top != "dedupe", f"{name} imports the private module {m}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_example_without_a_url_says_how_to_run_it(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DEDUPE_REDIS_URL"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode != 0 and "usage:" in proc.stderr and "REDIS_URL" in proc.stderr


@pytest.mark.compat
@pytest.mark.timeout(60)
def test_url_from_the_environment(redis_url: str) -> None:
    out = run(  # adhoc_call keeps no results, so running it twice on one server is fine
        [sys.executable, str(EXAMPLES / "adhoc_call.py")],
        timeout=45,
        env={**os.environ, "DEDUPE_REDIS_URL": redis_url},
    )
    assert out.count("1 distinct result for 5 callers") == 2


@pytest.mark.compat
@pytest.mark.timeout(60)
def test_cache_fill(redis_url: str) -> None:
    out = run_example("cache_fill.py", redis_url, timeout=45)
    assert "database queries: 1\n" in out
    assert "callers served: 20/20\n" in out


@pytest.mark.timeout(60)
def test_stale_cache(redis_url: str) -> None:
    out = run_example("stale_cache.py", redis_url, timeout=45)
    assert "act 1, cold: origin calls 1, values [100], stale 0/20\n" in out
    assert "act 2, expired: origin calls 1, values [100], stale 20/20\n" in out
    assert "act 2, after the refresh: value 101, origin calls 1\n" in out
    assert "act 3, origin down: origin calls 1, values [101], stale 40/40\n" in out
    assert "act 3, errors seen by callers: 0\n" in out
    assert "verdict: as promised\n" in out


@pytest.mark.compat
@pytest.mark.timeout(60)
def test_async_handler(redis_url: str) -> None:
    out = run_example("async_handler.py", redis_url, timeout=45)
    assert out.count("  executions: 1\n") == 2
    assert "  50 x 200 {'report': 'q3-sales', 'rows': 1234}\n" in out
    assert "  50 x 500 {'error': 'the report backend is down'}\n" in out


@pytest.mark.compat
@pytest.mark.timeout(60)
def test_adhoc_call(redis_url: str) -> None:
    out = run_example("adhoc_call.py", redis_url, timeout=45)
    assert out.count("1 distinct result for 5 callers") == 2
    tokens = [int(t) for t in re.findall(r"flight key 'token-refresh', fencing token (\d+)", out)]
    assert len(tokens) == 2 and tokens[0] < tokens[1], out


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo() -> None:
    # What `make demo` runs: a private redis-server, then examples/demo.py with its URL.
    out = run([sys.executable, "-m", "devtools.demo"], timeout=75)
    assert re.match(r"redis-server redis://127\.0\.0\.1:\d+/0 \(pid \d+\)\n\nAct 1: ", out), out
    rows = re.findall(r"^  (daily|weekly|monthly) +\| +(\d+) \| +(\d+) of (\d+) ", out, re.M)
    assert len(rows) == 3, out
    for _key, executions, served, callers in rows:
        assert executions == "1" and served == callers, out
    assert "verdict: every key ran once; all 36 callers served" in out
    assert re.search(r"takeover: pid \d+ .* took over [\d.]+ s after the kill", out), out
    assert "8 of 8 surviving callers got" in out
