"""mypy --strict over a typed user module: decorated functions keep their signatures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parent / "typed_usage" / "decorated.py"


@pytest.mark.timeout(180)
def test_decorators_keep_signatures_for_mypy(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(SAMPLE)],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=tmp_path,
    )
    out = proc.stdout
    # mypy prints builtins unqualified or qualified depending on its version.
    plain = out.replace("builtins.", "")
    # The decorated function is a FlightFunction: callable with the wrapped signature, plus
    # job_id() / detailed() / forget() with the same parameters.
    flight_function = "dedupe.functions.FlightFunction[[user_id: int], dict[str, int]]"
    assert f'Revealed type is "{flight_function}"' in plain
    assert 'Revealed type is "dedupe.functions.AsyncFlightFunction[[x: int], int]"' in plain, out
    errors = [line for line in out.splitlines() if ": error:" in line]
    # Exactly one error: the deliberate bad call on the last line; everything else type-checks.
    assert len(errors) == 1, out
    assert 'incompatible type "str"; expected "int"' in errors[0]
