"""Override values of any type become parameters Matomo stores, or are left out alone."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
from collections.abc import Iterator, Mapping
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_matomo import MatomoMiddleware, _overrides, set_tracking_params
from asgi_matomo._collector import Collector
from asgi_matomo._core import build_hits
from asgi_matomo._overrides import (
    MAX_CDT_AGE,
    MAX_OVERRIDE_PARAMETERS,
    MAX_TEXT_LENGTH,
    WARNINGS_PER_KIND,
    clean_text,
    merge_overrides,
    param_value,
    performance_value,
    timestamp,
    warn_once,
)
from asgi_matomo._proxy import parse_ip
from asgi_matomo._request import RequestInfo, TrackingConfig, inspect_request
from asgi_matomo._types import Message, Receive, Scope, Send
from asgi_matomo.testing import MatomoRecorder
from tests.helpers import BulkRecorder, call_app, config, http_scope, params_of
from tests.overrides_app import CASES, handler
from tests.servers import serve

STARTED = 1_700_000_000.75
REQUEST_TIME = "1700000000"


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the whole warning budget of the process."""
    monkeypatch.setattr(_overrides, "_warned", {})


def build(
    overrides: Mapping[Any, Any] | None, cfg: TrackingConfig | None = None
) -> list[dict[str, str]]:
    cfg = cfg or config()
    info = inspect_request(cfg, http_scope("/page"), STARTED)
    assert info is not None
    hits = build_hits(
        cfg, info, status=200, elapsed_ms=5.0, template=None, overrides=overrides, rand=lambda: 1
    )
    return [params_of(hit) for hit in hits]


def page_view(overrides: Mapping[Any, Any], cfg: TrackingConfig | None = None) -> dict[str, str]:
    hits = build(overrides, cfg)
    return hits[0]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- values that cannot be made into text --------------------------------------------------


class StrRaises:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class StrNotText:
    def __str__(self) -> str:
        return 5  # type: ignore[return-value]


class ReprRaisesToo(StrRaises):
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class StrRecurses:
    def __str__(self) -> str:
        return str(self)


class EvilStr(str):
    """A str subclass whose own methods lie or fail."""

    def __len__(self) -> int:
        raise RuntimeError("len")

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("encode")

    def __str__(self) -> str:
        raise RuntimeError("str")


def circular_list() -> list[Any]:
    items: list[Any] = []
    items.append(items)
    return items


def deep_list(depth: int) -> list[Any]:
    items: list[Any] = []
    for _ in range(depth):
        items = [items]
    return items


UNWRITABLE = [
    StrRaises(),
    StrNotText(),
    ReprRaisesToo(),
    StrRecurses(),
    circular_list(),
    deep_list(sys.getrecursionlimit() + 100),
    10**5000,  # more digits than Python prints (sys.get_int_max_str_digits)
]


