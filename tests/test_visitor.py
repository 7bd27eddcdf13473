"""Visitor ids: the JS tracker's cookie, the keyed daily hash, its key, and the hits they go to."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from asgi_matomo import _visitor, _visitor_key
from asgi_matomo._core import build_hits
from asgi_matomo._headers import COOKIE_VISITOR, read_headers, read_headers_by_loop
from asgi_matomo._request import inspect_request
from asgi_matomo._visitor import VisitorIds, cookie_pattern, cookie_visitor_id
from tests.helpers import config, http_scope, params_of

KEY = b"k" * 32
DAY = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
NEXT_DAY = DAY + 86400
ROOT = Path(__file__).resolve().parent.parent


def hit_params(cfg: Any, scope: dict[str, Any], **kwargs: Any) -> list[dict[str, str]]:
    info = inspect_request(cfg, scope, DAY)
    assert info is not None
    options: dict[str, Any] = {
        "status": 200,
        "elapsed_ms": 1.0,
        "template": None,
        "overrides": None,
        "rand": lambda: 1,
    }
    options.update(kwargs)
    return [params_of(hit) for hit in build_hits(cfg, info, **options)]


def browser(
    ip: str = "198.51.100.1", ua: bytes = b"Mozilla/5.0", cookie: bytes | None = None
) -> dict[str, Any]:
    headers = [(b"host", b"example.org"), (b"user-agent", ua)]
    if cookie is not None:
        headers.append((b"cookie", cookie))
    return http_scope("/page", headers=headers, client=(ip, 40000))


# -- the JavaScript tracker's cookie ---------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"_pk_id.1.1fff=0123456789ABCDEF.1700000000.", "0123456789abcdef"),
        (b"a=b; _pk_id.1.1fff=0123456789abcdef.1700000000.; c=d", "0123456789abcdef"),
        (
            b"a=b;_pk_id.1.e3b0=fedcba9876543210.1700000000.1.1700000000.1700000000",
            "fedcba9876543210",
        ),
        (b'_pk_id.1.1fff="0123456789abcdef.1700000000."', "0123456789abcdef"),
        (b"_pk_id.1.1fff=0123456789abcdef", "0123456789abcdef"),
        # Another site's cookie, a look-alike name, a short or long id, not hex.
        (b"_pk_id.12.1fff=0123456789abcdef.1700000000.", None),
        (b"x_pk_id.1.1fff=0123456789abcdef.1700000000.", None),
        (b"_pk_id.1.1fff=0123456789abcde.1700000000.", None),
        (b"_pk_id.1.1fff=0123456789abcdef0.1700000000.", None),
        (b"_pk_id.1.1fff=0123456789abcdeg.1700000000.", None),
        (b"_pk_ses.1.1fff=1; other=0123456789abcdef", None),
        (b"", None),
    ],
)
def test_cookie_visitor_id(header: bytes, expected: str | None) -> None:
    assert cookie_visitor_id(header, cookie_pattern(1)) == expected


def test_the_cookie_names_the_visitor() -> None:
    cfg = config(visitor_ids=True, visitor_key=KEY)
    cookie = b"_pk_id.1.1fff=0123456789abcdef.1700000000.; session=xyz"
    (page,) = hit_params(cfg, browser(cookie=cookie))
    assert page["cid"] == "0123456789abcdef"
    # Without the cookie, the same visitor gets the hashed id.
    (plain,) = hit_params(cfg, browser())
    assert plain["cid"] != "0123456789abcdef"


def test_cookies_split_over_several_fields_are_read() -> None:
    # HTTP/2 lets a client send each cookie in a field of its own.
    pattern = cookie_pattern(1)
    headers = [(b"cookie", b"a=b"), (b"cookie", b"_pk_id.1.aaaa=0123456789abcdef.1.")]
    assert read_headers({"headers": headers}, cookie=pattern)[COOKIE_VISITOR] == "0123456789abcdef"
    # A non-bytes value is no cookie.
    assert COOKIE_VISITOR not in read_headers({"headers": [(b"cookie", "text")]}, cookie=pattern)
    assert COOKIE_VISITOR not in read_headers_by_loop([(b"Cookie", "text")], pattern)


cookie_headers = st.lists(
    st.tuples(
        st.sampled_from([b"cookie", b"Cookie", b"user-agent", b"host"]),
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"_pk_id.1.ab=0123456789abcdef.1.", b"_pk_id.1.ab=FEDCBA9876543210"]),
            st.binary(max_size=10).map(lambda b: b + b"; _pk_id.1.x=00000000000000aa."),
            st.binary(max_size=10).map(bytearray),
        ),
    ),
    max_size=6,
)


@settings(max_examples=500, deadline=None)
@given(headers=cookie_headers)
def test_the_fast_header_table_reads_the_cookie_as_the_careful_loop(
    headers: list[tuple[bytes, bytes]],
) -> None:
    pattern = cookie_pattern(1)
    assert read_headers({"headers": headers}, cookie=pattern) == read_headers_by_loop(
        headers, pattern
    )


def test_cookies_are_not_read_when_visitor_ids_are_off() -> None:
    headers = [(b"cookie", b"_pk_id.1.aaaa=0123456789abcdef.1.")]
    assert read_headers({"headers": headers}) == {}
    assert read_headers_by_loop([(b"Cookie", b"_pk_id.1.aaaa=0123456789abcdef.1.")]) == {}


# -- the keyed daily hash ---------------------------------------------------------------


def test_daily_ids_are_16_hex_and_stable_for_a_day() -> None:
    ids = VisitorIds(KEY, 1)
    first = ids.daily_id("198.51.100.1", "UA", DAY)
    assert len(first) == 16
    assert int(first, 16) >= 0
    assert ids.daily_id("198.51.100.1", "UA", DAY + 60) == first
    assert VisitorIds(KEY, 1).daily_id("198.51.100.1", "UA", DAY) == first
    assert ids.daily_id("198.51.100.1", "UA", NEXT_DAY) != first
    assert ids.daily_id("198.51.100.2", "UA", DAY) != first
    assert ids.daily_id("198.51.100.1", "UA2", DAY) != first
    assert VisitorIds(KEY, 2).daily_id("198.51.100.1", "UA", DAY) != first
    assert VisitorIds(b"another key, long enough", 1).daily_id("198.51.100.1", "UA", DAY) != first
    # No address or no user agent is a visitor too.
    assert len({ids.daily_id(None, None, DAY), ids.daily_id("", "", DAY), first}) == 2


def test_the_cache_is_bounded_and_emptied_each_day(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_visitor, "CACHE_SIZE", 3)
    ids = VisitorIds(KEY, 1)
    expected = {f"10.0.0.{n}": ids.daily_id(f"10.0.0.{n}", "UA", DAY) for n in range(10)}
    assert len(ids.ids) <= 3
    # A cleared cache gives the same ids again: it only saves hashing.
    assert {ip: ids.daily_id(ip, "UA", DAY) for ip in expected} == expected
    ids.daily_id("10.0.0.1", "UA", NEXT_DAY)
    assert list(ids.ids) == [("10.0.0.1", "UA")]
    assert ids.since == NEXT_DAY // 86400 * 86400


def test_app_ids_and_cid_overrides() -> None:
    ids = VisitorIds(KEY, 1)
    account = ids.app_id("account-42")
    assert account is not None
    assert len(account) == 16
    assert ids.app_id(b"account-42") == account
    assert ids.app_id(42) == ids.app_id("42")
    # Not the same value as a day's id of anything: hashed apart.
    assert account != ids.daily_id("account-42", "", 0)
    assert [ids.app_id(value) for value in (None, "", True, 1.5, object())] == [None] * 5
    assert ids.cid("0123456789ABCDEF") == "0123456789abcdef"
    assert ids.cid("not sixteen hex") == ids.app_id("not sixteen hex")


def test_the_key_is_in_no_repr() -> None:
    ids = VisitorIds(KEY, 1)
    cfg = config(visitor_ids=True, visitor_key=KEY.decode())
    for text in (repr(ids), repr(cfg), str(cfg)):
        assert KEY.decode() not in text
        assert ids._key.hex() not in text
    assert repr(ids) == "VisitorIds(idsite=1)"


# -- the hits ---------------------------------------------------------------------------


def test_every_hit_carries_the_visitor_id_the_event_too() -> None:
    cfg = config(visitor_ids=True, visitor_key=KEY)
    expected = VisitorIds(KEY, 1).daily_id("198.51.100.1", "Mozilla/5.0", DAY)
    (plain,) = hit_params(cfg, browser())
    page, event = hit_params(cfg, browser(), overrides={"e_c": "Video", "e_a": "Play"})
    assert plain["cid"] == page["cid"] == event["cid"] == expected
    assert "cid" not in hit_params(config(), browser())[0]


def test_the_hash_uses_the_address_behind_trusted_proxies_and_before_masking() -> None:
    cfg = config(
        visitor_ids=True, visitor_key=KEY, trusted_proxies=["10.0.0.0/8"], anonymize_ip_bytes=2
    )
    ids = VisitorIds(KEY, 1)
    scope = http_scope(
        "/",
        headers=[(b"user-agent", b"UA"), (b"x-forwarded-for", b"198.51.100.77")],
        client=("10.0.0.1", 40000),
    )
    (page,) = hit_params(cfg, scope)
    assert page["cid"] == ids.daily_id("198.51.100.77", "UA", DAY)
    assert "198.51.100" not in json.dumps(page)  # no token: the IP never leaves


def test_a_uid_wins_over_every_visitor_id() -> None:
    cfg = config(visitor_ids=True, visitor_key=KEY)
    cookie = b"_pk_id.1.1fff=0123456789abcdef.1."
    for kwargs in (
        {"overrides": {"uid": "u-1"}},
        {"app_details": {"uid": "u-1"}},
        {"overrides": {"uid": "u-1", "cid": "0123456789abcdef"}},
        {"overrides": {"uid": "u-1"}, "visitor_id": "fedcba9876543210"},
    ):
        for hit in hit_params(cfg, browser(cookie=cookie), **kwargs):
            assert hit["uid"] == "u-1"
            assert "cid" not in hit


def test_visitor_id_precedence() -> None:
    cfg = config(visitor_ids=True, visitor_key=KEY)
    cookie = b"_pk_id.1.1fff=0123456789abcdef.1."
    app_id = "fedcba9876543210"
    assert hit_params(cfg, browser(cookie=cookie), visitor_id=app_id)[0]["cid"] == app_id
    own = {"overrides": {"cid": "AAAAAAAAAAAAAAAA"}, "visitor_id": app_id}
    assert hit_params(cfg, browser(cookie=cookie), **own)[0]["cid"] == "aaaaaaaaaaaaaaaa"
    # A cid Matomo would refuse (400, the hit lost) is hashed to one it accepts.
    (hashed,) = hit_params(cfg, browser(), overrides={"cid": "user@example.org"})
    assert hashed["cid"] == VisitorIds(KEY, 1).app_id("user@example.org")
    # With visitor ids off, a handler's valid cid is still sent, an invalid one dropped.
    assert hit_params(config(), browser(), overrides={"cid": "0123456789ABCDEF"})[0]["cid"] == (
        "0123456789abcdef"
    )
    assert "cid" not in hit_params(config(), browser(), overrides={"cid": "nope"})[0]


# -- the key ----------------------------------------------------------------------------


def test_key_from_the_option_then_the_environment_then_the_host(tmp_path: Path) -> None:
    env = {_visitor_key.ENV_VAR: "from-the-environment-0123"}
    assert _visitor_key.visitor_key("from-the-option-0123456", env, str(tmp_path)) == (
        b"from-the-option-0123456"
    )
    assert _visitor_key.visitor_key(b"\x00" * 16, env, str(tmp_path)) == b"\x00" * 16
    assert _visitor_key.visitor_key(None, env, str(tmp_path)) == b"from-the-environment-0123"
    assert not list(tmp_path.iterdir())
    from_file = _visitor_key.visitor_key(None, {_visitor_key.ENV_VAR: ""}, str(tmp_path))
    assert len(from_file) == 32
    assert _visitor_key.visitor_key(None, {}, str(tmp_path)) == from_file


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("a-short-secret", ValueError, "visitor_key must be a secret of at least 16"),
        ("   padded   short  ", ValueError, "at least 16 characters"),
        (b"short", ValueError, "at least 16"),
        (12345678901234567890, TypeError, "visitor_key must be a string or bytes, got int"),
    ],
)
def test_a_bad_key_option_is_an_error_that_does_not_show_it(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        config(visitor_ids=True, visitor_key=value)
    assert str(value).strip() not in str(raised.value)


def test_a_bad_key_in_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_visitor_key.ENV_VAR, "hunter2")
    with pytest.raises(ValueError, match="ASGI_MATOMO_VISITOR_KEY must be a secret") as raised:
        config(visitor_ids=True)
    assert "hunter2" not in str(raised.value)
    # Not read at all when visitor ids are off.
    assert config(visitor_ids=False).visitor is None


def test_the_host_key_file_is_private_and_shared(tmp_path: Path) -> None:
    key = _visitor_key.host_key(str(tmp_path))
    (path,) = tmp_path.iterdir()
    assert path.name.startswith(_visitor_key.KEY_FILE_PREFIX)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes.fromhex(path.read_text().strip()) == key
    assert _visitor_key.host_key(str(tmp_path)) == key


def test_workers_starting_together_agree_on_the_key(tmp_path: Path) -> None:
    code = (
        "import sys; from asgi_matomo._visitor_key import host_key;"
        "print(host_key(sys.argv[1]).hex())"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    keys = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert len(keys) == 1
    assert [path.name for path in tmp_path.iterdir()] == [Path(_visitor_key.key_file()).name]


@pytest.mark.parametrize("case", ["mode", "directory", "content", "symlink", "owner"])
def test_an_unsafe_key_file_gives_a_process_key_and_one_warning(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = Path(_visitor_key.key_file(str(tmp_path)))
    planted = "ab" * 32
    if case == "mode":
        path.write_text(planted)
        path.chmod(0o644)
    elif case == "directory":
        path.mkdir()
    elif case == "content":
        path.write_text("not a key")
        path.chmod(0o600)
    elif case == "symlink":
        target = tmp_path / "elsewhere"
        target.write_text(planted)
        target.chmod(0o600)
        path.symlink_to(target)
    else:
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        path.write_text(planted)
        path.chmod(0o600)
        os.chown(path, 65534, 65534)
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        first = _visitor_key.host_key(str(tmp_path))
    assert first != bytes.fromhex(planted)
    assert len(first) == 32
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage()
    assert "ASGI_MATOMO_VISITOR_KEY" in record.getMessage()
    assert first.hex() not in record.getMessage()


def test_an_unwritable_temp_directory_gives_a_process_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-such-directory"
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        key = _visitor_key.host_key(str(missing))
    assert len(key) == 32
    assert "No such file or directory" in caplog.records[0].getMessage()
    assert not missing.exists()


# -- properties -------------------------------------------------------------------------

ips = st.one_of(st.ip_addresses().map(str), st.none(), st.text(max_size=20))
agents = st.one_of(st.none(), st.text(max_size=60))
days = st.floats(0, 4_000_000_000, allow_nan=False)
keys = st.binary(min_size=16, max_size=80)


@settings(max_examples=300, deadline=None)
@given(key=keys, ip=ips, ua=agents, now=days, later=st.floats(0, 86399.999))
def test_same_visitor_same_day_same_id_in_any_instance(
    key: bytes, ip: str | None, ua: str | None, now: float, later: float
) -> None:
    start = now // 86400 * 86400
    first = VisitorIds(key, 3).daily_id(ip, ua, start)
    # A fresh instance is what another worker process has: only the key is shared.
    assert VisitorIds(key, 3).daily_id(ip, ua, start + later) == first


@settings(max_examples=300, deadline=None)
@given(
    key=keys,
    ips=st.tuples(ips, ips),
    uas=st.tuples(agents, agents),
    now=days,
    shift=st.integers(-3, 3),
)
def test_another_ip_user_agent_or_day_gives_another_id(
    key: bytes,
    ips: tuple[str | None, str | None],
    uas: tuple[str | None, str | None],
    now: float,
    shift: int,
) -> None:
    other_day = now + shift * 86400
    assume((ips[0] or "", uas[0] or "", shift) != (ips[1] or "", uas[1] or "", 0))
    ids = VisitorIds(key, 3)
    # 64 bits: a collision among a few hundred examples would be a bug, not luck.
    assert ids.daily_id(ips[0], uas[0], other_day) != ids.daily_id(ips[1], uas[1], now)


VISITORS = [
    ("198.51.100.1", "Mozilla/5.0 (X11; Linux x86_64)"),
    ("198.51.100.2", "Mozilla/5.0 (X11; Linux x86_64)"),
    ("2001:db8::1", "curl/8.5.0"),
    ("198.51.100.1", "Mozilla/5.0 (Macintosh) \u00e9\u2603"),
    (None, None),
]
_IDS_IN_A_PROCESS = """
import json, sys
from asgi_matomo._config import build_config
cfg = build_config(
    idsite=5, track_visitor_ip=False, assume_https=True, exclude_paths=None,
    exclude_patterns=None, allowed_methods="all-methods", ignored_methods=None,
    ignored_user_agents=None, route_details=None, action_name_from_route=False,
    custom_dimensions=None, trusted_proxies=None, anonymize_ip_bytes=0, visitor_ids=True,
)
visitors = json.loads(sys.argv[1])
print(json.dumps([cfg.visitor.daily_id(ip, ua, float(sys.argv[2])) for ip, ua in visitors]))
"""


@pytest.mark.parametrize("source", ["environment", "host file"])
def test_ids_agree_across_processes(source: str, tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    env.pop(_visitor_key.ENV_VAR, None)
    if source == "environment":
        env[_visitor_key.ENV_VAR] = "a deployment's shared secret"
    results = []
    for seed in ("1", "2", "random"):
        # Different hash seeds: nothing may depend on Python's str hashing.
        completed = subprocess.run(
            [sys.executable, "-c", _IDS_IN_A_PROCESS, json.dumps(VISITORS), str(DAY)],
            env={**env, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        results.append(json.loads(completed.stdout))
    assert results[0] == results[1] == results[2]
    assert len(set(results[0])) == len(VISITORS)
    if source == "environment":
        ids = VisitorIds(b"a deployment's shared secret", 5)
        assert results[0] == [ids.daily_id(ip, ua, DAY) for ip, ua in VISITORS]
    assert bool(list(tmp_path.iterdir())) is (source == "host file")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    secret=st.binary(min_size=16, max_size=48).map(bytes.hex),
    ip=st.ip_addresses().map(str),
    ua=st.text(max_size=40),
    overrides=st.dictionaries(
        st.sampled_from(["uid", "cid", "e_c", "e_a", "x"]), st.text(max_size=20)
    ),
)
def test_the_key_never_appears_in_a_hit_or_a_log(
    secret: str, ip: str, ua: str, overrides: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        cfg = config(visitor_ids=True, visitor_key=secret, trusted_proxies=["10.0.0.0/8"])
        scope = http_scope(
            "/",
            headers=[(b"user-agent", ua.encode()), (b"x-forwarded-for", ip.encode())],
            client=("10.0.0.1", 1),
        )
        info = inspect_request(cfg, scope, DAY)
        assert info is not None
        hits = build_hits(
            cfg,
            info,
            status=200,
            elapsed_ms=1.0,
            template=None,
            overrides=overrides,
            rand=lambda: 1,
        )
    assert cfg.visitor is not None
    derived = cfg.visitor._key.hex()
    texts = [hit.encode(authenticated=True) for hit in hits]
    # An error about another option, or about the key itself, never shows it.
    for options in ({"idsite": 0}, {"trusted_proxies": ["no"]}, {"visitor_key": secret[:15]}):
        with pytest.raises((TypeError, ValueError)) as raised:
            config(**{"visitor_ids": True, "visitor_key": secret, **options})
        texts.append(str(raised.value))
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(cfg), repr(info)]
    for text in texts:
        assert secret not in text
        assert derived not in text
        assert bytes.fromhex(secret).decode("latin-1") not in text


_IDS_FROM_STDIN = """
import json, sys
from asgi_matomo._visitor import VisitorIds
data = json.load(sys.stdin)
ids = VisitorIds(bytes.fromhex(data["key"]), data["idsite"])
print(json.dumps([ids.daily_id(ip, ua, now) for ip, ua, now in data["visitors"]]))
"""


# Each example starts two interpreters: a few examples, each with up to 20 visitors.
@settings(max_examples=5, deadline=None)
@given(
    key=keys,
    idsite=st.integers(1, 10**6),
    visitors=st.lists(st.tuples(ips, agents, days), min_size=1, max_size=20),
)
def test_generated_visitors_get_the_same_ids_in_other_processes(
    key: bytes, idsite: int, visitors: list[tuple[str | None, str | None, float]]
) -> None:
    ids = VisitorIds(key, idsite)
    expected = [ids.daily_id(ip, ua, now) for ip, ua, now in visitors]
    data = json.dumps({"key": key.hex(), "idsite": idsite, "visitors": visitors})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for seed in ("0", "1"):
        completed = subprocess.run(
            [sys.executable, "-c", _IDS_FROM_STDIN],
            input=data,
            env={**env, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(completed.stdout) == expected
