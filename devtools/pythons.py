"""``python -m devtools.pythons`` (``make test-pythons``): the tests on each supported Python.

The supported versions are pyproject's ``Programming Language :: Python :: 3.X`` classifiers.
For each, the first interpreter that runs and can make a venv is taken from: pyenv's versions
(``$PYENV_ROOT/versions/3.X.*``, newest patch first), ``python3.X`` on PATH (a pyenv shim that
cannot run it counts as absent), ``/usr/local/bin``, ``/usr/bin`` and uv's managed Pythons.
Each runs in a venv under ``.compat/py3.X`` (git-ignored, reused) with this tree installed
editable and every package at the version constraints/dev.txt pins. Versions not found are
listed as skipped: an absent interpreter is never a failure. The Python of ``make test`` (this
one) is left out unless ``--include-current``, since ``make test`` runs everything on it.

By default the whole suite runs (``-m "not soak"``, every extra installed); ``--compat`` runs
the ``compat`` tests only, with the test tools alone (what ``.ci/run`` does: about a minute per
interpreter). Arguments after ``--`` are added to the pytest command as in devtools.compat.
Prints a markdown table (also in ``.compat/pythons.md``, or ``--out``) and a closing
``N passed, N failed`` line; exits 1 if any run failed.

    python -m devtools.pythons [--compat] [--include-current] [--only 3.12,3.13] [-- ARGS]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools.compat import (
    COMPAT,
    CONSTRAINTS,
    INSTALL_TIMEOUT,
    MARKER,
    ROOT,
    TEST_TIMEOUT,
    TEST_TOOLS,
    _clean_env,
    _run,
    pytest_command,
    summary_line,
)

EXTRAS = "dev,docs,recipes"  # what `make install` puts in the main venv


def supported() -> list[str]:
    """["3.10", "3.11", ...]: pyproject's Python classifiers."""
    text = (ROOT / "pyproject.toml").read_text()
    return re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)


def _version_key(path: str) -> tuple[int, ...]:
    m = re.search(r"/(\d+)\.(\d+)\.(\d+)[^/]*/bin/", path)
    return tuple(int(g) for g in m.groups()) if m else (0,)