@pytest.mark.parametrize("value", UNWRITABLE, ids=lambda v: type(v).__name__)
def test_a_value_without_text_is_left_out_alone(
    value: object, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        hit = page_view({"uid": value, "action_name": "Kept", "cvar": {"plan": "pro"}})
    assert "uid" not in hit
    assert hit["action_name"] == "Kept"
    assert json.loads(hit["cvar"])["3"] == ["plan", "pro"]
    (warning,) = warnings_of(caplog)
    assert "'uid' left out" in warning


def test_an_unwritable_value_keeps_the_layer_below() -> None:
    cfg = config(route_details={"/page": {"action_name": "From the route"}})
    hit = page_view({"action_name": StrRaises()}, cfg)
    assert hit["action_name"] == "From the route"


@pytest.mark.parametrize("value", UNWRITABLE, ids=lambda v: type(v).__name__)
def test_an_unwritable_custom_variable_is_left_out_alone(value: object) -> None:
    variables: dict[Any, Any] = {"bad": value, "good": "yes"}
    if not isinstance(value, list):
        variables[value] = "bad name"
    hit = page_view({"cvar": variables})
    assert json.loads(hit["cvar"]) == {
        "1": ["http_status_code", "200"],
        "2": ["http_method", "GET"],
        "3": ["good", "yes"],
    }


def test_a_str_subclass_is_read_as_its_text() -> None:
    assert param_value(EvilStr("plain")) == "plain"
    assert page_view({"uid": EvilStr("u-1")})["uid"] == "u-1"


def test_overrides_that_cannot_be_read_leave_the_hit_as_it_was() -> None:
    class Unreadable(Mapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            raise RuntimeError("no items")

        def __len__(self) -> int:
            return 1

    assert page_view(Unreadable()) == page_view({})


# --- text: bytes, surrogates, lengths --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"caf\xc3\xa9", "café"),
        (bytearray(b"plain"), "plain"),
        (memoryview(b"view"), "view"),
        (b"bad \xff byte", "bad \ufffd byte"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("pair \ud83d\ude00", "pair 😀"),
        ("\udcff", "\ufffd"),
        ([b"a", "\ud800"], '["a","\ufffd"]'),
        ({"k": b"v"}, '{"k":"v"}'),
        ({(1, 2): "tuple key", "k": 1}, '{"k":1}'),
        (MappingProxyType({"k": [1]}), '{"k":[1]}'),
        (float("nan"), "nan"),
        (10**20, "100000000000000000000"),
    ],
)
def test_override_text_is_what_matomo_reads(value: object, expected: str) -> None:
    assert param_value(value) == expected


def test_bytes_are_sent_as_their_text_not_their_repr() -> None:
    hit = page_view({"uid": b"user-7", "cvar": {b"plan": b"pro"}, "dimension2": b"\xc3\xa9"})
    assert hit["uid"] == "user-7"
    assert json.loads(hit["cvar"])["3"] == ["plan", "pro"]
    assert hit["dimension2"] == "é"


def test_every_hit_is_valid_utf8_whatever_the_text() -> None:
    (hit,) = build({"action_name": "a\ud800b", "e_c": None, "uid": "\udc80"})
    assert hit["action_name"] == "a\ufffdb"
    assert hit["uid"] == "\ufffd"


@pytest.mark.parametrize(
    ("key", "limit"),
    [
        ("action_name", 1024),
        ("url", 1024),
        ("uid", 200),
        ("dimension3", 250),
        ("dimension12", 250),
        ("e_c", MAX_TEXT_LENGTH),
        ("search", MAX_TEXT_LENGTH),
    ],
)
def test_override_values_are_clipped_to_what_matomo_stores(key: str, limit: int) -> None:
    for value in ("é" * 5000, b"x" * 9000):
        # e_c makes an event, sent as a second hit: look in both.
        hit = {k: v for params in build({key: value, "e_a": "a"}) for k, v in params.items()}
        assert len(hit[key]) == limit


def test_custom_variables_and_mapped_dimensions_are_clipped() -> None:
    cfg = config(custom_dimensions={"plan": 4})
    hit = page_view({"cvar": {"plan": "p" * 900, "n" * 900: b"v" * 900}}, cfg)
    assert len(hit["dimension4"]) == 200
    name, value = json.loads(hit["cvar"])["3"]
    assert (len(name), len(value)) == (200, 200)


def test_default_variables_mapped_to_dimensions_are_clipped_to_250() -> None:
    cfg = config(custom_dimensions={"http_method": 1})
    scope = http_scope("/", method="M" * 300)
    info = inspect_request(cfg, scope, STARTED)
    assert info is not None
    (hit,) = build_hits(
        cfg, info, status=200, elapsed_ms=None, template=None, overrides=None, rand=lambda: 1
    )
    assert len(params_of(hit)["dimension1"]) == 250


def test_clean_text_keeps_plain_text_as_it_is() -> None:
    assert clean_text("plain", 10) == "plain"
    assert clean_text("é" * 20, 10) == "é" * 10


# --- how many, and which names ---------------------------------------------------------------


def test_overrides_add_a_bounded_number_of_parameters(caplog: pytest.LogCaptureFixture) -> None:
    overrides: dict[str, Any] = {f"p{i}": i for i in range(1000)}
    overrides["action_name"] = "Still set"  # replaces a parameter: not an addition
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        hit = page_view(overrides)
    assert sum(key.startswith("p") and key[1:].isdigit() for key in hit) == MAX_OVERRIDE_PARAMETERS
    assert hit["action_name"] == "Still set"
    assert len(warnings_of(caplog)) == 1


@pytest.mark.parametrize("key", ["", "x" * 65, 7, b"uid", None])
def test_keys_that_name_no_parameter_are_left_out(key: object) -> None:
    hit = page_view({key: "v", "uid": "u"})
    assert hit["uid"] == "u"
    assert "v" not in hit.values()


BAD_NAMES = [" idsite", "idsite ", "a&b=c", "url\n", "a.b", "a b", "é", "a[b", "a]", "a[b]c", "%41"]


@pytest.mark.parametrize("key", BAD_NAMES)
def test_names_that_are_no_matomo_parameter_names_are_left_out_with_a_warning(
    key: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        hit = page_view({key: "v", "dimension1": "kept"})
    assert hit["dimension1"] == "kept"
    assert "v" not in hit.values()
    assert hit["idsite"] == "1"
    (warning,) = warnings_of(caplog)
    assert repr(key) in warning
    assert "letters, digits and _" in warning


@pytest.mark.parametrize(
    "key", ["dimension12", "search_cat", "_id", "ma_id", "pf_srv", "a[b]", "a[]"]
)
def test_matomo_parameter_names_are_kept(key: str) -> None:
    value = "0123456789abcdef" if key == "_id" else "12"
    assert page_view({key: value})[key] == value


def test_bad_names_are_warned_about_within_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        page_view({f"bad name {i}": i for i in range(50)})
        page_view({"bad name 0": 0})
    warned = [r for r in caplog.records if "no Matomo parameter has such a name" in r.getMessage()]
    assert sum(r.levelno == logging.WARNING for r in warned) == WARNINGS_PER_KIND
    assert len(warned) == 51  # the others at DEBUG level


@pytest.mark.parametrize("key", BAD_NAMES)
def test_route_details_with_a_name_that_is_no_parameter_name_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match=r"route_details\['/x'\]\[.*no Matomo parameter"):
        MatomoMiddleware(
            handler, matomo_url="https://m.example", idsite=1, route_details={"/x": {key: "v"}}
        )


@pytest.mark.anyio
async def test_names_set_by_the_app_or_its_functions_are_checked_alike(
    caplog: pytest.LogCaptureFixture,
) -> None:
    matomo = MatomoRecorder()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        set_tracking_params({"a&b=c": "x", "dimension1": "kept"})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = MatomoMiddleware(
        app,
        matomo_url="https://m.example",
        idsite=1,
        client=matomo.client,
        request_details=lambda scope, status: {" uid": "u", "dimension2": "kept"},
    )
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        await call_app(middleware, http_scope("/"))
    await matomo.aclose()
    (hit,) = matomo.hits
    assert (hit["dimension1"], hit["dimension2"]) == ("kept", "kept")
    assert not {"a", "b", " uid", "uid"} & set(hit)
    assert len(warnings_of(caplog)) == 2


def test_reserved_parameters_are_never_taken() -> None:
    hit = page_view({"token_auth": "secret", "idsite": 9, "rec": 0})
    assert (hit["idsite"], hit["rec"], "token_auth" in hit) == ("1", "1", False)


# --- visitor ids and addresses ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["_id"])
def test_a_visitor_id_matomo_would_refuse_is_left_out(
    key: str, caplog: pytest.LogCaptureFixture
) -> None:
    # (A `cid` Matomo would refuse is hashed instead: tests/test_visitor.py.)
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        hit = page_view({key: "not-hex-at-all!!", "uid": "kept"})
    assert key not in hit
    assert hit["uid"] == "kept"
    assert any("16 hexadecimal" in message for message in warnings_of(caplog))
    assert page_view({key: "0123456789ABCDEF"})[key] == "0123456789ABCDEF"


def test_a_cip_override_must_be_an_address(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(track_visitor_ip=True)
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        assert page_view({"cip": "not an ip"}, cfg)["cip"] == "203.0.113.7"
        assert page_view({"cip": StrRaises()}, cfg)["cip"] == "203.0.113.7"
    assert any("not an IP address" in message for message in warnings_of(caplog))
    assert page_view({"cip": b" 198.51.100.4 "}, cfg)["cip"] == "198.51.100.4"
    assert "cip" not in page_view({"cip": None}, cfg)


# --- cdt -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cdt",
    [
        1e300,
        10**400,
        -(10**400),
        float("nan"),
        float("inf"),
        float("-inf"),
        "1e300",
        "nan",
        "-5",
        0,
        STARTED * 1000,  # milliseconds
        STARTED + 86400,  # tomorrow
        STARTED - MAX_CDT_AGE - 1,
        datetime(1, 1, 1, tzinfo=timezone.utc),
        datetime(9999, 12, 31),
        date(2023, 11, 14),
        "2023-11-14T22:13:20Z",
        Decimal(1_700_000_000),
        StrRaises(),
        True,
    ],
    ids=repr,
)
def test_a_cdt_out_of_range_keeps_the_hit_at_the_request_time(
    cdt: object, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        hits = build({"cdt": cdt, "action_name": "Kept", "e_c": "c", "e_a": "a"})
    assert [hit["cdt"] for hit in hits] == [REQUEST_TIME, REQUEST_TIME]
    assert hits[0]["action_name"] == "Kept"
    (warning,) = warnings_of(caplog)
    assert "cdt override" in warning


@pytest.mark.parametrize(
    ("cdt", "expected"),
    [
        (1_600_000_000, 1_600_000_000.0),
        ("1600000000.5", 1_600_000_000.5),
        (b"1600000000", 1_600_000_000.0),
        ("2023-11-14 22:13:20", 1_700_000_000.0),
        (datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone(timedelta(hours=2))), 1_699_992_800.0),
        (STARTED + 30, STARTED + 30),  # set by the handler as the request ends
        (None, STARTED),
    ],
)
def test_a_cdt_in_range_is_the_hit_time(cdt: object, expected: float) -> None:
    assert timestamp(cdt, STARTED) == expected


def test_a_cdt_in_milliseconds_is_named_as_such(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        timestamp(int(STARTED * 1000), STARTED)
    (warning,) = warnings_of(caplog)
    assert "milliseconds" in warning


# --- performance values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(10**400, None), (-(10**400), None), (b"12", "12"), ("1" * 5000, None), (Fraction(3), None)],
)
def test_performance_values_of_any_size(value: object, expected: str | None) -> None:
    assert performance_value(value) == expected


# --- the warning budget ----------------------------------------------------------------------


def test_a_thousand_custom_variables_cannot_silence_other_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        page_view({"cvar": {f"v{i}": i for i in range(1000)}})
        slots = warnings_of(caplog)
        caplog.clear()
        page_view({"cdt": 1e300})
        later = warnings_of(caplog)
    assert len(slots) <= 2 * WARNINGS_PER_KIND  # left out for want of slots, and of room
    assert len(later) == 1
    assert "cdt override" in later[0]


def test_each_kind_warns_a_bounded_number_of_times(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        for i in range(50):
            warn_once(f"kind-a:{i}", "a %d", i)
            warn_once("kind-b:same", "b %d", i)
    warnings = warnings_of(caplog)
    assert [w for w in warnings if w.startswith("a ")][:-1] == [
        f"a {i}" for i in range(WARNINGS_PER_KIND - 1)
    ]
    assert len([w for w in warnings if w.startswith("a ")]) == WARNINGS_PER_KIND
    assert "further warnings of this kind" in warnings[WARNINGS_PER_KIND]
    assert [w for w in warnings if w.startswith("b ")] == ["b 0"]
    # Past the budget, still there for whoever turns DEBUG on.
    assert sum(r.getMessage() == "a 49" for r in caplog.records) == 1


def test_log_lines_show_a_value_by_its_start_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        page_view({"cdt": "z" * 2000})
    (warning,) = warnings_of(caplog)
    assert len(warning) < 300


# --- any value of any type -------------------------------------------------------------------

KEYS = [
    "action_name",
    "url",
    "urlref",
    "uid",
    "cid",
    "_id",
    "cip",
    "cdt",
    "cvar",
    "pf_srv",
    "pf_net",
    "dimension1",
    "dimension2",
    "e_c",
    "e_a",
    "e_n",
    "e_v",
    "new_visit",
    "token_auth",
    "idsite",
    "rec",
    "search",
]
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    # Built by map: hypothesis shows sampled elements, and 10**5000 has no repr.
    st.sampled_from([400, -400, 5000, 63]).map(lambda n: 10**n if n != 63 else 2**n),
    st.floats(),
    any_text,
    any_text.map(lambda text: text * 100),
    st.binary(max_size=40),
    st.binary(max_size=4).map(lambda data: bytearray(data * 600)),
    st.datetimes(),
    st.datetimes(timezones=st.timezones()),
    st.dates(),
    st.decimals(),
    st.fractions(),
    st.complex_numbers(),
    st.sampled_from([StrRaises, StrNotText, ReprRaisesToo, StrRecurses, object]).map(
        lambda kind: kind()
    ),
    st.builds(lambda: EvilStr("evil")),
    st.builds(circular_list),
)
values = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(
            st.one_of(st.sampled_from(["a", "b", 1, None]), any_text), inner, max_size=3
        ),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(KEYS), any_text, st.integers(), st.binary(max_size=8))
