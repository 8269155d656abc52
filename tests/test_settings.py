"""The settings are declared once (dedupe/settings.py); these tests fail when anything that
restates them drifts: the constructor's typed signature, configure(), the decorator's
per-function keywords, the backend's config, the flight spec, and README.md (its
Configuration table is generated: ``python -m devtools.readme_settings``, checked here).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from dedupe import INHERIT, SingleFlight
from dedupe.backend.lifecycle import BackendConfig
from dedupe.core.keys import names_for
from dedupe.core.protocol import FlightSpec, FlightTerms
from dedupe.core.sealing import Codec
from dedupe.overrides import FlightParams, Overrides
from dedupe.settings import Settings, declared, help_text, per_function
from devtools import readme_settings

NOWHERE = "redis://127.0.0.1:1/0"
README = Path(__file__).resolve().parent.parent / "README.md"
FIELDS = [f for f, _ in declared()]
NAMES = [f.name for f in FIELDS]


def _function_annotation(f: dataclasses.Field[Any]) -> str:
    # A function's own value may be None where the setting has no None: it means INHERIT.
    kind = str(f.type)
    return kind if kind.endswith("| None") else f"{kind} | None"


# --------------------------------------------------------------------------- the signatures


def test_every_field_is_declared_with_its_doc_and_check() -> None:
    assert [f.name for f in dataclasses.fields(Settings)] == NAMES
    for f, d in declared():
        assert d.doc and "\n" not in d.doc and not d.doc.endswith("."), f.name
        assert callable(d.check), f.name
        d.check(f.name, f.default)  # every default passes its own check


def test_the_constructor_spells_out_every_setting_with_its_type_and_default() -> None:
    params = list(inspect.signature(SingleFlight.__init__).parameters.values())[1:]
    assert [p.name for p in params] == NAMES  # the same settings, in the same order
    for p, f in zip(params, FIELDS, strict=True):
        assert p.annotation == f.type, f"{p.name}: {p.annotation} != {f.type}"
        assert p.default == f.default and type(p.default) is type(f.default), p.name
        wanted = p.POSITIONAL_OR_KEYWORD if p.name == "url" else p.KEYWORD_ONLY
        assert p.kind is wanted, p.name
    # and each argument lands in its own field
    values: dict[str, Any] = {f.name: f.default for f in FIELDS}
    changed: dict[str, Any] = {
        "prefix": "other",
        "lock_ttl": 3.0,
        "result_ttl": 0.5,
        "token_ttl": 9.0,
    }
    sf = SingleFlight(NOWHERE, **changed)
    assert sf.settings == Settings(**{**values, "url": NOWHERE, **changed})


def test_configure_accepts_exactly_the_settings() -> None:
    sf = SingleFlight(NOWHERE)
    before = sf.settings
    sf.configure(**{name: getattr(before, name) for name in NAMES})
    assert sf.settings == before
    with pytest.raises(TypeError, match="unknown settings: nonsense"):
        sf.configure(nonsense=1)


def test_the_decorator_spells_out_every_per_function_setting() -> None:
    own = per_function()
    assert own  # lock_ttl, wait_timeout, result_ttl today
    by_name = {f.name: f for f in FIELDS}
    overloads = typing.get_overloads(SingleFlight.__call__)
    assert len(overloads) == 3
    for overload in overloads:
        params = [
            p
            for p in inspect.signature(overload).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in ("key", "namespace", "returns")
        ]
        assert tuple(p.name for p in params) == own
        for p in params:
            assert p.default is INHERIT, p.name
            assert p.annotation == _function_annotation(by_name[p.name]), p.name
    # The implementation takes them by name from the declarations, and nothing else.
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_hold'"):
        SingleFlight(NOWHERE)(max_hold=400.0)  # type: ignore[call-overload]
    # options() (call()'s per-call settings) spells out the same keywords.
    params = [
        p
        for p in inspect.signature(SingleFlight.options).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name != "returns"
    ]
    assert tuple(p.name for p in params) == own
    for p in params:
        assert p.default is INHERIT, p.name
        assert p.annotation == _function_annotation(by_name[p.name]), p.name
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_hold'"):
        SingleFlight(NOWHERE).options(max_hold=400.0)  # type: ignore[call-arg]


def test_every_setting_is_checked_alike_by_the_constructor_configure_and_the_decorator() -> None:
    odd: Any = object()
    for name in NAMES:
        with pytest.raises((TypeError, ValueError)) as built:
            SingleFlight(**{"url": NOWHERE, name: odd})
        assert name in str(built.value), (name, built.value)  # the message names it
        with pytest.raises(type(built.value)) as configured:
            SingleFlight(NOWHERE).configure(**{name: odd})
        assert str(configured.value) == str(built.value)
        if name in per_function():
            with pytest.raises(type(built.value)) as decorated:
                SingleFlight(NOWHERE)(**{name: odd})
            assert str(decorated.value) == str(built.value)


def test_none_means_inherit_only_where_none_is_no_value() -> None:
    sf = SingleFlight(NOWHERE, wait_timeout=3.0)

    @sf(lock_ttl=None, result_ttl=None, wait_timeout=None)
    def fn() -> None: ...

    own = fn._self_flown.overrides  # type: ignore[attr-defined]
    assert own == Overrides(wait_timeout=None)  # no timeout for this one; the rest inherited
    assert sf._flight_params(own).wait_timeout is None
    assert sf._flight_params(Overrides()).wait_timeout == 3.0


# --------------------------------------------------------------------------- the consumers


def test_the_backend_config_is_the_settings_resolved() -> None:
    assert issubclass(BackendConfig, Settings)
    s = SingleFlight(None, prefix="p", lock_ttl=4.0, local_cache=True, socket_timeout=1.5).settings
    cfg = BackendConfig.of(s, url=NOWHERE, codec=Codec())
    for name in NAMES:
        assert getattr(cfg, name) == (NOWHERE if name == "url" else getattr(s, name)), name
    assert cfg.name == "p"  # CLIENT SETNAME prefix


def test_every_flight_spec_field_comes_from_the_settings_or_the_flight() -> None:
    # The spec's own fields, and its function's terms (FlightTerms, shared), read as fields.
    spec_fields = set(FlightSpec.__slots__) - {"terms"} | set(FlightTerms._fields)
    # The caller's timeouts become the flight's deadlines, on its clock.
    assert spec_fields == set(FlightParams._fields) - {"wait_timeout", "soft_timeout", "terms"} | {
        "names",
        "owner",
        "deadline",
        "soft_deadline",
        "shape",  # the function's return annotation, compiled
    }
    # The terms a spec is made with are the FlightParams' own, one object for every flight.
    p = FlightParams.of(Settings())
    assert p.terms == tuple(getattr(p, name) for name in FlightTerms._fields)
    spec = FlightSpec(names=names_for("p", "x"), owner="o", deadline=None, terms=p.terms)
    assert spec.terms is p.terms
    assert all(getattr(spec, name) == getattr(p, name) for name in FlightTerms._fields)
    with pytest.raises(TypeError):
        FlightSpec(names_for("p", "x"), "o", 1, 1, 1, 1, 1, None)  # type: ignore[call-arg]


def test_a_functions_own_settings_reach_its_flight_spec_and_survive_configure(
    redis_url: str, prefix: str
) -> None:
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=2.0, result_ttl=3.0, wait_timeout=4.0)

    @sf(lock_ttl=5.0, result_ttl=0)
    def fn() -> None: ...

    own = fn._self_flown.overrides  # type: ignore[attr-defined]
    try:
        names = names_for(prefix, "x")
        spec = sf._spec_maker(sf.backend(), names, own)(None, None)
        assert (spec.lock_ttl_ms, spec.result_ttl_ms, spec.grace_ms) == (5000, 0, 7000)
        assert sf._flight_params(own).wait_timeout == 4.0  # inherited
        sf.configure(wait_timeout=6.0, lock_ttl=1.0, token_ttl=8.0)
        spec = sf._spec_maker(sf.backend(), names, own)(1.5, None)
        assert (spec.lock_ttl_ms, spec.result_ttl_ms, spec.token_ttl_ms) == (5000, 0, 8000)
        assert spec.deadline == 1.5 and sf._flight_params(own).wait_timeout == 6.0
        plain = sf._spec_maker(sf.backend(), names, Overrides())(None, None)
        assert (plain.lock_ttl_ms, plain.result_ttl_ms) == (1000, 3000)
    finally:
        sf.close()


def test_help_lists_every_setting_with_its_default() -> None:
    doc = SingleFlight.__doc__ or ""
    assert help_text(indent=4) in doc
    for name in NAMES:
        assert f"``{name}``" in doc
    decorator_doc = SingleFlight.__call__.__doc__ or ""
    assert "{per_function}" not in decorator_doc
    for name in per_function():
        assert f"``{name}``" in decorator_doc


# --------------------------------------------------------------------------- README.md


def test_the_readme_configuration_table_is_generated_from_the_declarations() -> None:
    text = README.read_text(encoding="utf-8")
    assert readme_settings.splice(text) == text, (
        "README.md's Configuration table differs from dedupe/settings.py: "
        "run python -m devtools.readme_settings"
    )
    table = text[text.index(readme_settings.BEGIN) : text.index(readme_settings.END)]
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| (.*) \|$", table, re.M)
    assert [r[0] for r in rows] == NAMES
    for (_, default, meaning), (f, d) in zip(rows, declared(), strict=True):
        assert default == d.default_text(f.default) and meaning == d.doc


def test_the_readme_check_fails_on_a_stale_table(tmp_path: Path) -> None:
    stale = README.read_text(encoding="utf-8").replace(
        "| `lock_ttl` | `10.0` s |", "| `lock_ttl` | `30.0` s |"
    )
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert readme_settings.main(["--check", "--readme", str(path)]) == 1
    assert readme_settings.main(["--readme", str(path)]) == 0  # rewrites it
    assert readme_settings.main(["--check", "--readme", str(path)]) == 0


def test_the_quickstart_shows_settings_by_their_names_and_defaults() -> None:
    text = README.read_text(encoding="utf-8")
    quick = text[text.index("## Quickstart") :]
    call = quick[quick.index("sf = SingleFlight(\n") : quick.index("\n)\n")]
    shown = dict(re.findall(r"^    (\w+)=(.+?),\s", call, re.M))
    assert shown and set(shown) <= set(NAMES), shown
    for name, value in shown.items():
        if name != "url":  # the quickstart's url is an example, not the default
            assert ast.literal_eval(value) == getattr(Settings(), name), name
