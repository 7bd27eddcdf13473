"""What the collector keeps: the hits it stored and the requests it answered."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Literal

__all__ = ["CustomVariables", "HitType", "ReceivedRequest", "StoredHit", "format_time"]

HitType = Literal["pageview", "event", "search", "download", "outlink", "ping"]
CustomVariables = dict[str, list[str]]


@dataclass(frozen=True)
class StoredHit:
    """One hit as the collector keeps it, with the rules of Matomo applied.

    `time` is the hit time (`cdt` when accepted, else the receive time) as a UTC
    unix timestamp; `params` holds the raw parameters as received, minus
    `token_auth`.
    """

    id: int
    time: float
    received: float
    idsite: int
    hit_type: str
    url: str | None
    action_name: str | None
    urlref: str | None
    e_c: str | None
    e_a: str | None
    e_n: str | None
    e_v: float | None
    pf_srv: int | None
    search: str | None
    search_cat: str | None
    search_count: int | None
    cvar: CustomVariables | None
    cvar_visit: CustomVariables | None
    dimensions: dict[str, str]
    visitor_ip: str
    ua: str | None
    lang: str | None
    uid: str | None
    visitor_id: str | None
    http_status: int | None
    params: dict[str, str]

    @property
    def time_iso(self) -> str:
        """The hit time as `YYYY-MM-DD HH:MM:SS` UTC, the way Matomo shows it."""
        return format_time(self.time)

    def to_json(self) -> dict[str, Any]:
        """The hit as a JSON-ready dict (what `/api/hits` answers)."""
        data = asdict(self)
        data["time_iso"] = self.time_iso
        return data


@dataclass(frozen=True)
class ReceivedRequest:
    """One HTTP request received at the tracking endpoint and what was answered.

    `status` is 0 when no answer was sent (a dropped connection, or stop() during
    a delay). `elements` is the length of a bulk `requests` list (1 for a single
    hit); `tracked`/`invalid` are counted the way Matomo reports them (with
    `queued_tracking`, which reports none: the hits stored and dropped).
    """

    kind: Literal["single", "bulk"]
    status: int
    tracked: int
    invalid: int
    elements: int
    has_token: bool
    faulted: bool = False


def format_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
