"""ELB health checks in Auto Scaling (health.py decides): the load balancer's view of each
target, reported through POST /skiff-emulator/target-health, is what DescribeTargetHealth answers,
and with HealthCheckType ELB it marks an InService instance Unhealthy after the grace period and
replaces it (terminate hook, then a launch to keep the desired capacity).
"""

from __future__ import annotations

from moto.autoscaling.models import autoscaling_backends

import health
import lifecycle
from lifecycle import begin_termination

# The load balancer's view of each target, as the load balancer (the fleet box's controller,
# standing in for the ALB) reports it: (account, region, group) -> {instance id: target state}.
TARGET_HEALTH: dict[tuple[str, str, str], dict[str, str]] = {}


def report_target_health(account_id: str, region: str, group: str, targets: dict[str, str]) -> None:
    """POST /skiff-emulator/target-health: the whole view of the group's targets (an instance
    left out has no target: `unused`)."""
    bad = {i: s for i, s in targets.items() if s not in health.TARGET_STATES}
    if bad:
        raise ValueError(f"unknown target state(s) {bad}; one of {', '.join(health.TARGET_STATES)}")
    backend = autoscaling_backends[account_id][region]
    if group not in backend.autoscaling_groups:
        raise KeyError(f"no Auto Scaling group {group!r} in {region}")
    TARGET_HEALTH[(account_id, region, group)] = dict(targets)


# Reason codes DescribeTargetHealth gives with each reported state.
# https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_TargetHealth.html
_TARGET_REASONS = {
    "initial": ("Elb.InitialHealthChecking", "Initial health checks in progress"),
    "unhealthy": ("Target.FailedHealthChecks", "Health checks failed"),
    "draining": ("Target.DeregistrationInProgress", "Target deregistration is in progress"),
    "unused": ("Target.NotInUse", "Target group is not configured to receive traffic from the load balancer"),
    "unavailable": ("Elb.InternalError", "Health checks failed due to an internal error"),
}


def _patch_target_health() -> None:
    """DescribeTargetHealth answers the load balancer's view reported through
    /skiff-emulator/target-health for a registered instance target (moto calls every registered
    instance healthy)."""
    from moto.elbv2 import models as elbv2_models

    original = elbv2_models.FakeTargetGroup.health_for

    def health_for(self, target, ec2_backend):
        status = original(self, target, ec2_backend)
        if status.status != "healthy":
            return status
        _, _, _, region, account = self.arn.split(":", 5)[:5]
        for (acc, reg, _group), targets in TARGET_HEALTH.items():
            state = targets.get(target["Id"]) if (acc, reg) == (account, region) else None
            if state and state != "healthy":
                reason, description = _TARGET_REASONS.get(state, (None, None))
                return elbv2_models.FakeHealthStatus(status.instance_id, status.port,
                                                     status.health_check_port, state, reason, description)
        return status

    elbv2_models.FakeTargetGroup.health_for = health_for


def apply(backend, group, now: float) -> None:
    targets = TARGET_HEALTH.get((backend.account_id, backend.region_name, group.name))
    if not targets:
        return
    # Suspended HealthCheck marks no instance Unhealthy, suspended ReplaceUnhealthy replaces none
    # (here both: nothing is acted on while either is suspended).
    # https://docs.aws.amazon.com/autoscaling/ec2/userguide/as-suspend-resume-processes.html
    suspended = {p["ProcessName"] for p in group.suspended_processes}
    if suspended & {"HealthCheck", "ReplaceUnhealthy"}:
        return
    view = {s.instance.id: (s.lifecycle_state, getattr(s, "skiff_in_service_since", None))
            for s in group.instance_states}
    for iid in health.to_replace(group.health_check_type, group.health_check_grace_period or 0,
                                 view, targets, now):
        state = next(s for s in group.instance_states if s.instance.id == iid)
        state.health_status = "Unhealthy"
        targets.pop(iid, None)
        print(f"skiff-emulator: {iid} of {group.name} is Unhealthy (ELB health check): replacing it",
              flush=True)
        # Terminated (through the terminate hook), then a launch keeps the desired capacity.
        # https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-health-checks.html
        begin_termination(backend, group, iid)
        group.set_desired_capacity(group.desired_capacity)



def install() -> None:
    _patch_target_health()
    lifecycle.FORGET_GROUP.append(lambda key: TARGET_HEALTH.pop(key, None))  # a deleted group's targets
