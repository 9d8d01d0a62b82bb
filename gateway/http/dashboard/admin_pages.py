"""The HTML of the operator's pages, /dashboard/admin (docs/dashboard.md, "The operator
view"). Every value goes through html.escape, as in pages.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.http.dashboard.charts import usd
from gateway.http.dashboard.pages import _date, base, e, error_line, hidden
from gateway.store import Account, KeyRecord

TOP_KEYS = 10


@dataclass(frozen=True, slots=True)
class AccountRow:
    account: Account
    total_spent: int


@dataclass(frozen=True, slots=True)
class AdminKeyRow:
    record: KeyRecord
    account_name: str
    spend_1h: int | None  # None: the counters keep no spend for some of its requests
    refused_1h: int  # requests of a known key refused (429, 403) in the last hour


def signin(prefix: str, error: str | None = None) -> str:
    body = (
        "<h1>Operator sign-in</h1>"
        "<p>Sign in with the gateway's operator token (GATEWAY_ADMIN_TOKEN). It is sent once "
        "and never kept by the browser: the session lasts 8 hours.</p>"
        f"{error_line(error)}"
        f'<form id="admin-signin" method="post" action="{e(prefix)}/dashboard/admin/signin">'
        '<label for="token">Operator token</label>'
        '<input id="token" name="token" type="password" autocomplete="off" required '
        'maxlength="1000" autofocus>'
        '<button id="admin-signin-submit">Sign in</button></form>')
    return base(prefix, "Operator sign-in", body)


def _nav(prefix: str, csrf: str) -> str:
    return (f'<nav class="admin"><form id="admin-signout" method="post" '
            f'action="{e(prefix)}/dashboard/admin/signout">{hidden(csrf)}'
            '<button id="admin-signout-submit">Sign out</button></form></nav>')


def _accounts(prefix: str, csrf: str, rows: Sequence[AccountRow]) -> str:
    lines = []
    for row in rows:
        a = row.account
        lines.append(
            f'<tr data-account-id="{e(a.id)}"><td class="name">{e(a.name)}</td>'
            f'<td class="credits">{e(usd(a.credits))}</td>'
            f'<td class="spend">{e(usd(row.total_spent))}</td><td>'
            f'<form class="add-credits" method="post" '
            f'action="{e(prefix)}/dashboard/admin/accounts/{e(a.id)}/credits">{hidden(csrf)}'
            '<input name="usd" required maxlength="40" placeholder="USD, e.g. 25 or -2.5" '
            'aria-label="USD">'
            '<input name="reason" required maxlength="500" placeholder="reason" '
            'aria-label="Reason"><button>Add credits</button></form></td></tr>')
    return ('<table id="accounts"><thead><tr><th>Account</th><th>Credits</th>'
            "<th>Spent, lifetime</th><th>Credits change</th></tr></thead>"
            f"<tbody>{''.join(lines)}</tbody></table>")


def _key_forms(prefix: str, csrf: str, r: KeyRecord) -> str:
    path = f"{e(prefix)}/dashboard/admin/keys/{e(r.id)}"
    forms = ""
    if r.key_type == "subscription":
        forms += (f'<form class="renew" method="post" action="{path}/renew">{hidden(csrf)}'
                  "<button>Renew 30 d</button></form>")
    if r.active:
        forms += (f'<form class="deactivate" method="post" action="{path}/deactivate">'
                  f"{hidden(csrf)}<button>Deactivate</button></form>")
    return forms


def _key_cells(row: AdminKeyRow) -> str:
    r = row.record
    return (f'<td class="name">{e(r.name)}</td>'
            f'<td class="account">{e(row.account_name)}</td>'
            f'<td class="status">{"active" if r.active else "inactive"}</td>'
            f'<td class="expires">{e(_date(r.expires_at_us))}</td>'
            f'<td class="spend-1h">{e(usd(row.spend_1h))}</td>'
            f'<td class="refused-1h">{row.refused_1h}</td>')


def admin(prefix: str, csrf: str, accounts: Sequence[AccountRow],
          keys: Sequence[AdminKeyRow], notice: str = "") -> str:
    ranked = sorted((k for k in keys if k.spend_1h), key=lambda k: -(k.spend_1h or 0))
    top = "".join(f'<tr data-key-id="{e(k.record.id)}">{_key_cells(k)}</tr>'
                  for k in ranked[:TOP_KEYS])
    refused = sorted((k for k in keys if k.refused_1h), key=lambda k: -k.refused_1h)
    top_refused = "".join(f'<tr data-key-id="{e(k.record.id)}">{_key_cells(k)}</tr>'
                          for k in refused[:TOP_KEYS])
    all_keys = "".join(
        f'<tr data-key-id="{e(k.record.id)}">{_key_cells(k)}'
        f"<td>{_key_forms(prefix, csrf, k.record)}</td></tr>" for k in keys)
    head = ("<tr><th>Key</th><th>Account</th><th>Status</th><th>Expires</th>"
            "<th>Spend, last hour</th><th>Refused, last hour</th>")
    body = (
        f"{_nav(prefix, csrf)}<h1 id=\"admin\">Operator</h1>{error_line(notice)}"
        f"<h2>Accounts</h2>{_accounts(prefix, csrf, accounts)}"
        f"<h2>Top keys by spend, last hour</h2><table id=\"top-spend\"><thead>{head}</tr>"
        f"</thead><tbody>{top}</tbody></table>"
        f"<h2>Top keys by refusals, last hour</h2><table id=\"top-refused\"><thead>{head}"
        f"</tr></thead><tbody>{top_refused}</tbody></table>"
        '<p class="hint">From the usage counters, per minute: spend in micro-USD, and the '
        "requests of a known key refused for its limits, budget, credits, status or "
        "model.</p>"
        f"<h2>Keys</h2><table id=\"all-keys\"><thead>{head}<th>Manage</th></tr></thead>"
        f"<tbody>{all_keys}</tbody></table>")
    return base(prefix, "Operator", body)
