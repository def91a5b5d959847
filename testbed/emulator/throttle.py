"""The hook that applies limits.py's request rates and target quota in front of moto (the
rules, their figures and their pages are in limits.py; this module only applies them).

- Every request of a family limits.rate_rule names draws one token from its account's and
  Region's bucket; an empty bucket answers the service's throttling error (HTTP 400: EC2
  `RequestLimitExceeded`, ELBv2 and SSM `ThrottlingException`, Auto Scaling `Throttling`,
  message "Rate exceeded") and moto never sees the request. The SDKs retry these.
- Calls per family are metered per second (refused ones too): `rates()` answers, per bucket,
  its size and refill, the calls of each second since the first and the refusals, so a run can
  be compared with what AWS allows (GET /skiff-emulator/rates).
- RegisterTargets, and Auto Scaling's registration of a group's instances, past 1,000 targets
  per target group or per load balancer is refused with `TooManyTargets`.

`SKIFF_EMULATOR_RATE_LIMITS=off` in the server's environment leaves the rates unenforced (still
metered); the quota and the filter limit always apply.
"""

from __future__ import annotations

import os
import threading
import time

import limits

_LOCK = threading.Lock()
BUCKETS = limits.Buckets()
ENFORCED = os.environ.get("SKIFF_EMULATOR_RATE_LIMITS", "on") != "off"
_START = time.monotonic()
# (account, region, family) -> rule, and -> {second since _START: calls}
_RULES: dict[tuple[str, str, str], limits.Rule] = {}
_PER_SECOND: dict[tuple[str, str, str], dict[int, int]] = {}


def admit(service: str, action: str, params: dict, account: str, region: str) -> limits.Rule | None:
    """None when the request may go on; the rule whose bucket is empty when it is throttled."""
    rule = limits.rate_rule(service, action, params)
    if rule is None:
        return None
    now = time.monotonic()
    key = (account, region, rule.family)
    with _LOCK:
        _RULES[key] = rule
        sec = _PER_SECOND.setdefault(key, {})
        sec[int(now - _START)] = sec.get(int(now - _START), 0) + 1
        ok = BUCKETS.take(account, region, rule, now) or not ENFORCED
    return None if ok else rule


def rates() -> list[dict]:
    """Per bucket: its figures, its calls per second (from its first call) and its refusals."""
    with _LOCK:
        out = []
        for key, rule in sorted(_RULES.items()):
            sec = _PER_SECOND.get(key, {})
            first, last = min(sec), max(sec)
            out.append({
                "account": key[0], "region": key[1], "family": rule.family, "size": rule.size,
                "refill": rule.refill, "error": rule.error, "assumed": rule.assumed,
                "doc": rule.doc, "first_second": first,
                "calls_per_second": [sec.get(s, 0) for s in range(first, last + 1)],
                "throttled": BUCKETS.throttled.get(key, 0),
            })
        return out


def patch_target_quota() -> None:
    """RegisterTargets (and Auto Scaling's registration, which goes through the same backend
    call) past the quota raises TooManyTargets; nothing of the request is registered."""
    from moto.elbv2.exceptions import ELBClientError
    from moto.elbv2.models import ELBv2Backend

    class TooManyTargets(ELBClientError):
        code = "TooManyTargets"

        def __init__(self, message: str):
            super().__init__("TooManyTargets", message)

    original = ELBv2Backend.register_targets

    def register_targets(self, target_group_arn, instances):
        tg = self.target_groups.get(target_group_arn)
        if tg is not None:
            new = len({t["Id"] for t in instances} - set(tg.targets))
            per_lb = {}
            for lb in getattr(tg, "load_balancer_arns", []) or []:
                per_lb[lb] = sum(len(g.targets) for g in self.target_groups.values()
                                 if lb in (getattr(g, "load_balancer_arns", []) or []))
            refused = limits.targets_quota(len(tg.targets), new, per_lb)
            if refused:
                raise TooManyTargets(refused[1])
        return original(self, target_group_arn, instances)

    ELBv2Backend.register_targets = register_targets

    # A group's launches that its target groups cannot take fail (assumed: AWS documents the
    # quota, not what Auto Scaling does with a launch past it): they are terminated and count as
    # abandoned launches, so an instance refresh that launched them fails (lifecycle.ABANDONED).
    from moto.autoscaling.models import AutoScalingBackend

    import lifecycle

    attach = AutoScalingBackend.update_attached_target_groups

    def update_attached_target_groups(self, group_name):
        try:
            return attach(self, group_name)
        except TooManyTargets as e:
            group = self.autoscaling_groups[group_name]
            registered = set()
            for arn in group.target_group_arns:
                tg = self.elbv2_backend.target_groups.get(arn)
                registered |= set(tg.targets) if tg else set()
            failed = [s for s in group.instance_states if s.instance.id not in registered]
            print(f"skiff-emulator: {len(failed)} launch(es) of {group_name} failed: {e.message}",
                  flush=True)
            for state in failed:
                lifecycle.ABANDONED.add(state.instance.id)
                group.instance_states = [s for s in group.instance_states if s is not state]
                self.ec2_backend.terminate_instances([state.instance.id])

    AutoScalingBackend.update_attached_target_groups = update_attached_target_groups
