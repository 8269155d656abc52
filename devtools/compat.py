"""``python -m devtools.compat`` (``make compat``): the ``compat`` tests on each supported stack.

Every cell of the matrix is one redis-py release, with hiredis or without, against one server:
Redis (redis-server on PATH) or Valkey 8.1 (``DEDUPE_TEST_SERVER=valkey``, see
devtools/servers.py). Each redis-py/hiredis pair is a plain venv under ``.compat/`` (git-ignored,
reused between runs) holding the project's wheel, that redis-py and the test tools at the
versions constraints/dev.txt pins. Installing the wheel next to ``redis==X`` also checks that
pyproject's range admits X. The tests run from the source tree (its ``dedupe/`` is the wheel's
content): ``-m compat`` over the files that hold such tests (flights, hub, wire and slots on a
standalone server, and the Cluster and Sentinel tests). Arguments after ``--`` are added to that
command: a later ``-m`` replaces the marker, and naming test paths replaces the file list.
Valkey cells run with the oldest and the newest redis-py selected. Prints a markdown table (also
written to ``.compat/results.md``) and exits 1 if any cell failed.

    python -m devtools.compat [--redis 5.3.1,8.2.0] [--hiredis both|with|without]
                              [--server both|redis|valkey] [-- PYTEST_ARGS]
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

from devtools.servers import SERVER_SETTING, server_name, valkey_server_binary

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / ".compat"

# The oldest and newest release of each redis-py major that pyproject allows (`pip index
# versions redis`): redis>=5.3.1,!=8.0.*,<9. The first run (5.0.1 to 8.1.0) is why:
# 5.0.1 failed the Cluster slot-migration tests, 8.0.0 and 8.0.1 with hiredis a Sentinel
# failover test. `--redis 5.0.1,8.0.0` shows a version outside the range as "not installable".
REDIS_VERSIONS = ("5.3.1", "6.0.0", "6.4.0", "7.0.0", "7.4.1", "8.1.0", "8.2.0")
SERVERS = ("redis", "valkey")
MARKER = "compat"
# What the compat tests import besides the library (the test half of pyproject's `dev` extra),
# at the versions constraints/dev.txt pins (less its redis and hiredis: the cell picks those).
TEST_TOOLS = ("pytest", "pytest-timeout", "pytest-asyncio", "hypothesis")
CONSTRAINTS = ROOT / "constraints" / "dev.txt"
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
    server: str = "redis"
    status: str = "not run"
    hiredis_version: str = ""
    detail: str = ""
    seconds: float = 0.0

    @property
    def venv(self) -> str:
        """The venv's name: cells that differ only by server share it."""
        return f"redis-{self.redis}" + ("-hiredis" if self.hiredis else "")

    @property
    def name(self) -> str:
        return self.venv + ("" if self.server == "redis" else f"-{self.server}")


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
    drop = ("VIRTUAL_ENV", "PYTHONPATH", SERVER_SETTING)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pinned_constraints(leave_out: Sequence[str] = ()) -> Path:
    """constraints/dev.txt less the packages named in ``leave_out`` (which a cell pins itself),
    as a file under .compat/."""
    skip = {n.lower().replace("_", "-") for n in leave_out}
    keep = []
    for line in CONSTRAINTS.read_text().splitlines():
        name = re.split(r"[=<>!~;\s\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if name and not line.lstrip().startswith("#") and name not in skip:
            keep.append(line)
    out = COMPAT / ("constraints-" + ("-".join(sorted(skip)) or "all") + ".txt")
    out.write_text("\n".join(keep) + "\n")
    return out


def files_with(marker: str) -> list[str]:
    """The test files that hold tests marked ``marker``: the others may import test tools
    (lupa, OpenTelemetry, prometheus-client) that the plain venvs do not carry."""
    return sorted(
        str(f.relative_to(ROOT))
        for f in (ROOT / "tests").glob("test_*.py")
        if f"mark.{marker}" in f.read_text()
    )


def pytest_command(extra: Sequence[str], marker: str = MARKER) -> list[str]:
    """``-m MARKER FILES EXTRA``; test paths in ``extra`` replace FILES (a later ``-m`` wins)."""
    names_paths = any(not a.startswith("-") and (ROOT / a.split("::")[0]).exists() for a in extra)
    return ["-m", marker, *([] if names_paths else files_with(marker)), *extra]


def summary_line(stdout: str) -> str:
    """pytest's closing line (``84 passed, 9 deselected in 40.1s``) without its ``=`` rule."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    return lines[-1].strip("= ") if lines else ""


def prepare(cell: Cell, wheel: Path) -> Path | None:
    """Create/refresh the cell's venv; None (with cell.status set) if it cannot be installed."""
    venv = COMPAT / cell.venv
    python = venv / "bin" / "python"
    env = _clean_env()
    if not python.exists():
        proc = _run([sys.executable, "-m", "venv", str(venv)], INSTALL_TIMEOUT, env=env)
        if proc.returncode != 0:
            cell.status, cell.detail = "venv failed", proc.stderr.strip()[-300:]
            return None
    target = f"{wheel}[hiredis]" if cell.hiredis else str(wheel)
    pip = [str(python), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)]
    pins = ["-c", str(pinned_constraints(["redis"]))]
    first = [str(python), "-m", "pip", "install", "-q", *pins, target, f"redis=={cell.redis}"]
    steps = [
        [*first, *TEST_TOOLS],
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
    env = _clean_env()
    if cell.server != "redis":
        env[SERVER_SETTING] = cell.server
    try:
        proc = _run(
            [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", *pytest_args],
            TEST_TIMEOUT,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        cell.status, cell.detail = "timed out", f"after {TEST_TIMEOUT:.0f} s"
        return
    finally:
        cell.seconds = time.monotonic() - t0
    summary = summary_line(proc.stdout) or proc.stderr.strip()[-300:]
    log = COMPAT / f"{cell.name}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode == 0:
        cell.status, cell.detail = "pass", summary
    else:
        cell.status = "FAIL"
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
        cell.detail = f"{summary}; {', '.join(failed[:5])} (log: {log.relative_to(ROOT)})"


def table(cells: Sequence[Cell], pytest_args: Sequence[str], servers: dict[str, str]) -> str:
    rows = [
        f"tests: pytest {' '.join(pytest_args)}; Python {sys.version.split()[0]}",
        "",
        "| server | redis-py | hiredis | result | detail | time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        rows.append(
            f"| {servers.get(c.server, c.server)} | {c.redis} | {c.hiredis_version or 'no'} "
            f"| {c.status} | {c.detail} | {c.seconds:.0f} s |"
        )
    return "\n".join(rows)


def server_names(selected: Sequence[str]) -> dict[str, str]:
    """E.g. {"redis": "Redis 7.0.15", "valkey": "Valkey 8.1.8"}; fetches Valkey once here so
    that no cell does it."""
    names = {}
    for server in selected:
        binary = valkey_server_binary() if server == "valkey" else shutil.which("redis-server")
        names[server] = server_name(binary) if binary else f"{server} (not found)"
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1 :]
    pytest_args = pytest_command(extra)
    p = argparse.ArgumentParser(prog="python -m devtools.compat", description=__doc__)
    p.add_argument("--redis", default=",".join(REDIS_VERSIONS), help="comma-separated versions")
    p.add_argument("--hiredis", choices=("both", "with", "without"), default="both")
    p.add_argument("--server", choices=("both", *SERVERS), default="both")
    ns = p.parse_args(args)
    versions = [v.strip() for v in ns.redis.split(",") if v.strip()]
    flags = {"both": (False, True), "with": (True,), "without": (False,)}[ns.hiredis]
    servers = SERVERS if ns.server == "both" else (ns.server,)

    COMPAT.mkdir(exist_ok=True)
    (COMPAT / ".gitignore").write_text("*\n")  # venvs and logs never reach git
    names = server_names(servers)
    wheel = build_wheel()
    cells = []
    if "redis" in servers:
        cells += [Cell(v, h) for v in versions for h in flags]
    if "valkey" in servers:  # the ends of the range, hiredis as selected (without if both)
        ends = sorted(set(versions), key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v)))
        cells += [Cell(v, flags[0], "valkey") for v in dict.fromkeys([ends[0], ends[-1]])]
    for cell in cells:
        print(f"[compat] {cell.name}: installing", flush=True)
        python = prepare(cell, wheel)
        if python is not None:
            print(f"[compat] {cell.name}: testing on {names[cell.server]}", flush=True)
            run_tests(cell, python, pytest_args)
        print(f"[compat] {cell.name}: {cell.status} {cell.detail}", flush=True)
    text = table(cells, pytest_args, names)
    (COMPAT / "results.md").write_text(text + "\n")
    print(text)
    return 0 if all(c.status == "pass" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