overrides = st.dictionaries(keys, values, max_size=8)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=overrides, route=overrides, track_ip=st.booleans())
def test_any_override_of_any_type_never_raises_nor_loses_the_hit(
    request: dict[Any, Any], route: dict[Any, Any], track_ip: bool
) -> None:
    cfg = config(track_visitor_ip=track_ip, custom_dimensions={"dim": 3})
    # Past the start-up checks of route_details: whatever the per-request cleaning may meet.
    cfg = dataclasses.replace(cfg, route_details={"/page": route})
    info = inspect_request(cfg, http_scope("/page"), STARTED)
    assert isinstance(info, RequestInfo)
    hits = build_hits(
        cfg, info, status=200, elapsed_ms=5.0, template=None, overrides=request, rand=lambda: 1
    )
    assert 1 <= len(hits) <= 2
    for hit in hits:
        assert STARTED - MAX_CDT_AGE < hit.timestamp <= STARTED + 3600
        assert math.isfinite(hit.timestamp)
        assert hit.cip is None or parse_ip(hit.cip) is not None
        encoded = hit.encode(authenticated=True)
        assert encoded.isascii()
        # Strict decoding: every value is valid UTF-8 once percent-decoded.
        params = dict(parse_qsl(encoded[1:], keep_blank_values=True, errors="strict"))
        assert params["idsite"] == "1"
        assert params["rec"] == "1"
        assert "token_auth" not in params
        assert len(encoded) < 100 * 3 * 4 * MAX_TEXT_LENGTH
        for key, value in params.items():
            assert len(key) <= 64
            if key in ("url", "action_name"):
                assert len(value) <= 1024
            elif key.startswith("dimension"):
                assert len(value) <= 250
            elif key == "uid":
                assert len(value) <= 200
            elif key in ("cid", "_id"):
                assert len(value) == 16
            elif key.startswith("pf_"):
                assert 0 <= int(value) <= 16_777_215
            else:
                assert len(value) <= MAX_TEXT_LENGTH
        if "cvar" in params:
            slots = json.loads(params["cvar"])
            assert len(slots) <= 5
            assert all(len(name) <= 200 and len(value) <= 200 for name, value in slots.values())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=overrides)
