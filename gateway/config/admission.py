"""What admission (lua/admit.lua ARGV[11...]) needs to know of the plans, flat and built
once: a slot's lease, then per plan slug, rpm, tpm, models, max_concurrent, enforce, the
limit of the model asked and the budget windows. Only the models some plan limits get
arguments of their own."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config.plans import Plan
from gateway.config.windows import encode_windows

PlanArgs = tuple[str | int, ...]


def _flat(plans: Iterable[Plan], credit_rpm: int, credit_tpm: int, lease_us: int,
          model: str | None) -> PlanArgs:
    flat: list[str | int] = [lease_us]
    for plan in plans:
        limit = next((f"{rpm} {tpm}" for name, rpm, tpm in plan.model_limits
                      if name == model), "")
        flat += [plan.slug, plan.rpm, plan.tpm, ",".join(plan.models),
                 plan.max_concurrent or 0, _mode(plan), limit,
                 encode_windows(plan.budgets)]
    flat += ["", credit_rpm, credit_tpm, "", 0, "1", "", ""]
    return tuple(flat)


def _mode(plan: Plan) -> str:
    """'0' shadow mode, '1' enforced; 'q' after either when the plan queues (admit.lua then
    leaves its RPM, TPM and slot refusals for the caller to count)."""
    return ("1" if plan.enforce else "0") + ("q" if plan.max_queue_wait > 0 else "")


class AdmissionArgs:
    """The plans as admission's arguments: `base` for a request whose model no plan limits,
    `for_model(m)` for any request (one set lookup when no plan has per-model limits)."""

    __slots__ = ("_by_model", "base", "windows")

    def __init__(self, plans: Iterable[Plan], credit_rpm: int, credit_tpm: int,
                 lease_seconds: float) -> None:
        plans = tuple(plans)
        lease_us = int(lease_seconds * 1_000_000)
        self.base = _flat(plans, credit_rpm, credit_tpm, lease_us, None)
        limited = {name for plan in plans for name, _, _ in plan.model_limits}
        self._by_model = {name: _flat(plans, credit_rpm, credit_tpm, lease_us, name)
                          for name in limited}
        # What usage.lua needs to show a key's windows: slug, windows, ... (plans with some)
        self.windows: tuple[str, ...] = tuple(
            item for plan in plans if plan.budgets
            for item in (plan.slug, encode_windows(plan.budgets)))

    def for_model(self, model: str) -> PlanArgs:
        return self._by_model.get(model, self.base)
