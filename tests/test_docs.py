"""The documentation site builds strictly (what `make docs` runs), with every public name."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dedupe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        capture_output=True, text=True, timeout=50, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a warning fails --strict
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def text(page: Path) -> str:
    """The page's text as a reader sees it (tags gone: highlighting splits code into spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_make_docs_builds_strictly() -> None:
    make = subprocess.run(["make", "-n", "docs"], capture_output=True, text=True, cwd=ROOT)
    assert make.returncode == 0 and "mkdocs build --strict" in make.stdout, make.stdout


def test_the_api_reference_has_every_public_name(site: Path) -> None:
    page = (site / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="dedupe\.(\w+)"', page))
    missing = sorted(set(dedupe.__all__) - anchors)
    assert missing == [], f"not in the API reference: {missing}"
    assert "SingleFlight(" in text(site / "api" / "index.html")  # a signature
    assert "lock_ttl" in text(site / "api" / "index.html")  # a docstring


def test_the_readme_and_the_recipes_are_pages(site: Path) -> None:
    guide = (site / "guide" / "index.html").read_text()
    assert 'id="supported-versions"' in guide and 'id="quickstart"' in guide
    for image in re.findall(r'<img[^>]+src="([^"]+)"', guide):
        assert (site / "guide" / image).resolve().is_file(), image
    recipes = text(site / "recipes" / "index.html")
    for snippet in ("await flights.aclose()", "MultiProcessCollector", "preload_app", "@app.task"):
        assert snippet in recipes, snippet
    assert (site / "changelog" / "index.html").is_file()
    assert (site / "policy" / "index.html").is_file()