def candidates(minor: str) -> Iterator[str]:
    """Places a ``python3.X`` may be, most specific first (each may not exist or not run)."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found = glob.glob(str(pyenv / "versions" / f"{minor}.*" / "bin" / f"python{minor}"))
    yield from sorted(found, key=_version_key, reverse=True)
    on_path = shutil.which(f"python{minor}")
    if on_path:
        yield on_path
    yield from (f"/usr/local/bin/python{minor}", f"/usr/bin/python{minor}")
    uv = Path.home() / ".local" / "share" / "uv" / "python"
    yield from sorted(glob.glob(str(uv / f"cpython-{minor}.*" / "bin" / f"python{minor}")))


_PROBE = "import sys, venv, ensurepip; print('%d.%d.%d' % sys.version_info[:3])"


@dataclass
class Found:
    minor: str
    python: str | None = None
    version: str = ""
    why_not: str = ""  # when python is None: what was tried


def find(minor: str) -> Found:
    tried = []
    seen: set[str] = set()
    for path in candidates(minor):
        if path in seen or not os.access(path, os.X_OK):
            continue
        seen.add(path)
        try:
            proc = _run([path, "-c", _PROBE], 30, env=_clean_env(), cwd="/")
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{path}: {exc}")
            continue
        version = proc.stdout.strip()
        if proc.returncode == 0 and version.startswith(f"{minor}."):
            return Found(minor, path, version)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        tried.append(f"{path}: {last[:120]}")
    return Found(minor, why_not="; ".join(tried) or "no python" + minor + " found")


@dataclass
class Run:
    found: Found
    status: str = "not run"
    detail: str = ""
    passed: int = 0
    failed: int = 0
    seconds: float = 0.0


def prepare(run: Run, full: bool) -> Path | None:
    """The interpreter's venv with this tree (editable) and the pinned test set."""
    assert run.found.python is not None
    venv = COMPAT / f"py{run.found.minor}"
    python = venv / "bin" / "python"
    env = _clean_env()
    if not python.exists():
        proc = _run([run.found.python, "-m", "venv", str(venv)], INSTALL_TIMEOUT, env=env)
        if proc.returncode != 0:
            run.status, run.detail = "venv failed", proc.stderr.strip()[-300:]
            return None
    what = ["-e", f".[{EXTRAS}]"] if full else ["-e", ".", *TEST_TOOLS]
    cmd = [str(python), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), *what]
    proc = _run(cmd, INSTALL_TIMEOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        run.status = "not installable"
        run.detail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return None
    return python


def _count(summary: str, word: str) -> int:
    m = re.search(rf"(\d+) {word}", summary)
    return int(m.group(1)) if m else 0


def test(run: Run, python: Path, pytest_args: Sequence[str]) -> None:
    t0 = time.monotonic()
    cmd = [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", *pytest_args]
    try:
        proc = _run(cmd, TEST_TIMEOUT, env=_clean_env(), cwd=ROOT)
    except subprocess.TimeoutExpired:
        run.status, run.detail = "timed out", f"after {TEST_TIMEOUT:.0f} s"
        return
    finally:
        run.seconds = time.monotonic() - t0
    log = COMPAT / f"py{run.found.minor}.log"
    log.write_text(proc.stdout + proc.stderr)
    summary = summary_line(proc.stdout) or proc.stderr.strip()[-300:]
    run.passed = _count(summary, "passed")
    run.failed = _count(summary, "failed") + _count(summary, "errors?")
    if proc.returncode == 0 and run.passed > 0:
        run.status, run.detail = "pass", summary
    else:  # exit 5 (nothing collected) is a failure too
        run.status = "FAIL"
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
        run.detail = f"{summary}; {', '.join(failed[:5])} (log: {log.relative_to(ROOT)})"
        run.failed = max(run.failed, 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m devtools.pythons", description=__doc__)
    p.add_argument("--compat", action="store_true", help=f"only the {MARKER!r} tests")
    p.add_argument("--include-current", action="store_true", help="also this interpreter")
    p.add_argument("--only", default="", help="comma-separated versions, e.g. 3.12,3.13")
    p.add_argument("--out", default=str(COMPAT / "pythons.md"), help="the table's file")
    ns = p.parse_args(args)
    full = not ns.compat
    pytest_args = ["-m", "not soak", *extra] if full else pytest_command(extra)
    wanted = [v.strip() for v in ns.only.split(",") if v.strip()] or supported()
    current = f"{sys.version_info[0]}.{sys.version_info[1]}"

    COMPAT.mkdir(exist_ok=True)
    (COMPAT / ".gitignore").write_text("*\n")
    runs: list[Run] = []
    for minor in wanted:
        if minor == current and not ns.include_current:
            print(f"[pythons] {minor}: this interpreter; `make test` runs the suite on it")
            continue
        found = find(minor)
        if found.python is None:
            print(f"[pythons] {minor}: skipped, not found ({found.why_not})", flush=True)
            runs.append(Run(found, "skipped", "not found"))
            continue
        run = Run(found)
        runs.append(run)
        print(f"[pythons] {minor}: found {found.python} ({found.version}); installing", flush=True)
        python = prepare(run, full)
        if python is not None:
            print(f"[pythons] {minor}: pytest {' '.join(pytest_args)[:120]}", flush=True)
            test(run, python, pytest_args)
        print(f"[pythons] {minor}: {run.status} {run.detail} ({run.seconds:.0f} s)", flush=True)

    rows = [
        f"tests: pytest {' '.join(pytest_args)}",
        "",
        "| Python | interpreter | result | detail | time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        where = r.found.python or "-"
        version = r.found.version or r.found.minor
        rows.append(f"| {version} | {where} | {r.status} | {r.detail} | {r.seconds:.0f} s |")
    text = "\n".join(rows)
    Path(ns.out).write_text(text + "\n")
    print(text)
    ran = [r for r in runs if r.status != "skipped"]
    skipped = [r.found.minor for r in runs if r.status == "skipped"]
    print(
        f"[pythons] ran on {', '.join(r.found.version for r in ran) or 'none'}; "
        f"skipped (not found): {', '.join(skipped) or 'none'}"
    )
    # One plain closing line for whoever reads the end of the log.
    print(f"pythons: {sum(r.passed for r in ran)} passed, {sum(r.failed for r in ran)} failed")
    return 0 if all(r.status == "pass" for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
