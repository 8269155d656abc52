"""Write README.md's Configuration table from the declared settings (dedupe/settings.py).

``python -m devtools.readme_settings`` rewrites the part of README.md between the markers;
``--check`` changes nothing and exits 1 (printing a diff) when the README differs from what
the declarations give. tests/test_settings.py runs the same check.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from dedupe.settings import declared, per_function

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = (
    "<!-- settings: generated from dedupe/settings.py by `python -m devtools.readme_settings`;"
    " edit the declarations there, not this table -->"
)
END = "<!-- end of the generated settings -->"


def _cell(markdown: str) -> str:
    return markdown.replace("|", "\\|")


def render() -> str:
    """The generated block: the table, then what a decorated function may set itself."""
    lines = [BEGIN, "", "| setting | default | meaning |", "| --- | --- | --- |"]
    for f, d in declared():
        lines.append(f"| `{f.name}` | {_cell(d.default_text(f.default))} | {_cell(d.doc)} |")
    own = ", ".join(f"{name}=..." for name in per_function())
    lines += [
        "",
        f'Per function: `@sf(key=..., namespace=True|False|"name", {own})`,',
        "checked like the constructor's arguments; `sf(fn, key=...)` works too.",
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def splice(readme: str) -> str:
    """``readme`` with the generated block replaced by what the declarations give."""
    start = readme.find(BEGIN)
    end = readme.find(END, start)
    if start < 0 or end < 0:
        raise ValueError(f"README.md lacks the generated-settings markers ({BEGIN!r} ... {END!r})")
    after = readme.find("\n", end)
    after = len(readme) if after < 0 else after + 1
    return readme[:start] + render() + readme[after:]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.readme_settings", description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail on a difference; change nothing")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    wanted = splice(text)
    if wanted == text:
        return 0
    if args.check:
        diff = difflib.unified_diff(
            text.splitlines(keepends=True),
            wanted.splitlines(keepends=True),
            f"{args.readme} (as it is)",
            f"{args.readme} (from the declarations)",
        )
        sys.stdout.writelines(diff)
        print("README.md's settings differ from dedupe/settings.py: run "
              "python -m devtools.readme_settings", file=sys.stderr)  # fmt: skip
        return 1
    args.readme.write_text(wanted, encoding="utf-8")
    print(f"rewrote the settings in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
