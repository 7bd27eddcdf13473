"""Hits grouped into visits the way Matomo groups them, for the collector's page (sans-IO).

Read from Matomo's tracker (core/Tracker/VisitorRecognizer.php, Visit.php,
plugins/Referrers/Columns/Campaign.php) and checked against what MATOMO.md
("Visitors and visits") verified on Matomo 5.1.2. Matomo looks for the visit a hit
continues among the site's visits whose last action is at most 30 minutes older:

- a hit with `uid`: the visit of the visitor id derived from it, else the visit with
  the hit's fingerprint (and the visit's visitor id becomes the one from `uid`);
- with `cid`: the visit of that visitor id only (else a new visit);
- with a 16-hex `_id`: the visit of that visitor id, else the fingerprint's;
- with none of them: the visit with the hit's fingerprint.

A new visit starts anyway with `new_visit=1`, on a new day (the stand-in's sites are
in UTC), after 10,000 actions, or when the hit's URL carries a campaign
(`utm_campaign`, `mtm_campaign`, ...) other than the one the visit came from, unless
the visit came directly; a visit that came directly takes the referrer of a later hit
that has one. A referrer on the page's own host is a direct entry (Matomo compares
it with the site's URLs, which the stand-in does not know).

Matomo's fingerprint is a hash of the OS, browser name and version, the IP the hit
carries, the language and the site; the stand-in uses the whole user agent text
instead of the names read from it, so two user agents that differ elsewhere (a
device model) are one visitor in Matomo and two here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import SplitResult, parse_qsl, urlsplit

if TYPE_CHECKING:
    from asgi_matomo._collector._server import StoredHit

__all__ = ["Visit", "group_visits", "matches", "user_id_visitor_id"]

# Matomo's [Tracker] visit_standard_length.
VISIT_WINDOW = 30 * 60.0
# Matomo's [Tracker] create_new_visit_after_x_actions.
MAX_ACTIONS_PER_VISIT = 10000
VISITOR_ID_LENGTH = 16

# Matomo's [Tracker] campaign_var_name and campaign_keyword_var_name, in its order.
CAMPAIGN_NAME_PARAMS = (
    "pk_cpn",
    "pk_campaign",
    "piwik_campaign",
    "mtm_campaign",
    "matomo_campaign",
    "utm_campaign",
    "utm_source",
    "utm_medium",
)
CAMPAIGN_KEYWORD_PARAMS = (
    "pk_kwd",
    "pk_keyword",
    "piwik_kwd",
    "mtm_kwd",
    "mtm_keyword",
    "matomo_kwd",
    "utm_term",
)

_HEX = re.compile(r"[0-9a-fA-F]+")

IdentifiedBy = Literal["uid", "cid", "_id", "fingerprint"]
ReferrerKind = Literal["direct", "website", "campaign"]


def user_id_visitor_id(uid: str) -> str:
    """The visitor id Matomo derives from a user id (Request::getUserIdHashed)."""
    return hashlib.sha1(uid.encode(), usedforsecurity=False).hexdigest()[:VISITOR_ID_LENGTH]


def _language(hit: StoredHit) -> str:
    # Matomo compares the language lowercased and without spaces.
    return "".join((hit.lang or "").lower().split())


def _fingerprint(hit: StoredHit) -> tuple[int, str, str, str]:
    return (hit.idsite, hit.ua or "", hit.visitor_ip, _language(hit))


def _day(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d")


def _sent_visitor_id(hit: StoredHit) -> tuple[IdentifiedBy, str] | None:
    """The visitor id the hit asks for, and where it comes from (Request::getVisitorId)."""
    uid = hit.params.get("uid")
    if uid:
        return "uid", user_id_visitor_id(uid)
    cid = hit.params.get("cid", "")
    if cid:
        return "cid", cid.lower()
    visitor = hit.params.get("_id", "")[:VISITOR_ID_LENGTH]
    if len(visitor) == VISITOR_ID_LENGTH and _HEX.fullmatch(visitor):
        return "_id", visitor.lower()
    return None


def _split(url: str | None) -> SplitResult:
    # Hits carry any text: a URL that does not parse has no host, query or fragment.
    try:
        return urlsplit(url or "")
    except ValueError:
        return urlsplit("")


def _host(url: str | None) -> str | None:
    return _split(url).hostname


def _campaign(hit: StoredHit) -> tuple[str, str] | None:
    """The campaign (name, keyword) in the hit's URL or `_rcn`/`_rck`, lowercased."""
    if "=" not in (hit.url or "") and not hit.params.get("_rcn"):
        return None  # most URLs: nothing to parse
    split = _split(hit.url)
    # Matomo reads the campaign from the query, then from the fragment.
    found = dict(parse_qsl(split.fragment))
    found.update(parse_qsl(split.query))
    name = next((found[key] for key in CAMPAIGN_NAME_PARAMS if found.get(key)), None)
    keyword = next((found[key] for key in CAMPAIGN_KEYWORD_PARAMS if found.get(key)), "")
    name = name or hit.params.get("_rcn")
    if not name:
        return None
    return name.strip().lower(), (keyword or hit.params.get("_rck", "")).strip().lower()


def _external_referrer(hit: StoredHit) -> bool:
    """Whether the hit's referrer is another site's (else a direct entry)."""
    if not hit.urlref:
        return False
    host = _host(hit.urlref)
    return bool(host) and host != _host(hit.url)


