"""Auto Scaling lifecycle hooks, which moto stores but never applies.

Instances launched while a launch hook exists wait in Pending:Wait; one leaving the group
(TerminateInstanceInAutoScalingGroup, a scale-in, a replacement) with a terminate hook waits in
Terminating:Wait; CompleteLifecycleAction and RecordLifecycleActionHeartbeat answer them; a wait
past its heartbeat timeout takes the hook's DefaultResult (`expire`, called by the clock in
extensions.tick). Instances on their way in count toward the desired capacity, as in AWS.
https://docs.aws.amazon.com/autoscaling/ec2/userguide/lifecycle-hooks-overview.html
https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_CompleteLifecycleAction.html
https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_RecordLifecycleActionHeartbeat.html
A waiting instance carries `skiff_wait` = {hook, token, since, timeout, default}.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable

from moto.autoscaling import models as asg_models
from moto.autoscaling.exceptions import AutoscalingClientError
from moto.core.responses import ActionResult, EmptyResult

from lock import LOCK

# Hooks a group declares in CloudFormation (LifecycleHookSpecificationList) while it is being
# created: they hold its very first instances (cloudformation.py fills this).
HOOK_SPECS: dict[tuple[str, str, str], list[dict]] = {}

# Called with (account, region, group) once a group is deleted: each extension that keeps
# something per group forgets it there.
FORGET_GROUP: list[Callable[[tuple[str, str, str]], None]] = []

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
COUNTED = ("Pending", "Pending:Wait", "Pending:Proceed", "InService")


def _hooks(group, transition: str) -> list:
    backend = group.autoscaling_backend
    found = [h for h in backend.lifecycle_hooks.values()
             if h.auto_scaling_group_name == group.name and h.lifecycle_transition == transition]
    if found:
        return found
    specs = HOOK_SPECS.get((group.account_id, group.region, group.name), [])
    return [asg_models.LifecycleHook(h["LifecycleHookName"], group.name, h["LifecycleTransition"],
                                     int(h.get("HeartbeatTimeout", 3600)), h.get("DefaultResult"))
            for h in specs if h["LifecycleTransition"] == transition]


def _wait(state, hook, lifecycle_state: str) -> None:
    state.lifecycle_state = lifecycle_state
    state.skiff_wait = {"hook": hook.name, "token": str(uuid.uuid4()), "since": time.monotonic(),
                        "timeout": hook.heartbeat_timeout, "default": hook.default_result}


def install() -> None:
    original_replace = asg_models.FakeAutoScalingGroup.replace_autoscaling_group_instances

    def replace(self, count_needed, propagated_tags):
        before = {s.instance.id for s in self.instance_states}
        original_replace(self, count_needed, propagated_tags)
        hooks = _hooks(self, LAUNCHING)
        for s in self.instance_states:
            if s.instance.id in before:
                continue
            s.skiff_launched_at = time.monotonic()
            if hooks:
                _wait(s, hooks[0], "Pending:Wait")
            else:
                s.skiff_in_service_since = time.monotonic()

    asg_models.FakeAutoScalingGroup.replace_autoscaling_group_instances = replace
    # Instances on their way in count toward the desired capacity, as in AWS.
    asg_models.FakeAutoScalingGroup.active_instances = (
        lambda self: [x for x in self.instance_states if x.lifecycle_state in COUNTED])

    original_terminate = asg_models.AutoScalingBackend.terminate_instance

    def terminate_instance(self, instance_id, should_decrement):
        with LOCK:
            state = _find_state(self, instance_id)
            group = state.auto_scaling_group if state else None
            hooks = _hooks(group, TERMINATING) if group else []
            if not hooks:
                return original_terminate(self, instance_id, should_decrement)
            original_size = group.desired_capacity
            if state.lifecycle_state.startswith("Terminating"):
                return asg_models.TerminateInstanceActivity(state.instance, original_size)
            _wait(state, hooks[0], "Terminating:Wait")
            if should_decrement:
                group.desired_capacity -= 1
            else:
                group.set_desired_capacity(group.desired_capacity)  # a replacement
            return asg_models.TerminateInstanceActivity(state.instance, original_size)

    asg_models.AutoScalingBackend.terminate_instance = terminate_instance

    # Deleting a group deletes its hooks, as in AWS, and what the other extensions keep about it
    # (FORGET_GROUP: its refreshes' history, its targets' health).
    original_delete = asg_models.AutoScalingBackend.delete_auto_scaling_group

    def delete_auto_scaling_group(self, group_name):
        original_delete(self, group_name)
        for key, hook in list(self.lifecycle_hooks.items()):
            if hook.auto_scaling_group_name == group_name:
                del self.lifecycle_hooks[key]
        for forget in FORGET_GROUP:
            forget((self.account_id, self.region_name, group_name))

    asg_models.AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group


def _find_state(backend, instance_id: str):
    for g in backend.autoscaling_groups.values():
        for s in g.instance_states:
            if s.instance.id == instance_id:
                return s
    return None


def finish(backend, state, result: str) -> None:
    """Apply a lifecycle action's result to a waiting instance."""
    group = state.auto_scaling_group
    phase = state.lifecycle_state
    state.skiff_wait = None
    if phase == "Pending:Wait" and result == "CONTINUE":
        state.lifecycle_state = "InService"
        state.skiff_in_service_since = time.monotonic()
        return
    if phase == "Pending:Wait":
        # ABANDON: the instance is terminated and the group launches a replacement.
        state.skiff_abandoned = True
        ABANDONED.add(state.instance.id)
    group.instance_states = [s for s in group.instance_states if s is not state]
    backend.ec2_backend.terminate_instances([state.instance.id])
    if phase == "Pending:Wait":
        group.set_desired_capacity(group.desired_capacity)