def test_merging_never_raises(source: dict[Any, Any]) -> None:
    params: dict[str, str] = {}
    custom: dict[str, str] = {}
    fields: dict[str, Any] = {}
    merge_overrides(params, custom, source, fields)
    assert set(fields) <= {"cip", "cdt"}
    assert all(type(value) is str for value in [*params.values(), *custom.values()])


# --- under a real server -------------------------------------------------------------------


@pytest.mark.slow
def test_awkward_overrides_under_a_real_server_keep_every_hit(tmp_path: Path) -> None:
    """Each request's hit reaches Matomo, with what could be cleaned and nothing else."""
    with Collector() as collector:
        with (
            serve("tests.overrides_app:app", collector.tracking_url, tmp_path) as server,
            httpx.Client(base_url=server.url) as client,
        ):
            for case in CASES:
                response = client.get(f"/{case}")
                assert (response.status_code, response.text) == (200, case)
        # The server has stopped and flushed.
        hits = {httpx.URL(hit.url or "").path.strip("/"): hit for hit in collector.hits()}
    assert sorted(hits) == sorted(CASES)
    assert (hits["bytes"].uid, hits["bytes"].action_name) == ("user-7", "café")
    assert hits["bytes"].cvar is not None
    assert hits["bytes"].cvar["3"] == ["plan", "pro"]
    for case in ("unprintable", "big-int", "cdt-float", "cdt-int", "cdt-nan", "cdt-ms", "bad-cid"):
        assert hits[case].action_name == "kept", case
        assert hits[case].uid is None, case
        # The request time (whole seconds), not the time Matomo received the hit,
        # which it would use for a cdt it ignores (the stand-in does the same).
        assert hits[case].time < hits[case].received, case
        assert hits[case].received - hits[case].time < 60, case
    # A cid Matomo would refuse is hashed into one it takes, the hit kept.
    assert re.fullmatch("[0-9a-f]{16}", hits["bad-cid"].params["cid"])
    assert (hits["surrogates"].action_name, hits["surrogates"].uid) == ("a\ufffdb", "\ufffd")
    long = hits["long"]
    assert (len(long.action_name or ""), len(long.uid or "")) == (1024, 200)
    assert len(long.params["dimension1"]) == 250
    assert hits["many-cvars"].cvar is not None
    assert len(hits["many-cvars"].cvar) == 5
    bad_names = hits["bad-names"]
    assert (bad_names.idsite, bad_names.params["dimension2"]) == (1, "kept")
    assert bad_names.url == f"https://{server.url.removeprefix('http://')}/bad-names"
    assert not {"b", "a", " idsite", "url\n"} & set(bad_names.params)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(written=overrides, replace=st.booleans())