def _forces_new_visit(hit: StoredHit) -> bool:
    value = hit.params.get("new_visit", "").strip()
    return value not in ("", "0")


@dataclass
class Visit:
    """One visit: its visitor and its actions, oldest first."""

    idsite: int
    visitor_id: str | None
    identified_by: IdentifiedBy
    actions: list[StoredHit] = field(default_factory=list)
    uid: str | None = None
    referrer_kind: ReferrerKind = "direct"
    referrer: str | None = None
    campaign: tuple[str, str] | None = None

    @property
    def first(self) -> StoredHit:
        return self.actions[0]

    @property
    def last(self) -> StoredHit:
        return self.actions[-1]

    @property
    def started(self) -> float:
        return self.first.time

    @property
    def ended(self) -> float:
        return self.last.time

    @property
    def ip_sent(self) -> bool:
        """Whether the hit carried the visitor's IP (`cip`) rather than the sender's."""
        return "cip" in self.first.params

    def add(self, hit: StoredHit, campaign: tuple[str, str] | None) -> None:
        """One more action; a visit that came directly takes the hit's referrer."""
        self.actions.append(hit)
        if hit.uid:
            self.uid = hit.uid
        if self.referrer_kind != "direct":
            return
        if campaign is not None:
            self.referrer_kind, self.campaign = "campaign", campaign
            self.referrer = hit.urlref
        elif _external_referrer(hit):
            self.referrer_kind, self.referrer = "website", hit.urlref

    def continued_by(self, hit: StoredHit, campaign: tuple[str, str] | None) -> bool:
        """Whether `hit` (with its `campaign`) is one more action of this visit."""
        if (
            _forces_new_visit(hit)
            or hit.time - self.ended > VISIT_WINDOW
            or _day(hit.time) != _day(self.ended)
            or len(self.actions) >= MAX_ACTIONS_PER_VISIT
        ):
            return False
        # create_new_visit_when_campaign_changes (on by default).
        return campaign is None or self.referrer_kind == "direct" or campaign == self.campaign

    def to_json(self) -> dict[str, Any]:
        """The visit as a JSON-ready dict (what `/api/visits` answers)."""
        first = self.first
        return {
            "idsite": self.idsite,
            "visitor_id": self.visitor_id,
            "identified_by": self.identified_by,
            "uid": self.uid,
            "visitor_ip": first.visitor_ip,
            "ip_sent": self.ip_sent,
            "ua": first.ua,
            "lang": first.lang,
            "referrer": self.referrer,
            "referrer_kind": self.referrer_kind,
            "campaign": None if self.campaign is None else list(self.campaign),
            "started": self.started,
            "ended": self.ended,
            "actions": [hit.to_json() for hit in self.actions],
        }


def group_visits(hits: Iterable[StoredHit]) -> list[Visit]:
    """The visits the hits make, most recently active first."""
    visits: list[Visit] = []
    # The most recently active visit per visitor id and per fingerprint: hits are
    # taken in time order, so the visit that got the last action is Matomo's
    # `ORDER BY visit_last_action_time DESC LIMIT 1`.
    by_id: dict[tuple[int, str], Visit] = {}
    by_fingerprint: dict[tuple[int, str, str, str], Visit] = {}
    for hit in sorted(hits, key=lambda h: (h.time, h.id)):
        sent = _sent_visitor_id(hit)
        fingerprint = _fingerprint(hit)
        found = by_id.get((hit.idsite, sent[1])) if sent else None
        if found is None and (sent is None or sent[0] != "cid"):
            found = by_fingerprint.get(fingerprint)
        campaign = _campaign(hit)
        if found is not None and not found.continued_by(hit, campaign):
            found = None
        visit = found
        if visit is None:
            visit = (
                Visit(hit.idsite, sent[1], sent[0])
                if sent
                else Visit(hit.idsite, None, "fingerprint")
            )
            visits.append(visit)
        elif sent and sent[0] == "uid":
            # enable_userid_overwrites_visitorid (on by default).
            visit.visitor_id, visit.identified_by = sent[1], "uid"
        visit.add(hit, campaign)
        # The fingerprint is the visit's first hit's (the log_visit row's config_id).
        by_fingerprint[_fingerprint(visit.first)] = visit
        if visit.visitor_id is not None:
            by_id[(visit.idsite, visit.visitor_id)] = visit
    visits.sort(key=lambda v: (v.ended, v.last.id), reverse=True)
    return visits


def _texts(visit: Visit, dimension_names: Mapping[int, str]) -> Iterable[str | None]:
    yield visit.visitor_id
    yield visit.uid
    yield from visit.campaign or ()
    for hit in visit.actions:
        yield from (hit.url, hit.action_name, hit.urlref, hit.search, hit.visitor_ip, hit.ua)
        yield from (hit.e_c, hit.e_a, hit.e_n)
        for slots in (hit.cvar, hit.cvar_visit):
            for pair in (slots or {}).values():
                yield from pair
        for dimension, value in hit.dimensions.items():
            yield dimension_names.get(int(dimension), f"dimension{dimension}")
            yield value


def matches(visit: Visit, needle: str, dimension_names: Mapping[int, str]) -> bool:
    """Whether any text the page shows for the visit contains `needle` (any case)."""
    needle = needle.strip().casefold()
    if not needle:
        return True
    return any(needle in text.casefold() for text in _texts(visit, dimension_names) if text)
