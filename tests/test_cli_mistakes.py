"""Mistakes on the collector's command line are one clear line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from asgi_matomo._cli import main


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "http"])
def test_a_port_out_of_range_is_a_usage_error(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["collector", "--port", port])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --port: expected a port from 0 to 65535, got '{port}'" in err
    assert "Traceback" not in err


def test_a_db_that_cannot_be_opened_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A directory, as when --db is given the folder instead of a file in it.
    assert main(["collector", "--port", "0", "--db", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot open the hit database {str(tmp_path)!r}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999", "http://matomo:abc/"])
def test_check_with_a_url_that_does_not_parse_is_one_failed_check(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--matomo-url", url, "--idsite", "1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"[FAIL] url: {url!r} is not an http(s) URL")
