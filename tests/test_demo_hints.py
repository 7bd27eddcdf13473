"""The demo against a Matomo that took none of its hits says what to run next."""

from __future__ import annotations

import pytest

from asgi_matomo import _demo
from asgi_matomo._cli import main
from asgi_matomo._collector import Collector


def test_a_matomo_that_counts_every_hit_invalid_gets_the_check_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Collector(sites=[7]) as matomo:
        assert main(["demo", "--matomo-url", matomo.base_url, "--idsite", "3"]) == 1
    out = capsys.readouterr().out
    assert "invalid=48" in out
    hint = out.rstrip().splitlines()[-1]
    assert hint.startswith("Matomo stored none of the 48 hits (48 counted invalid)")
    assert f"asgi-matomo check --matomo-url {matomo.base_url} --idsite 3" in hint


def test_the_hint_without_counters_and_with_a_token_never_shows_the_token() -> None:
    hint = _demo._nothing_stored(None, "https://m.example.org", 4, "secret-token")
    assert "Matomo stored none: run `asgi-matomo check --matomo-url https://m.example.org" in hint
    assert "--idsite 4 --token <token>`" in hint
    assert "secret-token" not in hint
    rejected = {"submitted": 5, "sent": 0, "rejected": 3, "dropped": 2}
    assert "none of the 5 hits (3 counted rejected, 2 counted dropped)" in _demo._nothing_stored(
        rejected, "https://m.example.org", 4, None
    )
