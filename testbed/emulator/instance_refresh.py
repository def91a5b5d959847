"""Instance refresh through the API: Start/Describe/CancelInstanceRefresh over refresh.py's state
machine (pure), whose actions `step` applies to moto's group; a capacity change during a refresh
counts the group without the refresh's own surplus. What is modelled and what is not: refresh.py.
https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-refresh-overview.html
"""

from __future__ import annotations

import datetime
import time

from moto.autoscaling import models as asg_models
from moto.autoscaling.exceptions import AutoscalingClientError
from moto.core.responses import ActionResult

import lifecycle
import refresh as refresh_sm
from lifecycle import COUNTED, begin_termination
from lock import LOCK

REFRESHES: dict[tuple[str, str, str], list[refresh_sm.Refresh]] = {}


def _refreshes(backend, name: str) -> list[refresh_sm.Refresh]:
    return REFRESHES.setdefault((backend.account_id, backend.region_name, name), [])


def step(backend, group, now: float) -> None:
    """Apply the state machine's actions. The group's desired capacity stays what it was: a
    refresh runs above it (MaxHealthyPercentage) or below it (MinHealthyPercentage) by itself,
    and when it ends early the instances above the desired capacity go, newest first."""
    for r in _refreshes(backend, group.name):
        if not r.active:
            continue
        view = refresh_sm.View(
            instances={s.instance.id: (s.lifecycle_state, getattr(s, "skiff_in_service_since", None))
                       for s in group.instance_states},
            abandoned={i for i in r.launched if i in lifecycle.ABANDONED},
            alarms=_alarm_states(backend, refresh_sm.alarm_names(r.preferences)),
        )
        for action, arg in refresh_sm.step(r, view, now):
            if action == "launch":
                before = {s.instance.id for s in group.instance_states}
                group.replace_autoscaling_group_instances(arg, group.get_propagated_tags())
                r.launched += [s.instance.id for s in group.instance_states if s.instance.id not in before]
                # The group registers the instances it launches with its target groups, those of
                # a refresh too (moto does so only on its own capacity changes).
                # https://docs.aws.amazon.com/autoscaling/ec2/userguide/attach-load-balancer-asg.html
                backend.update_attached_target_groups(group.name)
            elif action == "terminate":
                for iid in arg:
                    begin_termination(backend, group, iid)
        if r.status in ("Cancelled", "Failed"):
            live = [s for s in group.instance_states if not s.lifecycle_state.startswith("Terminating")]
            surplus = len(live) - (group.desired_capacity or 0)
            newest = sorted(live, key=lambda s: getattr(s, "skiff_launched_at", 0), reverse=True)
            for s in newest[:max(0, surplus)]:
                begin_termination(backend, group, s.instance.id)


def _alarm_states(backend, names: list[str]) -> dict[str, str]:
    """The CloudWatch state of each named alarm moto knows (SetAlarmState changes it)."""
    if not names:
        return {}
    from moto.cloudwatch.models import cloudwatch_backends

    alarms = cloudwatch_backends[backend.account_id][backend.region_name].alarms
    return {n: alarms[n].state_value for n in names if n in alarms}


# The Auto Scaling actions moto lacks. They run inside AutoScalingResponse.call_action, which holds
# LOCK and has applied what time decided (extensions.tick) just before.

def start_instance_refresh(self) -> ActionResult:
    name = self._get_param("AutoScalingGroupName")
    with LOCK:
        backend = self.autoscaling_backend
        group = backend.autoscaling_groups.get(name)
        if group is None:
            raise AutoscalingClientError("ValidationError", f"AutoScalingGroup name not found - {name}")
        if any(r.active for r in _refreshes(backend, name)):
            raise AutoscalingClientError(
                "InstanceRefreshInProgress",
                "An Instance Refresh is already in progress and blocks the execution of this Instance Refresh.")
        prefs = self._get_param("Preferences") or {}
        why = refresh_sm.refuse(prefs, self._get_param("DesiredConfiguration"))
        if why:
            raise AutoscalingClientError("ValidationError", why)
        r = refresh_sm.Refresh(
            group=name, preferences=prefs, strategy=self._get_param("Strategy") or "Rolling",
            started=time.monotonic(),
            to_replace=[s.instance.id for s in group.instance_states
                        if not s.lifecycle_state.startswith("Terminating")],
            desired=group.desired_capacity or 0,
        )
        r.started_at = time.time()
        _refreshes(backend, name).insert(0, r)
    return ActionResult({"InstanceRefreshId": r.id})


