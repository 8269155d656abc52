"""The wheel pip builds from this tree is the library alone, under its own distribution name."""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST = "redis-single-flight"
DIST_DIR = DIST.replace("-", "_")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def listing(wheel: Path) -> list[str]:
    """The wheel's file names as ``python -m zipfile -l`` prints them."""
    proc = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("File Name"), proc.stdout
    return [line.split()[0] for line in lines[1:] if line.strip()]


def metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def test_wheel_holds_the_library_alone(wheel: Path) -> None:
    names = listing(wheel)
    assert wheel.name.startswith(f"{DIST_DIR}-"), wheel.name
    strays = [n for n in names if not n.startswith(("dedupe/", f"{DIST_DIR}-"))]
    assert strays == [], f"files outside dedupe/ and the dist-info: {strays}"
    dist_info = {n.split("/")[0] for n in names if not n.startswith("dedupe/")}
    assert len(dist_info) == 1 and dist_info.pop().endswith(".dist-info")
    assert "dedupe/py.typed" in names  # PEP 561: the package's inline types reach users
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_has_every_module_of_the_package(wheel: Path) -> None:
    shipped = {n for n in listing(wheel) if n.endswith(".py")}
    source = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "dedupe").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert shipped == source


def test_library_never_imports_the_dev_tools(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        offenders = [
            n
            for n in z.namelist()
            if (n.endswith(".py") and b"devtools" in z.read(n)) or "_servers" in n
        ]
    assert offenders == []


def test_metadata_names_the_distribution_and_its_extras(wheel: Path) -> None:
    meta = metadata(wheel)
    assert meta["Name"] == DIST
    source = (ROOT / "dedupe" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"', source, re.M)
    assert version is not None and meta["Version"] == version.group(1)
    assert meta["Requires-Python"] == ">=3.10"
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("redis") and "<" in r and ">=" in r for r in requires), requires
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"hiredis", "otel", "prometheus", "dev", "bench"} <= extras, extras
    classifiers = meta.get_all("Classifier") or []
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Typing :: Typed" in classifiers
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(name).decode()
    assert re.search(r"^dedupe-flight = dedupe\.cli:main$", scripts, re.M), scripts


def test_the_installed_wheel_imports_on_its_own(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        capture_output=True,
        timeout=60,
        check=True,
    )
    # Run outside the source tree with the unpacked wheel first on the path: the import must
    # come from the wheel and must not pull in devtools.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import dedupe; "
        "assert dedupe.__file__.startswith(sys.argv[1]), dedupe.__file__; "
        "assert 'devtools' not in sys.modules; print(dedupe.SingleFlight.__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "SingleFlight"


def test_a_quick_benchmark_run_leaves_the_committed_results_alone() -> None:
    make = subprocess.run(
        ["make", "-n", "bench-quick"], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert make.returncode == 0, make.stderr
    assert "--out benchmarks/results/quick" in make.stdout, make.stdout
    quick = "benchmarks/results/quick/latest.md"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", quick], cwd=ROOT, timeout=30, check=False
    )
    assert ignored.returncode == 0, f"{quick} is not git-ignored"
    committed = subprocess.run(
        ["git", "check-ignore", "-q", "benchmarks/results/latest.md"], cwd=ROOT, timeout=30
    )
    assert committed.returncode == 1  # the full results stay tracked
