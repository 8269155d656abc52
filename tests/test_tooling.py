"""The developer tooling: pinned dependencies, the Python and redis-py matrices, the soak."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest needs tomli on 3.10
    import tomli as tomllib


from devtools import compat, pins, pythons

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]).lower()


def test_every_development_requirement_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for extra in ("dev", "docs", "recipes", "hiredis") for r in extras[extra]}
    pinned = {_name(line) for line in compat.CONSTRAINTS.read_text().splitlines()}
    assert wanted - pinned == set(), "run `make upgrade-deps`"
    for line in compat.CONSTRAINTS.read_text().splitlines():
        assert line.startswith("#") or re.match(r"^[\w.-]+==[\w.+!-]+( ; .+)?$", line), line


def test_make_install_uses_the_pins() -> None:
    make = subprocess.run(["make", "-n", "install"], capture_output=True, text=True, cwd=ROOT)
    installs = [line for line in make.stdout.splitlines() if "pip install" in line]
    assert installs and all("-c constraints/dev.txt" in line for line in installs), make.stdout


def test_pins_merge_marks_what_differs_by_python() -> None:
    by_python = {
        "3.10": {"a": ("a", "1.0"), "b": ("B", "1.0"), "tomli": ("tomli", "2.0")},
        "3.11": {"a": ("a", "1.0"), "b": ("B", "2.0")},
        "3.12": {"a": ("a", "1.0"), "b": ("B", "2.0")},
    }
    assert pins.merge(by_python) == [
        "a==1.0",
        'B==1.0 ; python_version <= "3.10"',
        'B==2.0 ; python_version >= "3.11"',
        "tomli==2.0",
    ]


def test_compat_arguments_after_the_separator_add_to_the_file_list() -> None:
    files = compat.files_with("compat")
    assert "tests/test_cluster.py" in files and "tests/test_wire.py" in files
    # The Makefile's own example: a marker and -x; the files stay (the other test files
    # import tools the compat venvs do not have).
    marked = compat.pytest_command(["-m", "compat", "-x"])
    assert marked == ["-m", "compat", *files, "-m", "compat", "-x"]
    named = compat.pytest_command(["tests/test_wire.py::test_pack", "-x"])
    assert named == ["-m", "compat", "tests/test_wire.py::test_pack", "-x"]


def test_pythons_lists_what_it_cannot_find_and_does_not_fail(tmp_path: Path) -> None:
    out = tmp_path / "pythons.md"  # not .compat/pythons.md: that holds the last real run's
    proc = subprocess.run(
        [sys.executable, "-m", "devtools.pythons", "--compat", "--only", "3.99", "--out", out],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[pythons] 3.99: skipped, not found" in proc.stdout
    assert proc.stdout.rstrip().endswith("pythons: 0 passed, 0 failed")
    assert "| 3.99 | - | skipped | not found |" in out.read_text()


def test_pythons_finds_this_interpreter() -> None:
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert minor in pythons.supported()
    found = pythons.find(minor)
    assert found.python is not None and found.version.startswith(minor + ".")


def test_make_soak_runs_both_modes() -> None:
    make = subprocess.run(["make", "-n", "soak"], capture_output=True, text=True, cwd=ROOT)
    assert "-m tests.soak --both" in make.stdout, make.stdout
    # A fault the mode does not have is refused before anything starts.
    proc = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--cluster", "--faults", "partition"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "none of --faults is a cluster fault" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_cluster_soak_runs_and_migrates_slots() -> None:
    """`make soak`'s Cluster half for a few seconds, slot migrations its only fault: it must
    start its Cluster, migrate, quiesce and pass (a migration left open fails it)."""
    args = ["--cluster", "--minutes", "0.1", "--procs", "2", "--threads", "2", "--keys", "2"]
    args += ["--faults", "migrate_slot", "--fault-interval", "0.5", "--seed", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.soak", *args],
        capture_output=True, text=True, timeout=110, cwd=ROOT, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "RESULT: PASS" in proc.stdout, out[-4000:]
    assert re.search(r"^  migrate_slot +[1-9]", proc.stdout, re.M), out[-4000:]
    assert re.search(r"^  keys migrated +[1-9]", proc.stdout, re.M), out[-4000:]


def _peers_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("cashews", "dogpile.cache"))


@pytest.mark.timeout(120)
def test_the_batch_and_cache_fill_benchmarks_run_quick_and_print_their_tables() -> None:
    # Both at once (they sleep more than they compute), each on its own redis-server and
    # fleet. Without the bench extras (cashews, dogpile.cache), dedupe's rows alone.
    from benchmarks import batches, cachefill

    if _peers_installed():
        batch_tools, fill_tools = batches.TOOLS, cachefill.EXPIRY_TOOLS + cachefill.OUTAGE_TOOLS
    else:
        batch_tools = tuple(t for t in batches.TOOLS if t.startswith("dedupe"))
        fill_tools = tuple(
            t for t in cachefill.EXPIRY_TOOLS + cachefill.OUTAGE_TOOLS if t.startswith("dedupe")
        )
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--tools", ",".join(tools)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, tools in (("batches", batch_tools), ("cachefill", dict.fromkeys(fill_tools)))
    }
    out = {}
    for name, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = stdout
    first_table = out["batches"].split("\n\n| ", 1)[1].split("\n\n", 1)[0]
    rows = {
        line.split(" | ")[0].removeprefix("| "): line.split(" | ")
        for line in first_table.splitlines()
        if line.startswith("| ")
    }
    assert set(batch_tools) <= set(rows)
    for tool in batch_tools:
        if tool.startswith("dedupe"):
            assert rows[tool][1] == "1.00", rows[tool]  # each id loaded once fleet-wide
    assert "## 1. Expiry under load" in out["cachefill"]
    assert "## 2. Failing origin" in out["cachefill"]
    for tool in fill_tools:
        assert f"| {tool} | " in out["cachefill"], tool
