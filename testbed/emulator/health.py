"""Auto Scaling's use of the load balancer's health checks (pure: the caller applies the result).

With HealthCheckType ELB, an InService instance whose target the load balancer reports
`unhealthy` is marked Unhealthy and replaced, once the health check grace period, counted from
the moment it entered InService (after its launch lifecycle hook), has passed:
  https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-health-checks.html
  https://docs.aws.amazon.com/autoscaling/ec2/userguide/health-check-grace-period.html
The target states are the target group's (`initial`, `healthy`, `unhealthy`, `unused`,
`draining`, `unavailable`); only `unhealthy` counts, so a target still in its first checks
(`initial`) or deregistering (`draining`) is never replaced for it:
  https://docs.aws.amazon.com/elasticloadbalancing/latest/application/target-group-health-checks.html
With HealthCheckType EC2 the load balancer's view is ignored (EC2 status checks only, which the
emulator does not model: its instances never fail them).
"""

from __future__ import annotations

TARGET_STATES = ("initial", "healthy", "unhealthy", "unused", "draining", "unavailable")


def to_replace(check_type: str, grace: float, instances: dict[str, tuple[str, float | None]],
               targets: dict[str, str], now: float) -> list[str]:
    """Instances to mark Unhealthy and replace. `instances`: id -> (lifecycle state, InService
    since); `targets`: id -> the target group's state of that instance's target."""
    if (check_type or "EC2").upper() != "ELB":
        return []
    out = []
    for iid, (state, since) in sorted(instances.items()):
        if state != "InService" or targets.get(iid) != "unhealthy":
            continue
        if since is None or now - since < (grace or 0):
            continue  # within the grace period: the load balancer's view is not acted on yet
        out.append(iid)
    return out
