"""What an answer to a bulk request means, without any I/O (asgi_matomo._bulk)."""

from __future__ import annotations

import json
from typing import NoReturn

import pytest

from asgi_matomo._bulk import BODY_EXCERPT, Answer, Kind, bulk_body, read_answer

NOW = 1_700_000_000.0


def excerpt(text: str, limit: int) -> str:
    return text[:limit]


def answer(
    status: int,
    text: str = "",
    *,
    hits: int = 3,
    content_type: str | None = None,
    retry_after: str | None = None,
    location: str | None = None,
) -> Answer:
    headers = {"Content-Type": content_type, "Retry-After": retry_after, "Location": location}
    return read_answer(
        status, text, hits, header=headers.__getitem__, now=lambda: NOW, excerpt=excerpt
    )


def test_matomos_counts_are_taken_and_skipped_elements_are_invalid() -> None:
    assert answer(200, '{"status":"success","tracked":3,"invalid":0}') == Answer(
        Kind.OK, tracked=3, invalid=0, status=200
    )
    # Matomo skips malformed elements without counting them: lost all the same.
    assert answer(200, '{"status":"success","tracked":1,"invalid":0}').invalid == 2
    # Counts out of range are clamped to the batch.
    assert (answer(200, '{"tracked":9}').tracked, answer(200, '{"tracked":-1}').invalid) == (3, 3)


@pytest.mark.parametrize(
    ("status", "text", "content_type"),
    [
        (204, "", None),
        (200, "", None),
        (202, " \r\n", "text/plain"),
        (200, "GIF89a\x01\x00", "image/gif; charset=binary"),
        (200, "GIF89a\x01\x00", None),
    ],
)
def test_answers_without_counts_from_matomo_are_all_tracked(
    status: int, text: str, content_type: str | None
) -> None:
    # Single-hit answers, and QueuedTracking's: accepted, validated later.
    verdict = answer(status, text, content_type=content_type)
    assert (verdict.kind, verdict.tracked, verdict.invalid) == (Kind.OK, 3, 0)


@pytest.mark.parametrize(
    ("text", "content_type"),
    [
        ("<html><title>Sign in - Matomo</title></html>", "text/html"),
        (json.dumps({"status": "success"}), "application/json"),
        (json.dumps(["a list"]), "application/json"),
        ("OK", None),
    ],
)
def test_other_2xx_answers_are_not_matomos(text: str, content_type: str | None) -> None:
    verdict = answer(200, text, content_type=content_type)
    assert (verdict.kind, verdict.foreign, verdict.tracked) == (Kind.REFUSED, True, 0)
    assert verdict.cause.startswith(f"HTTP 200, {content_type or 'no content type'}: ")


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_timeouts_rate_limits_and_server_errors_are_retried(status: int) -> None:
    verdict = answer(status, "busy", retry_after="7")
    assert (verdict.kind, verdict.status, verdict.retry_after) == (Kind.RETRY, status, 7.0)


def test_a_retry_after_date_is_read_against_the_clock() -> None:
    verdict = answer(503, retry_after="Tue, 14 Nov 2023 22:33:20 GMT")  # NOW + 1200 s
    assert verdict.retry_after == pytest.approx(1200.0)
    assert answer(503, retry_after="soon").retry_after is None


def test_redirects_name_the_url_to_use() -> None:
    verdict = answer(301, location="https://matomo.example.org/matomo.php")
    assert verdict.kind is Kind.REFUSED
    assert verdict.cause == "redirected to https://matomo.example.org/matomo.php: use that URL"


def test_a_redirect_to_an_endless_url_is_cut_for_the_log_line() -> None:
    # A hostile or broken server's Location may fill the whole response head (64 KiB).
    verdict = answer(302, location="https://x.example/" + "a" * 60_000)
    assert len(verdict.cause) < BODY_EXCERPT + 50


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_other_statuses_are_refused_with_the_start_of_the_answer(status: int) -> None:
    verdict = answer(status, "x" * 500)
    assert (verdict.kind, verdict.status, verdict.foreign) == (Kind.REFUSED, status, False)
    assert verdict.cause == "x" * 200


def test_the_common_answer_reads_no_header_and_no_clock() -> None:
    def untouchable(*args: object) -> NoReturn:
        raise AssertionError("read for an answer that does not need it")

    verdict = read_answer(
        200, '{"tracked":2,"invalid":0}', 2, header=untouchable, now=untouchable, excerpt=excerpt
    )
    assert (verdict.kind, verdict.tracked) == (Kind.OK, 2)


def test_the_body_carries_the_token_only_when_given() -> None:
    assert json.loads(bulk_body(["?idsite=1&rec=1"], "t0ken")) == {
        "requests": ["?idsite=1&rec=1"],
        "token_auth": "t0ken",
    }
    assert json.loads(bulk_body(["?a=1", "?b=2"], None)) == {"requests": ["?a=1", "?b=2"]}
    # Anything JSON must escape takes the careful path, still valid JSON.
    assert json.loads(bulk_body(['?q="x"\\'], None)) == {"requests": ['?q="x"\\']}


@pytest.mark.parametrize(
    ("status", "text", "content_type", "size", "cause"),
    [
        (400, "GIF89a\x01\x00\ufffd", "image/gif", 43, "image/gif, 43 bytes"),
        (400, "\x00\x01binary", None, None, "no content type, 8 bytes"),
        (400, "Bad request", "text/html; charset=utf-8", None, "Bad request"),
        (400, '{"error": "no"}', "application/problem+json", None, '{"error": "no"}'),
        (400, "plain words", None, None, "plain words"),
        (200, "\x89PNG\r\n", "image/png", 1234, "HTTP 200, image/png, 1234 bytes"),
    ],
)
def test_answers_that_are_not_text_are_described_not_quoted(
    status: int, text: str, content_type: str | None, size: int | None, cause: str
) -> None:
    headers = {"Content-Type": content_type}
    verdict = read_answer(
        status,
        text,
        3,
        header=headers.__getitem__,
        now=lambda: NOW,
        excerpt=excerpt,
        size=size,
    )
    assert (verdict.kind, verdict.cause) == (Kind.REFUSED, cause)
