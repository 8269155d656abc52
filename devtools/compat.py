"""``python -m devtools.compat`` (``make compat``): the core tests against each supported redis-py.

Every cell of the matrix is a plain venv under ``.compat/`` (git-ignored, reused between runs)
holding the project's wheel, one pinned redis-py, hiredis or not, and the test tools. Installing
the wheel next to ``redis==X`` also checks that pyproject's range admits X. The tests run from
the source tree (its ``dedupe/`` is the wheel's content) with ``-m core`` unless other pytest
arguments follow ``--``. Prints a markdown table (also written to ``.compat/results.md``) and
exits 1 if any cell failed.

    python -m devtools.compat [--redis 5.0.1,8.1.0] [--hiredis both|with|without] [-- ARGS]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / ".compat"

# The oldest and newest release of each redis-py major that pyproject allows (`pip index
# versions redis`, Dec 2026): redis>=5.3.1,!=8.0.*,<9. The first run (5.0.1 to 8.1.0) is why:
# 5.0.1 failed the Cluster slot-migration tests, 8.0.0 and 8.0.1 with hiredis a Sentinel
# failover test. `--redis 5.0.1,8.0.0` shows a version outside the range as "not installable".
REDIS_VERSIONS = ("5.3.1", "6.0.0", "6.4.0", "7.0.0", "7.4.1", "8.1.0")
# What the core tests import besides the library (the test half of pyproject's `dev` extra).
TEST_TOOLS = ("pytest>=8", "pytest-timeout>=2.2", "pytest-asyncio>=0.24", "hypothesis>=6.100")
# Prints: redis-py version, whether redis-py uses hiredis, and hiredis's version if it does.
_PROBE = (
    "import redis, redis.utils as u; print(redis.__version__, u.HIREDIS_AVAILABLE, "
    "__import__('hiredis').__version__ if u.HIREDIS_AVAILABLE else '')"
)
INSTALL_TIMEOUT = 600.0
TEST_TIMEOUT = 900.0


@dataclass
class Cell:
    redis: str
    hiredis: bool
    status: str = "not run"
    hiredis_version: str = ""
    detail: str = ""
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"redis-{self.redis}" + ("-hiredis" if self.hiredis else "")


def _run(
    cmd: Sequence[str],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
    )


def build_wheel() -> Path:
    """The project's wheel, built once per run into .compat/wheel/."""
    out = COMPAT / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        INSTALL_TIMEOUT,
    )
    wheels = sorted(out.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise SystemExit(f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}")
    return wheels[0]


def _clean_env() -> dict[str, str]:
    """The environment without this venv's activation, so a cell's python finds its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def prepare(cell: Cell, wheel: Path) -> Path | None:
    """Create/refresh the cell's venv; None (with cell.status set) if it cannot be installed."""
    venv = COMPAT / cell.name
    python = venv / "bin" / "python"
    env = _clean_env()
    if not python.exists():
        proc = _run([sys.executable, "-m", "venv", str(venv)], INSTALL_TIMEOUT, env=env)
        if proc.returncode != 0:
            cell.status, cell.detail = "venv failed", proc.stderr.strip()[-300:]
            return None
    target = f"{wheel}[hiredis]" if cell.hiredis else str(wheel)
    pip = [str(python), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)]
    steps = [
        [str(python), "-m", "pip", "install", "-q", target, f"redis=={cell.redis}", *TEST_TOOLS],
        pip,  # the freshly built wheel even if the venv held one of the same version
    ]
    if not cell.hiredis:
        steps.append([str(python), "-m", "pip", "uninstall", "-q", "-y", "hiredis"])
    for cmd in steps:
        proc = _run(cmd, INSTALL_TIMEOUT, env=env)
        if proc.returncode != 0 and "uninstall" not in cmd:
            cell.status = "not installable"
            cell.detail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            return None
    probe = _run([str(python), "-c", _PROBE], 60, env=env, cwd="/")
    got = probe.stdout.split()
    if got[:2] != [cell.redis, str(cell.hiredis)]:
        cell.status = "wrong install"
        cell.detail = f"wanted redis {cell.redis}, hiredis {cell.hiredis}; got {probe.stdout!r}"
        return None
    cell.hiredis_version = got[2] if len(got) > 2 else ""
    return python


def run_tests(cell: Cell, python: Path, pytest_args: Sequence[str]) -> None:
    t0 = time.monotonic()
    try:
        proc = _run(
            [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", *pytest_args],
            TEST_TIMEOUT,
            env=_clean_env(),
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        cell.status, cell.detail = "timed out", f"after {TEST_TIMEOUT:.0f} s"
        return
    finally:
        cell.seconds = time.monotonic() - t0
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else proc.stderr.strip()[-300:]
    log = COMPAT / f"{cell.name}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode == 0:
        cell.status, cell.detail = "pass", summary
    else:
        cell.status = "FAIL"
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
        cell.detail = f"{summary}; {', '.join(failed[:5])} (log: {log.relative_to(ROOT)})"


def table(cells: Sequence[Cell], pytest_args: Sequence[str]) -> str:
    rows = [
        f"tests: pytest {' '.join(pytest_args)}; Python {sys.version.split()[0]}",
        "",
        "| redis-py | hiredis | result | detail | time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        rows.append(
            f"| {c.redis} | {c.hiredis_version or 'no'} | {c.status} | {c.detail} "
            f"| {c.seconds:.0f} s |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Only the files that hold core tests: the others may import test tools (lupa,
    # OpenTelemetry, prometheus-client) these plain venvs do not carry.
    core_files = sorted(
        str(f.relative_to(ROOT))
        for f in (ROOT / "tests").glob("test_*.py")
        if "mark.core" in f.read_text()
    )
    pytest_args = ["-m", "core", *core_files]
    if "--" in args:
        i = args.index("--")
        args, pytest_args = args[:i], args[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m devtools.compat", description=__doc__)
    p.add_argument("--redis", default=",".join(REDIS_VERSIONS), help="comma-separated versions")
    p.add_argument("--hiredis", choices=("both", "with", "without"), default="both")
    ns = p.parse_args(args)
    versions = [v.strip() for v in ns.redis.split(",") if v.strip()]
    flags = {"both": (False, True), "with": (True,), "without": (False,)}[ns.hiredis]

    COMPAT.mkdir(exist_ok=True)
    (COMPAT / ".gitignore").write_text("*\n")  # venvs and logs never reach git
    wheel = build_wheel()
    cells = [Cell(v, h) for v in versions for h in flags]
    for cell in cells:
        print(f"[compat] {cell.name}: installing", flush=True)
        python = prepare(cell, wheel)
        if python is not None:
            print(f"[compat] {cell.name}: testing", flush=True)
            run_tests(cell, python, pytest_args)
        print(f"[compat] {cell.name}: {cell.status} {cell.detail}", flush=True)
    text = table(cells, pytest_args)
    (COMPAT / "results.md").write_text(text + "\n")
    print(text)
    return 0 if all(c.status == "pass" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