def test_any_override_through_the_middleware_keeps_the_response_and_the_hit(
    written: dict[Any, Any], replace: bool
) -> None:
    matomo = BulkRecorder()

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        if replace:
            scope["state"]["asgi_matomo"] = written
        else:
            scope["state"]["asgi_matomo"].update(written)
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x", b"y")]})
        await send({"type": "http.response.body", "body": b"done"})

    sent: list[Message] = []

    async def main() -> None:
        app = MatomoMiddleware(
            handler,
            matomo_url="https://matomo.example.org",
            idsite=1,
            client=matomo,  # type: ignore[arg-type]
            access_token="t0ken",
        )

        async with LifespanManager(app):
            sent.extend(await call_app(app, http_scope("/page")))

    anyio.run(main)
    assert sent == [
        {"type": "http.response.start", "status": 201, "headers": [(b"x", b"y")]},
        {"type": "http.response.body", "body": b"done"},
    ]
    (body,) = matomo.received
    assert 1 <= len(body["requests"]) <= 2
    for element in body["requests"]:
        params = dict(parse_qsl(element[1:], keep_blank_values=True, errors="strict"))
        assert (params["idsite"], params["rec"]) == ("1", "1")


# --- route_details: fixed values are checked when the middleware is built -----------------


@pytest.mark.parametrize(
    ("details", "error", "match"),
    [
        ({"uid": StrRaises()}, TypeError, r"route_details\['/x'\]\['uid'\]: .*cannot be written"),
        ({"cvar": {"plan": StrRaises()}}, TypeError, r"\['cvar'\]"),
        ({"_id": "not hex"}, ValueError, r"\['_id'\]: 'not hex' is not 16 hexadecimal"),
        ({"cip": "here"}, ValueError, r"\['cip'\]: 'here' is not an IP address"),
        ({"cdt": "soon"}, ValueError, r"\['cdt'\]: 'soon' is not a time"),
        ({"cdt": float("nan")}, ValueError, r"\['cdt'\]"),
        ({"pf_srv": -5}, ValueError, r"\['pf_srv'\]: -5 is not whole milliseconds"),
        ({"x" * 65: 1}, ValueError, "no Matomo parameter"),
    ],
)
def test_route_details_matomo_would_not_take_are_refused_at_start_up(
    details: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        config(route_details={"/x": details})


def test_route_details_that_are_only_long_or_bytes_are_taken_and_cleaned() -> None:
    cfg = config(route_details={"/page": {"action_name": b"x" * 3000, "cdt": None, "cip": None}})
    assert len(page_view({}, cfg)["action_name"]) == 1024


def test_who_the_visitor_is_stays_out_of_the_log(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(track_visitor_ip=True)
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        page_view({"cip": "198.51.100.777", "cid": "user@example.org", "uid": StrRaises()}, cfg)
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "198.51.100.777" not in logged
    assert "user@example.org" not in logged
    assert "'cip' left out: <str> is not an IP address" in logged
