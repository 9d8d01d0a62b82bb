"""Every Redis key name the gateway uses is built here.

Every key of one account carries the hash tag ``{acct:<id>}``, so each script runs on one
cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.store.records import KeyRef

RESERVATION_TTL_SECONDS = 24 * 3600
SUBSCRIPTION_DEFAULT_SECONDS = 30 * 86400


@dataclass(frozen=True, slots=True)
class HotNames:
    """The names one key's admissions and settlements use, built once per key."""

    key: str
    account: str
    reservation_prefix: str
    usage_prefix: str
    ledger: str
    key_slots: str
    account_slots: str
    alerts: str


class Names:
    """Every Redis key name the gateway uses is built here."""

    @staticmethod
    def _acct(account_id: str) -> str:
        return f"gw:{{acct:{account_id}}}"

    @classmethod
    def account(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:account"

    @classmethod
    def account_keys(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:keys"

    @classmethod
    def credit_log(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:credit-log"

    @classmethod
    def ledger(cls, account_id: str) -> str:
        """The account's spend ledger: a stream settle.lua appends to, the exporter drains."""
        return f"{cls._acct(account_id)}:ledger"

    @classmethod
    def deleted_keys(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:deleted-keys"

    @classmethod
    def key(cls, account_id: str, key_id: str) -> str:
        return f"{cls._acct(account_id)}:key:{key_id}"

    @classmethod
    def reservation(cls, account_id: str, request_id: str) -> str:
        return cls.reservation_prefix(account_id) + request_id

    @classmethod
    def reservation_prefix(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:res:"

    @classmethod
    def hot(cls, ref: KeyRef) -> HotNames:
        return HotNames(cls.key(ref.account_id, ref.key_id), cls.account(ref.account_id),
                        cls.reservation_prefix(ref.account_id),
                        cls.usage_prefix(ref.account_id, ref.key_id),
                        cls.ledger(ref.account_id), cls.key_slots(ref.account_id, ref.key_id),
                        cls.account_slots(ref.account_id), cls.alerts(ref.account_id))

    @classmethod
    def key_slots(cls, account_id: str, key_id: str) -> str:
        """The key's requests in flight: a sorted set of reservation ids by lease expiry."""
        return f"{cls._acct(account_id)}:slots:{key_id}"

    @classmethod
    def account_slots(cls, account_id: str) -> str:
        """The account's requests in flight (all its keys), like key_slots."""
        return f"{cls._acct(account_id)}:slots"

    @classmethod
    def alerts(cls, account_id: str) -> str:
        """The account's alert outbox: a stream the scripts append events to, once each,
        and the alert sender delivers and deletes."""
        return f"{cls._acct(account_id)}:alerts"

    @classmethod
    def usage_prefix(cls, account_id: str, key_id: str) -> str:
        return f"{cls._acct(account_id)}:usage:{key_id}"

    @staticmethod
    def secret(secret_hash: str) -> str:
        return f"gw:secret:{secret_hash}"

    @staticmethod
    def key_index(key_id: str) -> str:
        return f"gw:keyid:{key_id}"

    @staticmethod
    def account_name(name: str) -> str:
        return f"gw:account-name:{name}"

    ACCOUNTS = "gw:accounts"
    LEDGER_GROUP = "ledger-export"  # the exporters' consumer group on every ledger stream

    # -- management ---------------------------------------------------------------------

    @classmethod
    def usage_minutes(cls, account_id: str, key_id: str, hour: int) -> str:
        """settle.lua's per-minute counters of one hour (it appends ':m:<hour>' itself)."""
        return f"{cls.usage_prefix(account_id, key_id)}:m:{hour}"

    @classmethod
    def usage_hours(cls, account_id: str, key_id: str, day: int) -> str:
        return f"{cls.usage_prefix(account_id, key_id)}:h:{day}"

    @classmethod
    def mgmt_key(cls, account_id: str, mgmt_id: str) -> str:
        return f"{cls._acct(account_id)}:mgmt:{mgmt_id}"

    @classmethod
    def account_mgmt_keys(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:mgmt-keys"

    @classmethod
    def mgmt_bucket(cls, account_id: str, principal: str) -> str:
        return f"{cls._acct(account_id)}:mgmt-rl:{principal}"

    @staticmethod
    def mgmt_secret(secret_hash: str) -> str:
        return f"gw:mgmt-secret:{secret_hash}"

    @staticmethod
    def mgmt_index(mgmt_id: str) -> str:
        return f"gw:mgmt-id:{mgmt_id}"

    # -- the dashboard (gateway/store/sessions.py) --------------------------------------

    @staticmethod
    def dash_session(token_hash: str) -> str:
        """A dashboard session, by the SHA-256 of its cookie's token (expires with it)."""
        return f"gw:dash-session:{token_hash}"

    @staticmethod
    def dash_admin_session(token_hash: str) -> str:
        """An operator's dashboard session (/dashboard/admin): a name of its own, so an
        account session can never be read as one (gateway/http/dashboard/admin_sessions.py)."""
        return f"gw:dash-admin-session:{token_hash}"

    @classmethod
    def dash_once(cls, account_id: str, token: str) -> str:
        """A create or rotate form already sent (its single-use token), for the session's
        length: the browser's resubmission of it changes nothing."""
        return f"{cls._acct(account_id)}:dash-once:{token}"

    @staticmethod
    def dash_signin(client: str) -> str:
        """The dashboard sign-in attempts of one client address (lua/dash_signin.lua)."""
        return f"gw:dash-signin:{client}"
