"""The wheel pip builds from this tree is the library alone, under its own distribution name."""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import tarfile
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
    assert f"{DIST_DIR}-{_version()}.dist-info/licenses/LICENSE" in names  # MIT asks for it
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


def _version() -> str:
    source = (ROOT / "dedupe" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"', source, re.M)
    assert version is not None
    return version.group(1)


def test_metadata_names_the_distribution_and_its_extras(wheel: Path) -> None:
    meta = metadata(wheel)
    assert meta["Name"] == DIST
    assert meta["Version"] == _version()
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == "LICENSE"
    assert meta["Requires-Python"] == ">=3.10"
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("redis") and "<" in r and ">=" in r for r in requires), requires
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"hiredis", "otel", "prometheus", "dev", "docs", "recipes", "bench"} <= extras, extras
    classifiers = meta.get_all("Classifier") or []
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Typing :: Typed" in classifiers
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(name).decode()
    assert re.search(r"^dedupe-flight = dedupe\.ops\.cli:main$", scripts, re.M), scripts


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


def test_make_dist_builds_the_sdist_and_a_wheel_from_it(tmp_path: Path) -> None:
    # What `make dist` runs: python -m build makes the sdist, then the wheel from the sdist, so
    # a file the sdist lacks (LICENSE, README.md as the description) breaks the wheel too.
    make = subprocess.run(["make", "-n", "dist"], capture_output=True, text=True, cwd=ROOT)
    assert "-m build --outdir dist ." in make.stdout, make.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=110, check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    version = _version()
    sdist = tmp_path / f"{DIST_DIR}-{version}.tar.gz"
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for needed in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "dedupe/py.typed"):
        assert needed in names, needed
    assert "constraints/dev.txt" in names and "mkdocs.yml" in names  # its tests can run
    wheel = tmp_path / f"{DIST_DIR}-{version}-py3-none-any.whl"
    assert f"{DIST_DIR}-{version}.dist-info/licenses/LICENSE" in listing(wheel)