def describe_instance_refreshes(self) -> ActionResult:
    name = self._get_param("AutoScalingGroupName")
    ids = self._get_param("InstanceRefreshIds") or []
    limit = int(self._get_param("MaxRecords") or 50)
    with LOCK:
        backend = self.autoscaling_backend
        group = backend.autoscaling_groups.get(name)
        present = {s.instance.id for s in group.instance_states} if group else set()
        out = []
        for r in _refreshes(backend, name):
            if ids and r.id not in ids:
                continue
            item = {
                "InstanceRefreshId": r.id, "AutoScalingGroupName": name, "Status": r.status,
                "StartTime": datetime.datetime.fromtimestamp(r.started_at, datetime.timezone.utc),
                "PercentageComplete": r.percentage(present),
                "InstancesToUpdate": len([i for i in r.to_replace if i in present]),
                "Preferences": r.preferences, "Strategy": r.strategy,
            }
            if r.status_reason:
                item["StatusReason"] = r.status_reason
            if r.ended is not None:
                item["EndTime"] = datetime.datetime.fromtimestamp(
                    r.started_at + (r.ended - r.started), datetime.timezone.utc)
            out.append(item)
    return ActionResult({"InstanceRefreshes": out[:limit]})


def cancel_instance_refresh(self) -> ActionResult:
    name = self._get_param("AutoScalingGroupName")
    with LOCK:
        backend = self.autoscaling_backend
        active = [r for r in _refreshes(backend, name) if r.active]
        if not active:
            raise AutoscalingClientError(
                "ActiveInstanceRefreshNotFound", "No in progress or pending Instance Refresh found")
        active[0].status = "Cancelling"
        return ActionResult({"InstanceRefreshId": active[0].id})


def _patch_capacity() -> None:
    """A capacity change while a refresh runs (a scale-out, a replacement) counts the group
    without the refresh's own surplus: with MaxHealthyPercentage > 100 the refresh launches
    above the desired capacity by itself, and scaling goes on meanwhile with the group's
    current launch settings.
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-refresh-overview.html
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-health-checks.html
    moto would count the replacements in, see the group above its new capacity and terminate
    old instances at once, bypassing the refresh and the terminate hook."""
    original = asg_models.FakeAutoScalingGroup.set_desired_capacity

    def set_desired_capacity(self, new_capacity):
        key = (self.account_id, self.region, self.name)
        active = [r for r in REFRESHES.get(key, []) if r.active]
        if not active or new_capacity is None:
            return original(self, new_capacity)
        r = active[0]
        live = [s for s in self.instance_states if s.lifecycle_state in COUNTED]
        ids = {s.instance.id for s in live}
        own = len([i for i in r.to_replace if i in ids]) + len([i for i in r.launched if i in ids])
        counted = len(live) - max(0, own - r.desired)
        self.desired_capacity = new_capacity
        delta = new_capacity - counted
        if delta > 0:
            self.replace_autoscaling_group_instances(delta, self.get_propagated_tags())
        elif delta < 0:
            # Scale-in: the instances the refresh is about to replace go first, then the newest.
            order = [s for s in live if s.instance.id in r.to_replace] + sorted(
                (s for s in live if s.instance.id not in r.to_replace),
                key=lambda s: getattr(s, "skiff_launched_at", 0), reverse=True)
            for s in order[:-delta]:
                begin_termination(self.autoscaling_backend, self, s.instance.id)
        if self.name in self.autoscaling_backend.autoscaling_groups:
            self.autoscaling_backend.update_attached_elbs(self.name)
            self.autoscaling_backend.update_attached_target_groups(self.name)

    asg_models.FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity


def install() -> None:
    _patch_capacity()
    # Deleting a group deletes its refreshes' history, as in AWS.
    lifecycle.FORGET_GROUP.append(lambda key: REFRESHES.pop(key, None))