# Instances whose launch was abandoned (ABANDON, or a launch hook's timeout with that default):
# a refresh that launched one fails.
ABANDONED: set[str] = set()


def expire(backend, group, now: float) -> None:
    """A wait past its heartbeat timeout takes the hook's DefaultResult."""
    for s in list(group.instance_states):
        w = getattr(s, "skiff_wait", None)
        if w and now - w["since"] > w["timeout"]:
            finish(backend, s, w["default"])


def begin_termination(backend, group, instance_id: str) -> None:
    """Take an instance out of service without touching the desired capacity: it waits in
    Terminating:Wait when the group has a terminate hook, else it is terminated at once."""
    state = next((s for s in group.instance_states if s.instance.id == instance_id), None)
    if state is None or state.lifecycle_state.startswith("Terminating"):
        return
    hooks = _hooks(group, TERMINATING)
    if hooks:
        _wait(state, hooks[0], "Terminating:Wait")
        return
    group.instance_states = [s for s in group.instance_states if s is not state]
    backend.ec2_backend.terminate_instances([instance_id])


def _validate_action(resp, backend):
    group_name = resp._get_param("AutoScalingGroupName")
    hook_name = resp._get_param("LifecycleHookName")
    instance_id = resp._get_param("InstanceId")
    token = resp._get_param("LifecycleActionToken")
    group = backend.autoscaling_groups.get(group_name)
    if group is None:
        raise AutoscalingClientError("ValidationError", f"Group {group_name} not found")
    if not any(h.name == hook_name and h.auto_scaling_group_name == group_name
               for h in backend.lifecycle_hooks.values()):
        raise AutoscalingClientError(
            "ValidationError", f"No Lifecycle Hook found with name {hook_name} for group {group_name}")
    if not instance_id and not token:
        raise AutoscalingClientError(
            "ValidationError", "Either InstanceId or LifecycleActionToken must be given")
    for s in group.instance_states:
        w = getattr(s, "skiff_wait", None)
        if not w or w["hook"] != hook_name:
            continue
        if (instance_id is None or s.instance.id == instance_id) and (token is None or token == w["token"]):
            return s
    what = f"instance ID {instance_id}" if instance_id else f"token {token}"
    raise AutoscalingClientError("ValidationError", f"No active Lifecycle Action found with {what}")


# The Auto Scaling actions moto lacks. They run inside AutoScalingResponse.call_action, which holds
# LOCK and has applied what time decided (extensions.tick) just before.

def complete_lifecycle_action(self) -> ActionResult:
    result = self._get_param("LifecycleActionResult")
    if result not in ("CONTINUE", "ABANDON"):
        raise AutoscalingClientError(
            "ValidationError", f"LifecycleActionResult must be CONTINUE or ABANDON, not {result!r}")
    with LOCK:
        backend = self.autoscaling_backend
        finish(backend, _validate_action(self, backend), result)
    return EmptyResult()


def record_lifecycle_action_heartbeat(self) -> ActionResult:
    with LOCK:
        backend = self.autoscaling_backend
        state = _validate_action(self, backend)
        state.skiff_wait["since"] = time.monotonic()
    return EmptyResult()

