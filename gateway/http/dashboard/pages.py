"""The dashboard's HTML, server-rendered: a small base template and one function per page.
Every value put in a page goes through html.escape (text and attributes alike); the ids and
names are the contract in docs/dashboard.md."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from gateway.core.timefmt import iso_from_us
from gateway.http.dashboard.charts import Series, svg, usd
from gateway.obs.logs import escape_control
from gateway.store import KeyRecord

PERIODS = ("last1h", "last24h", "last7d", "last30d")


def e(value: object) -> str:
    """HTML-escaped, and control or direction-changing characters (a model name a client
    chose, a name stored before names had to be printable) shown as \\xNN, not obeyed."""
    return escape(escape_control(str(value)), quote=True)


@dataclass(frozen=True, slots=True)
class KeyRow:
    record: KeyRecord
    plan: str
    rpm: int
    tpm: int
    requests_24h: int
    spend_24h: int | None


@dataclass(frozen=True, slots=True)
class PeriodRow:
    name: str
    requests: int
    tokens: int
    spend_micro: int | None


@dataclass(frozen=True, slots=True)
class ModelSpend:
    model: str
    requests: int | None  # None: not known (the counters keep no model)
    spend_micro: int


LIVE_SECONDS = 5  # a live page reloads itself this often (no script: a meta refresh)


def base(prefix: str, title: str, body: str, csrf: str | None = None,
         live: bool | None = None) -> str:
    """`live`: None for a page that cannot refresh itself, else whether this one does (a
    link in the header turns it on or off: the same page with or without ?live=1)."""
    nav, refresh = "", ""
    if live is not None:
        nav = ('<a id="live" href="?">Stop refreshing</a>' if live else
               f'<a id="live" href="?live=1">Refresh every {LIVE_SECONDS} s</a>')
        refresh = f'<meta http-equiv="refresh" content="{LIVE_SECONDS}">' if live else ""
    if csrf is not None:
        nav = (f'<nav><a href="{e(prefix)}/dashboard">Keys</a>{nav}'
               f'<form id="signout" method="post" action="{e(prefix)}/dashboard/signout">'
               f"{hidden(csrf)}<button id=\"signout-submit\">Sign out</button></form></nav>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"{refresh}"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)} · llm-gateway</title>"
            f'<link rel="stylesheet" href="{e(prefix)}/dashboard/static/dashboard.css">'
            f'<link rel="icon" href="{e(prefix)}/dashboard/static/favicon.svg">'
            f"</head><body><header><span class=\"brand\">llm-gateway</span>{nav}</header>"
            f"<main>{body}</main></body></html>\n")


def hidden(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(csrf)}">'


def once() -> str:
    """A form whose answer shows a secret carries a single-use token: reloading that answer
    (the browser sends the form again) makes no second key and rotates nothing."""
    return f'<input type="hidden" name="once" value="{secrets.token_urlsafe(16)}">'


def error_line(message: str | None) -> str:
    return "" if not message else f'<p id="error" class="error">{e(message)}</p>'


def signin(prefix: str, error: str | None = None) -> str:
    body = (
        "<h1>Sign in</h1>"
        "<p>Sign in with your account's management key (<code>mk_…</code>). It is sent once "
        "and never kept by the browser: the session lasts 8 hours.</p>"
        f"{error_line(error)}"
        f'<form id="signin" method="post" action="{e(prefix)}/dashboard/signin">'
        '<label for="key">Management key</label>'
        '<input id="key" name="key" type="password" autocomplete="off" required '
        'maxlength="200" autofocus>'
        '<button id="signin-submit">Sign in</button></form>')
    return base(prefix, "Sign in", body)


def _date(us: int | None, never: str = "never") -> str:
    return never if us is None else iso_from_us(us)[:16].replace("T", " ") + " UTC"


def account(prefix: str, csrf: str, name: str, credits_micro: int, rows: Sequence[KeyRow],
            notice: str = "", live: bool = False) -> str:
    lines = []
    for row in rows:
        r = row.record
        lines.append(
            f'<tr data-key-id="{e(r.id)}">'
            f'<td class="name"><a href="{e(prefix)}/dashboard/keys/{e(r.id)}">{e(r.name)}</a>'
            f'</td><td class="plan">{e(row.plan)}</td>'
            f'<td class="status">{"active" if r.active else "inactive"}</td>'
            f'<td class="rpm">{row.rpm}</td><td class="tpm">{row.tpm}</td>'
            f'<td class="expires">{e(_date(r.expires_at_us))}</td>'
            f'<td class="created">{e(_date(r.created_at_us))}</td>'
            f'<td class="requests-24h">{row.requests_24h}</td>'
            f'<td class="spend-24h">{e(usd(row.spend_24h))}</td>'
            f'<td class="total-spent">{e(usd(r.total_spent))}</td></tr>')
    table = (
        '<table id="keys"><thead><tr><th>Name</th><th>Plan</th><th>Status</th><th>RPM</th>'
        "<th>TPM</th><th>Expires</th><th>Created</th><th>Requests 24 h</th>"
        "<th>Spend 24 h</th><th>Spent, lifetime</th></tr></thead>"
        f"<tbody>{''.join(lines)}</tbody></table>")
    if not rows:
        table += '<p class="empty">No keys yet.</p>'
    body = (
        f'<h1 id="account">{e(name)}</h1>{notice}'
        f'<p>Credits: <span id="credits">{e(usd(credits_micro))}</span></p>'
        f"<h2>Keys</h2>{table}"
        "<h2>New credit key</h2>"
        f'<form id="create-key" method="post" action="{e(prefix)}/dashboard/keys">'
        f'{hidden(csrf)}{once()}<label for="new-key-name">Name</label>'
        '<input id="new-key-name" name="name" required maxlength="200">'
        '<button id="create-key-submit">Create key</button></form>'
        '<p class="hint">Spend 24 h shows "—" where the usage counters keep no money; '
        "the lifetime spend is exact.</p>")
    return base(prefix, name, body, csrf, live)


def secret(prefix: str, csrf: str, record: KeyRecord, value: str, rotated: bool) -> str:
    what = "rotated: the old secret no longer works" if rotated else "created"
    body = (
        f'<h1 id="key-name">{e(record.name)}</h1>'
        f'<p class="notice">Key {e(what)}. Copy its secret now: it is shown this once and '
        "never again.</p>"
        f'<p><code id="new-secret">{e(value)}</code></p>'
        f'<p><a href="{e(prefix)}/dashboard/keys/{e(record.id)}">The key\'s page</a> · '
        f'<a href="{e(prefix)}/dashboard">All keys</a></p>')
    return base(prefix, record.name, body, csrf)


def key(prefix: str, csrf: str, record: KeyRow, periods: Sequence[PeriodRow],
        hourly: Series, daily: Series, by_model: Sequence[ModelSpend] | None,
        model_note: str, budget: str, live: bool = False) -> str:
    r = record.record
    path = f"{e(prefix)}/dashboard/keys/{e(r.id)}"
    period_rows = "".join(
        f'<tr data-period="{e(p.name)}"><th>{e(p.name)}</th>'
        f'<td class="requests">{p.requests}</td><td class="tokens">{p.tokens}</td>'
        f'<td class="spend">{e(usd(p.spend_micro))}</td></tr>' for p in periods)
    if by_model is None:
        model_rows = ""
    else:
        model_rows = "".join(
            f'<tr data-model="{e(m.model)}"><th>{e(m.model)}</th>'
            f'<td class="requests">{"—" if m.requests is None else m.requests}</td>'
            f'<td class="spend">{e(usd(m.spend_micro))}</td></tr>' for m in by_model)
    toggle = "deactivate" if r.active else "activate"
    body = (
        f'<h1 id="key-name">{e(r.name)}</h1>'
        f'<p class="meta">{e(record.plan)} · <span class="status">'
        f'{"active" if r.active else "inactive"}</span> · {record.rpm} RPM · '
        f"{record.tpm} TPM · expires {e(_date(r.expires_at_us))} · created "
        f"{e(_date(r.created_at_us))} · spent {e(usd(r.total_spent))} in its lifetime · "
        f"budget {e(budget)}</p>"
        '<h2>Usage</h2><table id="periods"><thead><tr><th>Period</th><th>Requests</th>'
        f"<th>Tokens</th><th>Spend</th></tr></thead><tbody>{period_rows}</tbody></table>"
        "<h2>Requests per hour, last 24 hours</h2>"
        + svg("chart-hourly", "Requests per hour, last 24 hours", hourly, "hour")
        + _totals(hourly)
        + "<h2>Requests per day, last 30 days</h2>"
        + svg("chart-daily", "Requests per day, last 30 days", daily, "day")
        + _totals(daily)
        + '<h2>Spend by model</h2><table id="spend-by-model"><thead><tr><th>Model</th>'
        f"<th>Requests</th><th>Spend</th></tr></thead><tbody>{model_rows}</tbody></table>"
        f'<p class="hint">{e(model_note)}</p>'
        "<h2>Manage</h2>"
        f'<form id="rename" method="post" action="{path}/rename">{hidden(csrf)}'
        f'<label for="rename-name">Name</label><input id="rename-name" name="name" required '
        f'maxlength="200" value="{e(r.name)}"><button id="rename-submit">Rename</button>'
        "</form>"
        f'<form id="{toggle}" method="post" action="{path}/{toggle}">{hidden(csrf)}'
        f'<button id="{toggle}-submit">{toggle.capitalize()}</button></form>'
        f'<form id="rotate" method="post" action="{path}/rotate">{hidden(csrf)}{once()}'
        '<button id="rotate-submit">Rotate secret</button></form>'
        '<p class="hint">Rotating makes a new secret; the old one stops working at once.</p>')
    return base(prefix, r.name, body, csrf, live)


def _totals(data: Series) -> str:
    return (f'<p class="totals">{data.requests} requests · {data.tokens} tokens · '
            f"{e(usd(data.spend_micro))}</p>")


def error(prefix: str, status: int, message: str, csrf: str | None = None) -> str:
    titles = {400: "Bad request", 403: "Forbidden", 404: "Not found",
              405: "Method not allowed", 413: "Too large", 429: "Too many attempts",
              503: "Unavailable"}
    title = titles.get(status, "Error")
    body = (f"<h1>{e(title)}</h1>{error_line(message)}"
            f'<p><a href="{e(prefix)}/dashboard">Back to the dashboard</a></p>')
    return base(prefix, title, body, csrf)
