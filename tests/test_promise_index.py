"""tests/README.md, the index from each promise of the README to the tests that would fail if
it broke, stays in step with the README and with the tests: every test it names exists; every
test of a file it names as a promise's home (``File:``) is in it; every guarantee, trust-model
promise and failure-behaviour row of the README has its heading, with tests under it.
No servers: it reads files.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

TESTS = Path(__file__).resolve().parent
README = (TESTS.parent / "README.md").read_text()
INDEX = (TESTS / "README.md").read_text()
REF = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def section(text: str, heading: str) -> str:
    """The text under ``## heading``, up to the next ``## ``."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def norm(title: str) -> str:
    return title.strip().rstrip(".:").strip()


@cache
def defined_in(file: str) -> frozenset[str]:
    """The test functions a test file defines at its top level."""
    path = TESTS / file
    if not path.exists():
        return frozenset()
    tree = ast.parse(path.read_text())
    return frozenset(
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
    )


def entries() -> dict[str, str]:
    """The index's headings (``###``), each with the text under it."""
    parts = re.split(r"^### (.+)$", INDEX, flags=re.M)
    return {norm(title): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def guarantees() -> list[str]:
    text = section(README, "What it guarantees, in plain words")
    return [norm(g) for g in re.findall(r"^- \*\*(.+?)\*\*", text, re.M)]


def trust_promises() -> list[str]:
    text = section(README, "Trust model")
    promises = [norm(p) for p in re.findall(r"^- \*\*(.+?)\*\*", text, re.M)]
    assert "\nWhat an attacker can do, by setting" in text
    assert "\n**Record format**" in text
    return [*promises, "What an attacker can do", "Record format"]


def failure_rows() -> list[str]:
    text = section(README, "Failure behaviour")
    rows = re.findall(r"^\| (.+?) \| .+ \|$", text, re.M)
    return [norm(r) for r in rows if r not in ("what fails", "---")]


def test_every_test_the_index_names_exists() -> None:
    refs = REF.findall(INDEX)
    assert len(refs) > 100
    missing = [f"{file}::{name}" for file, name in refs if name not in defined_in(file)]
    assert not missing, f"tests/README.md names tests that do not exist: {missing}"


def test_every_test_of_a_promise_file_is_in_the_index() -> None:
    homes = re.findall(r"^File: `(test_\w+\.py)`$", INDEX, re.M)
    assert len(homes) >= 14
    named = set(REF.findall(INDEX))
    left_out = [f"{f}::{t}" for f in homes for t in sorted(defined_in(f)) if (f, t) not in named]
    assert not left_out, f"tests/README.md leaves out tests of its promise files: {left_out}"


def test_every_guarantee_has_its_entry() -> None:
    found = guarantees()
    assert len(found) >= 12 and "One run per burst" in found
    index = entries()
    missing = [g for g in found if g not in index]
    assert not missing, f"guarantees of the README without an entry in tests/README.md: {missing}"
    empty = [g for g in found if not REF.search(index[g])]
    assert not empty, f"entries with no test under them: {empty}"


def test_every_trust_model_promise_has_its_entry() -> None:
    found = trust_promises()
    assert len(found) >= 5
    index = entries()
    missing = [p for p in found if p not in index]
    assert not missing, f"trust-model promises without an entry in tests/README.md: {missing}"
    assert all(REF.search(index[p]) for p in found)


def test_every_failure_row_has_its_entry() -> None:
    found = failure_rows()
    assert len(found) >= 20 and "Redis unreachable" in found
    index = entries()
    missing = [r for r in found if r not in index]
    assert not missing, f"failure rows of the README without an entry in tests/README.md: {missing}"
    empty = [r for r in found if not REF.search(index[r])]
    assert not empty, f"entries with no test under them: {empty}"
