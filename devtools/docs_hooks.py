"""mkdocs hooks (mkdocs.yml, `make docs`): README.md and CHANGELOG.md become pages of the site.

The README is the quick tour and stays the one source (as does the changelog): each is read at
build time, never copied into docs/. Their relative links are repository paths: those under
docs/ point at the pages' neighbours, and any other file they link to (e.g. a benchmark plot)
is added to the site under ``repo/`` so the link resolves.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PAGES = {"guide.md": "README.md", "changelog.md": "CHANGELOG.md"}  # page: repository file
_LINK = re.compile(r"(\]\()([^)#\s][^)\s]*)(\))")


def _external(target: str) -> bool:
    return "://" in target or target.startswith(("mailto:", "/"))


def _rewrite(markdown: str) -> tuple[str, list[str]]:
    """The README with its repository links made site links, and the files it needs added."""
    extra: list[str] = []

    def fix(m: re.Match[str]) -> str:
        target = m.group(2)
        if _external(target):
            return m.group(0)
        path, hash_, anchor = target.partition("#")
        page = {source: page for page, source in PAGES.items()}.get(path)
        if page is not None:  # README.md, CHANGELOG.md: their pages here
            return m.group(1) + page + hash_ + anchor + m.group(3)
        if target.startswith("docs/"):
            return m.group(1) + target.removeprefix("docs/") + m.group(3)
        extra.append(target)
        return m.group(1) + "repo/" + target + m.group(3)

    return _LINK.sub(fix, markdown), extra


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    extra: list[str] = []
    for page, original in PAGES.items():
        text, links = _rewrite((ROOT / original).read_text())
        files.append(File.generated(config, page, content=text))
        extra += links
    for target in dict.fromkeys(extra):
        source = ROOT / target
        if source.is_file():  # a missing one stays a broken link: --strict reports it
            files.append(File.generated(config, f"repo/{target}", abs_src_path=str(source)))
    return files
