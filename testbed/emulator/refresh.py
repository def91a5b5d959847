"""Instance refresh as a small state machine (pure: the caller applies the actions to moto).

https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-refresh-overview.html
https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_StartInstanceRefresh.html
https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_InstanceRefresh.html

Modelled (Rolling strategy only):
  * one active refresh per group; Start while one is Pending/InProgress/Cancelling is
    InstanceRefreshInProgress;
  * Pending -> InProgress -> [Baking ->] Successful, or -> Cancelling -> Cancelled, or -> Failed;
  * Preferences.BakeTime (0-172800 s, default 0): once every instance is replaced the refresh
    is Baking, "waiting the specified bake time after an instance refresh has finished updating
    instances", and Successful only when it has passed; it still holds the group (a Start is
    InstanceRefreshInProgress), can be cancelled, and the alarms below still fail it, as "the
    amount of time ... to wait at the end of an instance refresh before the instance refresh
    is considered complete" is the time the alarms are watched after the last replacement.
    https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_RefreshPreferences.html
    https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_InstanceRefresh.html (Status)
    A BakeTime outside 0-172800 is refused (ValidationError);
  * MaxHealthyPercentage > 100 launches a batch of replacements before terminating (the
    instance maintenance policy skiff uses, 100/200); otherwise a batch is terminated first and
    MinHealthyPercentage sets the batch size;
  * a replacement counts once it is InService (its launch lifecycle hook completed) and its
    InstanceWarmup has passed; an old instance counts as replaced once it has left the group
    (its terminate hook completed);
  * a replacement whose launch was abandoned (ABANDON) fails the refresh;
  * Preferences.AlarmSpecification.Alarms: while the refresh runs or bakes, any of them in ALARM state
    (CloudWatch, e.g. after SetAlarmState) fails it, as "the instance refresh fails ... if any
    CloudWatch alarms you specify go into the ALARM state"; names CloudWatch does not know are
    not in ALARM. https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-refresh-rollback.html
    https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_AlarmSpecification.html
  * AutoRollback without a DesiredConfiguration is refused (ValidationError): "a rollback is not
    supported ... [when] there is no desired configuration specified".
    https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_RefreshPreferences.html
Not modelled: checkpoints (stored and echoed only), SkipMatching, rollback, standby,
scale-in protection, warm pools. Issue 10 deepens this.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

ACTIVE = ("Pending", "InProgress", "Baking", "Cancelling")
MAX_BAKE_TIME = 172800


@dataclass
class Refresh:
    group: str
    preferences: dict
    strategy: str
    started: float
    to_replace: list[str]  # instance ids in the group at start
    desired: int
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "Pending"
    status_reason: str = ""
    launched: list[str] = field(default_factory=list)  # replacements launched so far
    ended: float | None = None
    cancel_requested: bool = False
    baking_since: float | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def percentage(self, present: set[str]) -> int:
        if not self.to_replace:
            return 100
        gone = sum(1 for i in self.to_replace if i not in present)
        return int(100 * gone / len(self.to_replace))


@dataclass
class View:
    """What the group looks like now: instance id -> (lifecycle state, InService since)."""
    instances: dict[str, tuple[str, float | None]]
    abandoned: set[str]  # launched by this refresh and abandoned by a launch hook
    alarms: dict[str, str] = field(default_factory=dict)  # alarm name -> CloudWatch state


def alarm_names(preferences: dict) -> list[str]:
    """The alarms a refresh watches (Preferences.AlarmSpecification.Alarms)."""
    spec = (preferences or {}).get("AlarmSpecification") or {}
    alarms = spec.get("Alarms") or []
    return [alarms] if isinstance(alarms, str) else list(alarms)


def bake_time(preferences: dict) -> float:
    """Preferences.BakeTime in seconds (0 when absent)."""
    return float((preferences or {}).get("BakeTime", 0) or 0)


def refuse(preferences: dict, desired_configuration) -> str | None:
    """Why StartInstanceRefresh refuses these preferences (a ValidationError), if it does."""
    try:
        bake = bake_time(preferences)
    except (TypeError, ValueError):
        return "BakeTime must be a whole number of seconds"
    if not 0 <= bake <= MAX_BAKE_TIME:
        return f"BakeTime {bake:g} is outside 0-{MAX_BAKE_TIME} seconds"
    auto = str((preferences or {}).get("AutoRollback", "false")).lower() == "true"
    if auto and not desired_configuration:
        return "AutoRollback requires a DesiredConfiguration to roll back to"
    return None


def batch_size(refresh: Refresh) -> int:
    prefs = refresh.preferences
    max_healthy = int(prefs.get("MaxHealthyPercentage", 100))
    min_healthy = int(prefs.get("MinHealthyPercentage", 90))
    if max_healthy > 100:
        return max(1, math.floor(refresh.desired * (max_healthy - 100) / 100))
    return max(1, math.floor(refresh.desired * (100 - min_healthy) / 100))


def step(refresh: Refresh, view: View, now: float) -> list[tuple[str, object]]:
    """Advance `refresh` given the group's state; returns the actions to apply:
    ("launch", n) or ("terminate", [ids])."""
    if not refresh.active:
        return []
    if refresh.status == "Cancelling":
        # Cancelling stops further replacement; what was replaced stays.
        refresh.status, refresh.ended = "Cancelled", now
        return []
    if refresh.status == "Pending":
        refresh.status = "InProgress"
        return []
    if view.abandoned:
        refresh.status, refresh.ended = "Failed", now
        refresh.status_reason = (
            f"instance(s) {', '.join(sorted(view.abandoned))} were abandoned by a launch lifecycle hook"
        )
        return []
    firing = [a for a in alarm_names(refresh.preferences) if view.alarms.get(a) == "ALARM"]
    if firing:
        refresh.status, refresh.ended = "Failed", now
        refresh.status_reason = f"CloudWatch alarm(s) in ALARM state: {', '.join(firing)}"
        return []
    present = set(view.instances)
    old = [i for i in refresh.to_replace if i in present]
    old_waiting = [i for i in old if view.instances[i][0].startswith("Terminating")]
    old_live = [i for i in old if i not in old_waiting]
    warmup = float(refresh.preferences.get("InstanceWarmup", 0) or 0)
    new_live = [i for i in refresh.launched if i in present]
    new_pending = [
        i for i in new_live
        if view.instances[i][0] != "InService"
        or (view.instances[i][1] or now) + warmup > now
    ]
    if refresh.status == "Baking":
        if now - (refresh.baking_since or now) >= bake_time(refresh.preferences):
            refresh.status, refresh.ended = "Successful", now
            refresh.status_reason = ""
        return []
    launch_first = int(refresh.preferences.get("MaxHealthyPercentage", 100)) > 100
    live = [i for i, (state, _) in view.instances.items() if not state.startswith("Terminating")]
    if not old:
        if new_pending:
            return []
        if not launch_first and len(live) < refresh.desired:
            # Terminate first: the last batch's replacements are launched once it has gone,
            # and the refresh ends only when they serve (a group of one is never left empty).
            return [("launch", refresh.desired - len(live))]
        if bake_time(refresh.preferences) > 0:
            refresh.status, refresh.baking_since = "Baking", now
            return []
        refresh.status, refresh.ended = "Successful", now
        refresh.status_reason = ""
        return []
    if old_waiting or new_pending:
        return []  # wait for hooks and warm-up
    n = min(batch_size(refresh), len(old_live))
    # Launch before terminate: a batch of replacements first, their old ones once they serve.
    ready_new = [i for i in new_live if i not in refresh.to_replace]
    replaced_already = len(refresh.to_replace) - len(old)
    unmatched_new = len(ready_new) - replaced_already
    if launch_first:
        if unmatched_new > 0:
            return [("terminate", old_live[:unmatched_new])]
        return [("launch", n)]
    if len(live) < refresh.desired:
        return [("launch", refresh.desired - len(live))]
    return [("terminate", old_live[:n])]
