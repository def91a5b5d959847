"""What the instance metadata service (IMDS) serves the instances of a group: each one's tags
(with "Allow tags in instance metadata" on, as skiff's launch template sets) and its Auto
Scaling lifecycle state. IMDS is local to each instance and is not an EC2 API call: it draws
from no request bucket. https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/work-with-tags-in-IMDS.html
https://docs.aws.amazon.com/autoscaling/ec2/userguide/retrieving-target-lifecycle-state-through-imds.html

GET /skiff-emulator/instance-metadata?group=G[&region=R] answers, for every instance of group
G, {"lifecycle": <state>, "tags": {key: value}}: a simulation of many hosts reads what each of
its hosts would read from its own IMDS in one request (testbed/sim).
"""

from __future__ import annotations


def group_instances(account: str, region: str, group: str) -> dict[str, dict]:
    from moto.autoscaling.models import autoscaling_backends
    from moto.ec2.models import ec2_backends

    asg = autoscaling_backends[account][region].autoscaling_groups[group]
    ec2 = ec2_backends[account][region]
    out = {}
    for state in asg.instance_states:
        iid = state.instance.id
        out[iid] = {"lifecycle": state.lifecycle_state, "tags": dict(ec2.tags.get(iid, {}))}
    return out
