"""CloudFormation as AWS runs it where moto does not: AWS::IAM::Role honours ManagedPolicyArns,
AWS::AutoScaling::AutoScalingGroup honours LifecycleHookSpecificationList, a TemplateURL on the
emulator's own address is read, and a stack made or changed through a change set gets its Outputs.
"""

from __future__ import annotations

from moto.autoscaling import models as asg_models
from moto.autoscaling.models import autoscaling_backends
from moto.iam import models as iam_models
from moto.iam.models import iam_backends
from moto.utilities.utils import get_partition

from lifecycle import HOOK_SPECS

def _patch_role_cfn() -> None:
    # https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/aws-resource-iam-role.html
    original = iam_models.Role.create_from_cloudformation_json.__func__

    def create(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
        role = original(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs)
        backend = iam_backends[account_id][get_partition(region_name)]
        for arn in cloudformation_json["Properties"].get("ManagedPolicyArns", []) or []:
            backend.attach_role_policy(arn, role.name)
        return role

    iam_models.Role.create_from_cloudformation_json = classmethod(create)

    # CloudFormation detaches what it attached before it deletes the role (moto would refuse
    # with DeleteConflict).
    original_delete = iam_models.Role.delete_from_cloudformation_json.__func__

    def delete(cls, resource_name, cloudformation_json, account_id, region_name):
        backend = iam_backends[account_id][get_partition(region_name)]
        for role in list(backend.roles.values()):
            if role.name == resource_name:
                for arn in list(role.managed_policies):
                    backend.detach_role_policy(arn, resource_name)
        return original_delete(cls, resource_name, cloudformation_json, account_id, region_name)

    iam_models.Role.delete_from_cloudformation_json = classmethod(delete)

    # An update attaches ARNs added to ManagedPolicyArns (removed ones stay attached: not modelled).
    original_update = iam_models.Role.update_from_cloudformation_json.__func__

    def update(cls, original_resource, new_resource_name, cloudformation_json, account_id, region_name):
        role = original_update(cls, original_resource, new_resource_name, cloudformation_json,
                               account_id, region_name)
        backend = iam_backends[account_id][get_partition(region_name)]
        for arn in cloudformation_json["Properties"].get("ManagedPolicyArns", []) or []:
            if arn not in role.managed_policies:
                backend.attach_role_policy(arn, role.name)
        return role

    iam_models.Role.update_from_cloudformation_json = classmethod(update)



def _patch_group_cfn() -> None:
    # https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/aws-resource-autoscaling-autoscalinggroup.html
    # Hooks in LifecycleHookSpecificationList hold the group's very first instances.
    original = asg_models.FakeAutoScalingGroup.create_from_cloudformation_json.__func__

    def create(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
        props = cloudformation_json["Properties"]
        name = props.get("AutoScalingGroupName", resource_name)
        specs = props.get("LifecycleHookSpecificationList", []) or []
        HOOK_SPECS[(account_id, region_name, name)] = specs
        try:
            group = original(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs)
        finally:
            HOOK_SPECS.pop((account_id, region_name, name), None)
        backend = autoscaling_backends[account_id][region_name]
        for h in specs:
            backend.create_lifecycle_hook(
                name=h["LifecycleHookName"], as_name=group.name,
                transition=h["LifecycleTransition"],
                timeout=int(h.get("HeartbeatTimeout", 3600)), result=h.get("DefaultResult", "ABANDON"))
        return group

    asg_models.FakeAutoScalingGroup.create_from_cloudformation_json = classmethod(create)


def _patch_template_url() -> None:
    """A TemplateURL on the emulator's own address (`aws cloudformation deploy --s3-bucket` with
    AWS_ENDPOINT_URL uploads there and passes http://<host:port>/<bucket>/<key>) is path-style;
    moto reads only localhost and *.amazonaws.com path-style and takes the host's first label
    for the bucket otherwise (bucket "10" for 10.201.0.1)."""
    import moto.cloudformation.responses as cfn_responses
    from urllib.parse import urlparse

    original = cfn_responses.get_stack_from_s3_url

    def get_stack_from_s3_url(template_url: str, account_id: str, partition: str) -> str:
        u = urlparse(template_url)
        if u.port and not u.netloc.endswith("amazonaws.com") and "localhost" not in u.netloc:
            template_url = f"http://localhost:{u.port}{u.path}"
        return original(template_url, account_id=account_id, partition=partition)

    cfn_responses.get_stack_from_s3_url = get_stack_from_s3_url


def _patch_change_set_outputs() -> None:
    """A stack made or changed through a change set (`aws cloudformation deploy`) gets its
    Outputs, as through CreateStack/UpdateStack: moto's change set builds the resources but keeps
    the output map made before them from the stack's template before the change (empty for a
    new stack), so DescribeStacks showed no Outputs."""
    from moto.cloudformation.models import ChangeSet

    original = ChangeSet.apply

    def apply_change_set(self) -> None:
        original(self)
        self.stack.template_dict = self.template_dict  # the change set's, not the stack's first
        self.stack.output_map = self.stack._create_output_map()

    ChangeSet.apply = apply_change_set

def install() -> None:
    _patch_template_url()
    _patch_change_set_outputs()
    _patch_role_cfn()
    _patch_group_cfn()
