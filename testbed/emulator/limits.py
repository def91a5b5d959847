"""AWS's request limits and quotas that moto does not enforce (pure: a request's service,
action and parameters in, the error AWS answers out). The hook that applies them in front of
moto's handlers is the only other place that knows about them.

EC2 filter values: one filter of a request (`Filter.N.Value.M`, e.g. DescribeTags' `resource-id`)
takes at most 200 values; a request with more is refused whole with `FilterLimitExceeded` (HTTP
400), nothing is paged.
  https://docs.aws.amazon.com/AWSEC2/latest/APIReference/Query-Requests-EC2.html#query-filtering
  https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html (FilterLimitExceeded:
  "The request uses too many filters or too many filter values.")

Request rates: token buckets per account and Region (RATE_RULES below, each with its page). A
request takes one token from its bucket; an empty bucket refuses it with the service's
throttling error (HTTP 400) and the request is not performed. Buckets refill at their rate up
to their size. AWS adds a second's tokens at once; here they trickle in continuously (the same
average, a smoother edge).

Target quota: 1,000 targets per target group and per Application Load Balancer (a target
registered with two of a load balancer's target groups counts twice there); RegisterTargets
past it is refused with `TooManyTargets`.
  https://docs.aws.amazon.com/elasticloadbalancing/latest/application/load-balancer-limits.html
  https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_RegisterTargets.html
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EC2_FILTER_VALUES_MAX = 200
_FILTER_VALUE = re.compile(r"^Filter\.(\d+)\.Value\.\d+$")


def ec2_filter_limit(params: dict) -> tuple[str, str] | None:
    """(code, message) when a filter of this EC2 query request has more values than AWS takes,
    else None. `params` maps each query parameter name to its value(s), as moto's querystring."""
    counts: dict[str, int] = {}
    for name in params:
        m = _FILTER_VALUE.match(name)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    for n, count in sorted(counts.items()):
        if count > EC2_FILTER_VALUES_MAX:
            filter_name = params.get(f"Filter.{n}.Name", ["?"])
            filter_name = filter_name[0] if isinstance(filter_name, list) else filter_name
            return ("FilterLimitExceeded",
                    f"The maximum number of filter values specified on a single call is "
                    f"{EC2_FILTER_VALUES_MAX} (filter {filter_name} has {count})")
    return None


# --- request rates -------------------------------------------------------------------------

EC2_THROTTLING = "https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html"
ELB_THROTTLING = "https://docs.aws.amazon.com/elasticloadbalancing/latest/userguide/elb-api-throttling.html"
SSM_QUOTAS = "https://docs.aws.amazon.com/general/latest/gr/ssm.html"
ASG_RATE = "https://docs.aws.amazon.com/autoscaling/ec2/APIReference/CommonErrors.html"


@dataclass(frozen=True)
class Rule:
    """One token bucket: `size` tokens, refilled `refill` per second. `family` names the bucket
    (requests of one family share it), `error` is the code AWS answers when it is empty."""
    family: str
    size: int
    refill: float
    error: str
    doc: str
    assumed: bool = False  # True: AWS publishes no figure; the size is ours (listed as assumed)


# EC2 evaluates each API on its own bucket, sized by the API's category (the page's "request
# token bucket sizes and refill rates" table); a Describe* without a filter or a page size
# draws from the smaller "unfiltered and unpaginated" bucket.
_EC2_NON_MUTATING = (100, 20.0)
_EC2_UNFILTERED = (50, 10.0)
_EC2_MUTATING = (50, 5.0)
_EC2_OWN = {"CreateTags": (100, 10.0)}
_EC2_READS = ("Describe", "Get", "List", "Search")
_EC2_NARROWING = re.compile(r"^(Filter\.\d+\.|MaxResults$|NextToken$|[A-Za-z]+Id\.\d+$)")


def _ec2(action: str, params: dict) -> Rule:
    if action in _EC2_OWN:
        size, refill = _EC2_OWN[action]
    elif action.startswith(_EC2_READS):
        narrowed = any(_EC2_NARROWING.match(p) for p in params)
        size, refill = _EC2_NON_MUTATING if narrowed else _EC2_UNFILTERED
    else:
        size, refill = _EC2_MUTATING
    return Rule(f"ec2:{action}", size, refill, "RequestLimitExceeded", EC2_THROTTLING)


def rate_rule(service: str, action: str, params: dict) -> Rule | None:
    """The bucket a request draws from, or None when we model no rate for it."""
    if service == "ec2":
        return _ec2(action, params)
    if service == "elbv2" and action.startswith("Describe"):
        # ELB API version 2's non-mutating actions share one bucket: 40 tokens, 10 per second.
        return Rule("elbv2:Describe*", 40, 10.0, "ThrottlingException", ELB_THROTTLING)
    if service == "ssm" and action in ("GetParameter", "GetParameters", "GetParametersByPath"):
        # Parameter Store's default throughput: 40 transactions per second shared by the three.
        return Rule("ssm:GetParameter*", 40, 40.0, "ThrottlingException", SSM_QUOTAS)
    if service == "autoscaling":
        # Auto Scaling throttles per account and Region ("Throttling", "Rate exceeded") but
        # publishes no bucket sizes: ELB's figures, per read/write family, are our assumption.
        family = "Describe*" if action.startswith("Describe") else "mutating"
        return Rule(f"autoscaling:{family}", 40 if family == "Describe*" else 20,
                    10.0 if family == "Describe*" else 4.0, "Throttling", ASG_RATE, assumed=True)
    return None


class Buckets:
    """Token buckets per (account, Region, family); `take` decides one request at time `now`
    (seconds, any monotonic clock). Not thread-safe: the caller holds its lock."""

    def __init__(self) -> None:
        self._state: dict[tuple[str, str, str], tuple[float, float]] = {}
        self.throttled: dict[tuple[str, str, str], int] = {}

    def take(self, account: str, region: str, rule: Rule, now: float) -> bool:
        key = (account, region, rule.family)
        tokens, last = self._state.get(key, (float(rule.size), now))
        tokens = min(float(rule.size), tokens + max(0.0, now - last) * rule.refill)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return True
        self._state[key] = (tokens, now)
        self.throttled[key] = self.throttled.get(key, 0) + 1
        return False


def throttling_message(rule: Rule) -> str:
    if rule.error == "RequestLimitExceeded":
        return "Request limit exceeded."
    return "Rate exceeded"


# --- quotas --------------------------------------------------------------------------------

TARGETS_PER_TARGET_GROUP = 1000
TARGETS_PER_LOAD_BALANCER = 1000


def targets_quota(group_targets: int, adding: int,
                  balancer_targets: dict[str, int]) -> tuple[str, str] | None:
    """(code, message) when registering `adding` new targets with a target group that has
    `group_targets` would pass a quota, else None. `balancer_targets` maps each load balancer
    the target group is attached to to the targets it counts now (over all its groups)."""
    if adding <= 0:
        return None
    if group_targets + adding > TARGETS_PER_TARGET_GROUP:
        return ("TooManyTargets",
                f"You've reached the limit on the number of targets: the target group would have "
                f"{group_targets + adding} (quota {TARGETS_PER_TARGET_GROUP} per target group)")
    for arn, count in sorted(balancer_targets.items()):
        if count + adding > TARGETS_PER_LOAD_BALANCER:
            return ("TooManyTargets",
                    f"You've reached the limit on the number of targets: load balancer {arn} "
                    f"would have {count + adding} (quota {TARGETS_PER_LOAD_BALANCER} per load balancer)")
    return None
