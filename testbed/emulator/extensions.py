"""skiff's extensions of moto 5: `apply()` is the one place moto is changed; each concept's module
patches its part (its `install()`), in this order:

1. limits_gate.py: every request passes one gate before moto: it is counted per access key and
   action (GET /skiff-emulator/calls?key=AKID) and AWS's request limits (limits.py decides)
   refuse it with AWS's error (an EC2 filter with more than 200 values: FilterLimitExceeded).
2. auth.py: authorization with resources and conditions (policy.py evaluates) for the actions
   it resolves to the ARNs AWS authorizes them against; moto's own check for the others. Also
   the IAM server's administrator and an instance profile's credentials.
3. cloudformation.py: AWS::IAM::Role's ManagedPolicyArns, AWS::AutoScaling::AutoScalingGroup's
   LifecycleHookSpecificationList, TemplateURL on the emulator's address, change sets' Outputs.
4. lifecycle.py: Auto Scaling lifecycle hooks (Pending:Wait, Terminating:Wait, Complete and
   Heartbeat, the heartbeat timeout's DefaultResult).
5. instance_refresh.py: Start/Describe/CancelInstanceRefresh over refresh.py's state machine; a
   capacity change during a refresh counts the group without the refresh's own surplus.
6. elb_health.py: the load balancer's view of each target (POST /skiff-emulator/target-health,
   health.py decides) marks an InService instance Unhealthy after the grace period and
   replaces it.
7. kms.py: KMS Sign/Verify honour MessageType (a DIGEST is signed as given, not hashed again).
Time decides too (hook timeouts, ELB health, refresh steps): `tick` applies it before every Auto
Scaling request. errors.py renders AWS's errors in each protocol's shape; lock.py holds the lock.
"""

from __future__ import annotations

import time
import traceback

from moto.autoscaling.responses import AutoScalingResponse

import auth
import cloudformation
import elb_health
import instance_refresh
import kms
import lifecycle
import limits_gate
from lock import LOCK

VERSION = "skiff-emulator 4"


def tick(backend) -> None:
    """Apply what time decided, group by group: hook timeouts (DefaultResult), the load
    balancer's health checks, then instance refreshes."""
    now = time.monotonic()
    for group in list(backend.autoscaling_groups.values()):
        lifecycle.expire(backend, group, now)
        elb_health.apply(backend, group, now)
        instance_refresh.step(backend, group, now)


def _patch_autoscaling_responses() -> None:
    for fn in (lifecycle.complete_lifecycle_action, lifecycle.record_lifecycle_action_heartbeat,
               instance_refresh.start_instance_refresh, instance_refresh.describe_instance_refreshes,
               instance_refresh.cancel_instance_refresh):
        setattr(AutoScalingResponse, fn.__name__, fn)
    # Every Auto Scaling request first applies what time decided (hook timeouts, refresh steps).
    original = AutoScalingResponse.call_action

    def call_action(self):
        with LOCK:
            try:
                tick(self.autoscaling_backend)
            except Exception:  # never fail a request because of bookkeeping
                traceback.print_exc()
            return original(self)

    AutoScalingResponse.call_action = call_action


def apply() -> None:
    limits_gate.install()  # first: the other patches of call_action wrap the gate
    auth.install()
    cloudformation.install()
    lifecycle.install()
    instance_refresh.install()
    elb_health.install()
    kms.install()
    _patch_autoscaling_responses()
