"""skiff's extensions of moto 5: the one place moto is changed. `apply()` patches it in place.

1. Authorization with resources and conditions (policy.py evaluates). For the actions listed in
   RESOLVERS the request is authorized against the ARN(s) AWS authorizes it against, with the
   condition keys our policies use; every other action keeps moto's own check (Resource "*").
2. CloudFormation: AWS::IAM::Role honours ManagedPolicyArns; AWS::AutoScaling::AutoScalingGroup
   honours LifecycleHookSpecificationList (moto ignores both).
3. Auto Scaling lifecycle hooks: instances launched while a launch hook exists wait in
   Pending:Wait, TerminateInstanceInAutoScalingGroup with a terminate hook waits in
   Terminating:Wait; CompleteLifecycleAction and RecordLifecycleActionHeartbeat answer them;
   a wait past its heartbeat timeout takes the hook's DefaultResult.
4. Instance refresh: Start/Describe/CancelInstanceRefresh over refresh.py's state machine; a
   capacity change during a refresh counts the group without the refresh's own surplus.
5. ELB health checks (health.py decides): the load balancer's view of each target, reported
   through POST /skiff-emulator/target-health, marks an InService instance Unhealthy after the
   grace period and replaces it (terminate hook, then a launch to keep the desired capacity).
6. Request limits (limits.py decides): an EC2 filter with more than 200 values is refused with
   FilterLimitExceeded before moto answers it. Every call is counted per access key and action
   (GET /skiff-emulator/calls?key=AKID): tests measure what a tool asks of AWS.
"""

from __future__ import annotations

import collections
import threading
from xml.sax.saxutils import escape as xml_escape
import time
import uuid
from typing import Any, Callable

from moto import settings
from moto.autoscaling import models as asg_models
from moto.autoscaling.exceptions import AutoscalingClientError
from moto.autoscaling.models import autoscaling_backends
from moto.autoscaling.responses import AutoScalingResponse
from moto.cloudformation.models import cloudformation_backends
from moto.core.authorization import ActionAuthenticatorMixin
from moto.core.exceptions import AccessDeniedError, JsonRESTError, _RESTError
from moto.core.responses import ActionResult, EmptyResult
from moto.ec2.models import ec2_backends
from moto.iam import models as iam_models
from moto.iam.access_control import IAMRequest
from moto.iam.models import iam_backends
from moto.utilities.utils import get_partition

import health
import limits
import policy
import refresh as refresh_sm

VERSION = "skiff-emulator 4"
LOCK = threading.RLock()


# --- 1. authorization ----------------------------------------------------------------------


class ProtocolError(_RESTError):
    """An error rendered as the service's protocol shapes it (moto's _RESTError body,
    ErrorResponse/Errors/Error, is read by botocore but not by the Rust SDK's parsers):
      awsQuery (Auto Scaling, CloudFormation, IAM, STS): ErrorResponse/Error/{Type,Code,Message}
        https://smithy.io/2.0/aws/protocols/aws-query-protocol.html
      ec2Query: Response/Errors/Error/{Code,Message}
        https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html"""

    def __init__(self, service: str, error_type: str, message: str, status: int = 403):
        super().__init__(error_type, message)
        self.code = status
        rid = uuid.uuid4().hex
        msg = xml_escape(message)
        if service == "ec2":
            self.description = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>"
                                f"<Code>{error_type}</Code><Message>{msg}</Message></Error></Errors>"
                                f"<RequestID>{rid}</RequestID></Response>")
        else:
            self.description = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ErrorResponse><Error>"
                                f"<Type>Sender</Type><Code>{error_type}</Code><Message>{msg}</Message>"
                                f"</Error><RequestId>{rid}</RequestId></ErrorResponse>")


def access_denied(resp, user_arn: str, check: policy.Check, explicit: bool) -> _RESTError:
    """The error AWS answers, in the service's protocol: AccessDeniedException in JSON
    services, UnauthorizedOperation in EC2, AccessDenied in the other query services.
    https://docs.aws.amazon.com/IAM/latest/UserGuide/troubleshoot_access-denied.html
    https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html"""
    why = "an explicit deny in an identity-based policy" if explicit else (
        f"no identity-based policy allows the {check.action} action")
    message = (f"User: {user_arn} is not authorized to perform: {check.action} "
               f"on resource: {check.resource} because {why}")
    return denial(resp, message)


def denial(resp, message: str) -> _RESTError:
    if resp.headers.get("X-Amz-Target"):
        return JsonRESTError("AccessDeniedException", message)
    if resp.service_name == "ec2":
        return ProtocolError("ec2", "UnauthorizedOperation", message)
    return ProtocolError(resp.service_name, "AccessDenied", message)


def _arn(resp, service: str, rest: str, region: bool = True, account: bool = True) -> str:
    part = get_partition(resp.region)
    return f"arn:{part}:{service}:{resp.region if region else ''}:{resp.current_account if account else ''}:{rest}"


def _param(resp, name: str, default: Any = None) -> Any:
    try:
        value = resp._get_param(name)
    except Exception:
        value = None
    return default if value is None else value


# SSM: parameter ARNs.
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_awssystemsmanager.html
# Retrieval is authorized per named parameter, GetParametersByPath against the path:
# https://docs.aws.amazon.com/systems-manager/latest/userguide/ps-retrieval-authorization.html

def _ssm_name(name: str) -> str:
    if name.startswith("arn:"):
        name = name.split(":parameter", 1)[1]
    name = name.split(":", 1)[0]  # a version or label selector: /a/b:3
    return name


def _ssm_arn(resp, name: str) -> str:
    return _arn(resp, "ssm", "parameter/" + _ssm_name(name).lstrip("/"))


def _ssm_kms_checks(resp, names: list[str]) -> list[policy.Check]:
    """A SecureString read WithDecryption makes SSM call kms:Decrypt as the caller, with
    kms:ViaService = ssm.<region>.amazonaws.com. The AWS managed key aws/ssm allows that for
    every principal of the account through its key policy, so only customer keys need IAM.
    https://docs.aws.amazon.com/kms/latest/developerguide/services-parameter-store.html"""
    if not _param(resp, "WithDecryption", False):
        return []
    from moto.ssm.models import ssm_backends

    backend = ssm_backends[resp.current_account][resp.region]
    checks = []
    for name in names:
        try:
            versions = backend._parameters.get(backend._parameters.normalize_name(_ssm_name(name)))
        except Exception:
            versions = None
        if not versions:
            continue
        latest = versions[-1]
        key = getattr(latest, "keyid", None)
        if latest.parameter_type != "SecureString" or not key or key in ("alias/aws/ssm",):
            continue
        checks.append(policy.Check("kms:Decrypt", _kms_key_arn(resp, key), {
            "kms:ViaService": [f"ssm.{resp.region}.amazonaws.com"],
            "kms:CallerAccount": [resp.current_account],
        }))
    return checks


def _ssm(resp, action: str) -> list[policy.Check] | None:
    a = f"ssm:{action}"
    if action in ("GetParameter", "PutParameter", "DeleteParameter", "GetParameterHistory",
                  "LabelParameterVersion"):
        name = _param(resp, "Name", "")
        ctx = {}
        if action == "PutParameter":
            tags = _param(resp, "Tags", []) or []
            ctx = _request_tags({t["Key"]: t["Value"] for t in tags})
        return [policy.Check(a, _ssm_arn(resp, name), ctx)] + (
            _ssm_kms_checks(resp, [name]) if action != "PutParameter" else [])
    if action in ("GetParameters", "DeleteParameters"):
        names = _param(resp, "Names", []) or []
        return [policy.Check(a, _ssm_arn(resp, n)) for n in names] + _ssm_kms_checks(resp, names)
    if action == "GetParametersByPath":
        path = _param(resp, "Path", "/")
        # The path's ARN without its trailing slash (/skiff/x/env/ -> parameter/skiff/x/env).
        arn = _arn(resp, "ssm", "parameter/" + path.strip("/"))
        from moto.ssm.models import ssm_backends

        backend = ssm_backends[resp.current_account][resp.region]
        try:
            names = list(backend._parameters.get_keys_beginning_with(
                path.rstrip("/") + "/", bool(_param(resp, "Recursive", False))))
        except Exception:
            names = []
        return [policy.Check(a, arn)] + _ssm_kms_checks(resp, names)
    if action == "DescribeParameters":
        return [policy.Check(a, "*")]
    return None


# ECR: repository ARNs; GetAuthorizationToken has no resource.
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonelasticcontainerregistry.html

def _ecr(resp, action: str) -> list[policy.Check] | None:
    a = f"ecr:{action}"
    if action == "GetAuthorizationToken":
        return [policy.Check(a, "*")]
    repo = _param(resp, "repositoryName")
    if repo:
        return [policy.Check(a, _arn(resp, "ecr", f"repository/{repo}"))]
    if action == "DescribeRepositories":
        names = _param(resp, "repositoryNames", []) or []
        return [policy.Check(a, _arn(resp, "ecr", f"repository/{n}")) for n in names] or [
            policy.Check(a, "*")]
    return None


# Auto Scaling: group ARNs with the group's id; Describe* have no resource-level permissions.
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonec2autoscaling.html

def _group(resp, name: str):
    return autoscaling_backends[resp.current_account][resp.region].autoscaling_groups.get(name)


def _group_check(resp, action: str, name: str) -> policy.Check:
    group = _group(resp, name)
    if group is None:
        arn = _arn(resp, "autoscaling", f"autoScalingGroup:00000000-0000-0000-0000-000000000000:autoScalingGroupName/{name}")
        return policy.Check(f"autoscaling:{action}", arn)
    ctx = {}
    for t in group.tags:
        # Both spellings are documented for groups' tags.
        ctx[f"aws:ResourceTag/{t['Key']}"] = [t["Value"]]
        ctx[f"autoscaling:ResourceTag/{t['Key']}"] = [t["Value"]]
    return policy.Check(f"autoscaling:{action}", group.arn, ctx)


def _autoscaling(resp, action: str) -> list[policy.Check] | None:
    if action.startswith("Describe"):
        return [policy.Check(f"autoscaling:{action}", "*")]
    if action == "TerminateInstanceInAutoScalingGroup":
        iid = _param(resp, "InstanceId", "")
        backend = autoscaling_backends[resp.current_account][resp.region]
        for g in backend.autoscaling_groups.values():
            if any(s.instance.id == iid for s in g.instance_states):
                return [_group_check(resp, action, g.name)]
        return [policy.Check(f"autoscaling:{action}", "*")]
    name = _param(resp, "AutoScalingGroupName")
    if name:
        return [_group_check(resp, action, name)]
    if action in ("CreateOrUpdateTags", "DeleteTags"):
        # Tags name their group in ResourceId (ResourceType auto-scaling-group).
        names = sorted({t.get("ResourceId", "") for t in _param(resp, "Tags", []) or []
                        if isinstance(t, dict)})
        if names:
            return [_group_check(resp, action, n) for n in names]
    return None


# EC2: tagging is authorized per resource ARN, with aws:ResourceTag (the resource's tags before
# the call), aws:RequestTag and aws:TagKeys (the request's). Describe* have no resources.
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonec2.html
# https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/supported-iam-actions-tagging.html

EC2_TYPES = {"i-": "instance", "vol-": "volume", "sg-": "security-group", "subnet-": "subnet",
             "vpc-": "vpc", "eni-": "network-interface", "lt-": "launch-template",
             "snap-": "snapshot"}


def _request_tags(tags: dict[str, str]) -> dict[str, list[str]]:
    ctx = {f"aws:RequestTag/{k}": [v] for k, v in tags.items()}
    ctx["aws:TagKeys"] = list(tags)
    return ctx


def _ec2(resp, action: str) -> list[policy.Check] | None:
    a = f"ec2:{action}"
    if action.startswith("Describe"):
        return [policy.Check(a, "*")]
    if action not in ("CreateTags", "DeleteTags"):
        return None
    qs = resp.querystring
    ids = [qs[k][0] for k in sorted(qs) if k.startswith("ResourceId.")]
    tags = {}
    for k in sorted(qs):
        if k.startswith("Tag.") and k.endswith(".Key"):
            n = k[len("Tag."):-len(".Key")]
            tags[qs[k][0]] = qs.get(f"Tag.{n}.Value", [""])[0]
    backend = ec2_backends[resp.current_account][resp.region]
    checks = []
    for rid in ids:
        kind = next((t for p, t in EC2_TYPES.items() if rid.startswith(p)), None)
        if rid.startswith("ami-"):
            arn = f"arn:{get_partition(resp.region)}:ec2:{resp.region}::image/{rid}"
        else:
            arn = _arn(resp, "ec2", f"{kind or 'unknown'}/{rid}")
        ctx = {f"aws:ResourceTag/{k}": [v] for k, v in backend.tags.get(rid, {}).items()}
        ctx.update(_request_tags(tags))
        checks.append(policy.Check(a, arn, ctx))
    return checks


# CloudFormation: stack ARNs (with the stack id); without a stack name DescribeStacks is "*".
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_awscloudformation.html

def _cloudformation(resp, action: str) -> list[policy.Check] | None:
    a = f"cloudformation:{action}"
    name = _param(resp, "StackName")
    if not name:
        return [policy.Check(a, "*")] if action in ("DescribeStacks", "ListStacks") else None
    backend = cloudformation_backends[resp.current_account][resp.region]
    for stack in backend.stacks.values():
        if name in (stack.name, stack.stack_id) and stack.status != "DELETE_COMPLETE":
            return [policy.Check(a, stack.stack_id)]
    return [policy.Check(a, _arn(resp, "cloudformation", f"stack/{name}/*"))]


# Secrets Manager: the secret's full ARN, aws:ResourceTag from its tags.
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_awssecretsmanager.html

def _secretsmanager(resp, action: str) -> list[policy.Check] | None:
    if action not in ("GetSecretValue", "DescribeSecret", "PutSecretValue"):
        return None
    from moto.secretsmanager.models import secretsmanager_backends

    sid = _param(resp, "SecretId", "")
    secret = secretsmanager_backends[resp.current_account][resp.region].secrets.get(sid)
    if secret is None:
        arn = sid if sid.startswith("arn:") else _arn(resp, "secretsmanager", f"secret:{sid}")
        return [policy.Check(f"secretsmanager:{action}", arn)]
    ctx = {f"aws:ResourceTag/{t['Key']}": [t["Value"]] for t in (secret.tags or [])}
    return [policy.Check(f"secretsmanager:{action}", secret.arn, ctx)]


# KMS: key ARNs (aliases resolved); a direct call carries no kms:ViaService.
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_awskeymanagementservice.html
# https://docs.aws.amazon.com/kms/latest/developerguide/conditions-kms.html#conditions-kms-via-service

def _kms_key_arn(resp, key: str) -> str:
    from moto.kms.models import kms_backends

    backend = kms_backends[resp.current_account][resp.region]
    try:
        key_id = backend.any_id_to_key_id(key)
    except Exception:
        key_id = key.split("/")[-1]
    return _arn(resp, "kms", f"key/{key_id}")


def _kms(resp, action: str) -> list[policy.Check] | None:
    key = _param(resp, "KeyId")
    ctx = {"kms:CallerAccount": [resp.current_account]}
    if action == "Decrypt" and not key:
        # The key comes from the ciphertext; moto's blob starts with the key id (36 chars).
        import base64

        try:
            blob = base64.b64decode(_param(resp, "CiphertextBlob", ""))
            key = blob[:36].decode()
        except Exception:
            return [policy.Check("kms:Decrypt", "*", ctx)]
    if key:
        return [policy.Check(f"kms:{action}", _kms_key_arn(resp, key), ctx)]
    return None


# CloudWatch Logs. The actions on a group's streams and events are not authorized against the
# group's bare ARN (`log-group:NAME`): the ARN a policy must name for them is the one "with the
# trailing :*" (`log-group:NAME:*`), and AWS's denials name the resource it checked,
# `log-group:NAME:log-stream:` for DescribeLogStreams/FilterLogEvents (no stream) and
# `log-group:NAME:log-stream:STREAM` for CreateLogStream/PutLogEvents/GetLogEvents. Only
# TagResource/UntagResource/ListTagsForResource and the like take the bare ARN (not modelled).
# https://docs.aws.amazon.com/AmazonCloudWatch/latest/logs/iam-access-control-overview-cwl.html
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazoncloudwatchlogs.html
LOGS_GROUP_ACTIONS = ("DescribeLogStreams", "FilterLogEvents", "DeleteLogGroup", "PutRetentionPolicy")
LOGS_STREAM_ACTIONS = ("CreateLogStream", "PutLogEvents", "GetLogEvents", "DeleteLogStream")


def _logs(resp, action: str) -> list[policy.Check] | None:
    group = _param(resp, "logGroupName") or _param(resp, "logGroupIdentifier")
    if not group:
        return None
    if group.startswith("arn:"):  # logGroupIdentifier may be the group's ARN (with ":*")
        group = group.split(":log-group:", 1)[1].removesuffix(":*")
    streams = _arn(resp, "logs", f"log-group:{group}:log-stream:")
    if action in LOGS_GROUP_ACTIONS:
        return [policy.Check(f"logs:{action}", streams)]
    stream = _param(resp, "logStreamName")
    if action in LOGS_STREAM_ACTIONS and stream:
        return [policy.Check(f"logs:{action}", f"{streams}{stream}")]
    return None


# ELBv2: Describe* have no resource-level permissions (resource "*"); ctl status reads target
# health. https://docs.aws.amazon.com/service-authorization/latest/reference/list_awselasticloadbalancingv2.html
def _elbv2(resp, action: str) -> list[policy.Check] | None:
    if action.startswith("Describe"):
        return [policy.Check(f"elasticloadbalancing:{action}", "*")]
    return None


RESOLVERS: dict[str, Callable] = {
    "ssm": _ssm, "ecr": _ecr, "autoscaling": _autoscaling, "ec2": _ec2,
    "cloudformation": _cloudformation, "secretsmanager": _secretsmanager, "kms": _kms,
    "logs": _logs, "elbv2": _elbv2,
}


def resolve(resp) -> list[policy.Check] | None:
    fn = RESOLVERS.get(getattr(resp, "service_name", None))
    if fn is None:
        return None
    return fn(resp, resp._get_action())


_original_authorize = ActionAuthenticatorMixin._authenticate_and_authorize_normal_action
# What was authorized, by whom and by which statement: tests read it to list statements a run
# never needed (GET /skiff-emulator/authorizations).
AUTH_LOG: collections.deque = collections.deque(maxlen=20000)


def _authorize(self, resource: str = "*") -> None:
    if ActionAuthenticatorMixin.request_count < settings.INITIAL_NO_AUTH_ACTION_COUNT:
        ActionAuthenticatorMixin.request_count += 1
        return
    checks = resolve(self)
    if checks is None:
        try:
            return _original_authorize(self, resource)
        except AccessDeniedError as e:  # moto's own check: same answer, the protocol's shape
            raise denial(self, e.message) from None
    request = IAMRequest(
        account_id=self.current_account, method=self.method, path=self.raw_path,
        data=self.data, body=self.raw_body, headers=self.headers, action=self._get_action(),
    )
    request.check_signature()
    key = request._access_key
    docs = [_document(p) for p in key.collect_policies()]
    decision = policy.evaluate(policy.statements(docs), checks)
    AUTH_LOG.append({
        "principal": key.arn, "allowed": decision.allowed,
        "checks": [{"action": c.action, "resource": c.resource} for c in checks],
        "allowed_by": decision.allowed_by,
    })
    if not decision.allowed:
        raise access_denied(self, key.arn, decision.denied_by, decision.explicit)


def _document(p: Any) -> Any:
    if isinstance(p, iam_models.Policy):
        return next(v.document for v in p.versions if v.is_default)
    if isinstance(p, dict):
        return p.get("policy_document", p)
    return p


# --- 2. CloudFormation ----------------------------------------------------------------------

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


_HOOK_SPECS: dict[tuple[str, str, str], list[dict]] = {}


def _patch_group_cfn() -> None:
    # https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/aws-resource-autoscaling-autoscalinggroup.html
    # Hooks in LifecycleHookSpecificationList hold the group's very first instances.
    original = asg_models.FakeAutoScalingGroup.create_from_cloudformation_json.__func__

    def create(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
        props = cloudformation_json["Properties"]
        name = props.get("AutoScalingGroupName", resource_name)
        specs = props.get("LifecycleHookSpecificationList", []) or []
        _HOOK_SPECS[(account_id, region_name, name)] = specs
        try:
            group = original(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs)
        finally:
            _HOOK_SPECS.pop((account_id, region_name, name), None)
        backend = autoscaling_backends[account_id][region_name]
        for h in specs:
            backend.create_lifecycle_hook(
                name=h["LifecycleHookName"], as_name=group.name,
                transition=h["LifecycleTransition"],
                timeout=int(h.get("HeartbeatTimeout", 3600)), result=h.get("DefaultResult", "ABANDON"))
        return group

    asg_models.FakeAutoScalingGroup.create_from_cloudformation_json = classmethod(create)


# --- 3. lifecycle hooks ---------------------------------------------------------------------
# https://docs.aws.amazon.com/autoscaling/ec2/userguide/lifecycle-hooks-overview.html
# https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_CompleteLifecycleAction.html
# https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_RecordLifecycleActionHeartbeat.html
# A waiting instance carries `skiff_wait` = {hook, token, since, timeout, default}.

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
COUNTED = ("Pending", "Pending:Wait", "Pending:Proceed", "InService")


def _hooks(group, transition: str) -> list:
    backend = group.autoscaling_backend
    found = [h for h in backend.lifecycle_hooks.values()
             if h.auto_scaling_group_name == group.name and h.lifecycle_transition == transition]
    if found:
        return found
    specs = _HOOK_SPECS.get((group.account_id, group.region, group.name), [])
    return [asg_models.LifecycleHook(h["LifecycleHookName"], group.name, h["LifecycleTransition"],
                                     int(h.get("HeartbeatTimeout", 3600)), h.get("DefaultResult"))
            for h in specs if h["LifecycleTransition"] == transition]


def _wait(state, hook, lifecycle_state: str) -> None:
    state.lifecycle_state = lifecycle_state
    state.skiff_wait = {"hook": hook.name, "token": str(uuid.uuid4()), "since": time.monotonic(),
                        "timeout": hook.heartbeat_timeout, "default": hook.default_result}


def _patch_lifecycle() -> None:
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

    # Deleting a group deletes its hooks and its refreshes' history, as in AWS.
    original_delete = asg_models.AutoScalingBackend.delete_auto_scaling_group

    def delete_auto_scaling_group(self, group_name):
        original_delete(self, group_name)
        for key, hook in list(self.lifecycle_hooks.items()):
            if hook.auto_scaling_group_name == group_name:
                del self.lifecycle_hooks[key]
        REFRESHES.pop((self.account_id, self.region_name, group_name), None)
        TARGET_HEALTH.pop((self.account_id, self.region_name, group_name), None)

    asg_models.AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group


def _find_state(backend, instance_id: str):
    for g in backend.autoscaling_groups.values():
        for s in g.instance_states:
            if s.instance.id == instance_id:
                return s
    return None


def _finish(backend, state, result: str) -> None:
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
        _ABANDONED.add(state.instance.id)
    group.instance_states = [s for s in group.instance_states if s is not state]
    backend.ec2_backend.terminate_instances([state.instance.id])
    if phase == "Pending:Wait":
        group.set_desired_capacity(group.desired_capacity)


_ABANDONED: set[str] = set()


def tick(backend) -> None:
    """Apply what time decided: hook timeouts (DefaultResult), the load balancer's health
    checks, then instance refreshes."""
    now = time.monotonic()
    for group in list(backend.autoscaling_groups.values()):
        for s in list(group.instance_states):
            w = getattr(s, "skiff_wait", None)
            if w and now - w["since"] > w["timeout"]:
                _finish(backend, s, w["default"])
        _apply_elb_health(backend, group, now)
        _step_refresh(backend, group, now)


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


def complete_lifecycle_action(self) -> ActionResult:
    result = self._get_param("LifecycleActionResult")
    if result not in ("CONTINUE", "ABANDON"):
        raise AutoscalingClientError(
            "ValidationError", f"LifecycleActionResult must be CONTINUE or ABANDON, not {result!r}")
    with LOCK:
        backend = self.autoscaling_backend
        tick(backend)
        _finish(backend, _validate_action(self, backend), result)
    return EmptyResult()


def record_lifecycle_action_heartbeat(self) -> ActionResult:
    with LOCK:
        backend = self.autoscaling_backend
        tick(backend)
        state = _validate_action(self, backend)
        state.skiff_wait["since"] = time.monotonic()
    return EmptyResult()


# --- 4. instance refresh --------------------------------------------------------------------

REFRESHES: dict[tuple[str, str, str], list[refresh_sm.Refresh]] = {}


def _refreshes(backend, name: str) -> list[refresh_sm.Refresh]:
    return REFRESHES.setdefault((backend.account_id, backend.region_name, name), [])


def _step_refresh(backend, group, now: float) -> None:
    """Apply the state machine's actions. The group's desired capacity stays what it was: a
    refresh runs above it (MaxHealthyPercentage) or below it (MinHealthyPercentage) by itself,
    and when it ends early the instances above the desired capacity go, newest first."""
    for r in _refreshes(backend, group.name):
        if not r.active:
            continue
        view = refresh_sm.View(
            instances={s.instance.id: (s.lifecycle_state, getattr(s, "skiff_in_service_since", None))
                       for s in group.instance_states},
            abandoned={i for i in r.launched if i in _ABANDONED},
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
                    _begin_termination(backend, group, iid)
        if r.status in ("Cancelled", "Failed"):
            live = [s for s in group.instance_states if not s.lifecycle_state.startswith("Terminating")]
            surplus = len(live) - (group.desired_capacity or 0)
            newest = sorted(live, key=lambda s: getattr(s, "skiff_launched_at", 0), reverse=True)
            for s in newest[:max(0, surplus)]:
                _begin_termination(backend, group, s.instance.id)


def _alarm_states(backend, names: list[str]) -> dict[str, str]:
    """The CloudWatch state of each named alarm moto knows (SetAlarmState changes it)."""
    if not names:
        return {}
    from moto.cloudwatch.models import cloudwatch_backends

    alarms = cloudwatch_backends[backend.account_id][backend.region_name].alarms
    return {n: alarms[n].state_value for n in names if n in alarms}


def _begin_termination(backend, group, instance_id: str) -> None:
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


def start_instance_refresh(self) -> ActionResult:
    name = self._get_param("AutoScalingGroupName")
    with LOCK:
        backend = self.autoscaling_backend
        tick(backend)
        group = backend.autoscaling_groups.get(name)
        if group is None:
            raise AutoscalingClientError("ValidationError", f"AutoScalingGroup name not found - {name}")
        if any(r.active for r in _refreshes(backend, name)):
            raise AutoscalingClientError(
                "InstanceRefreshInProgress",
                f"An Instance Refresh is already in progress and blocks the execution of this Instance Refresh.")
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
    import datetime

    name = self._get_param("AutoScalingGroupName")
    ids = self._get_param("InstanceRefreshIds") or []
    limit = int(self._get_param("MaxRecords") or 50)
    with LOCK:
        backend = self.autoscaling_backend
        tick(backend)
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
        tick(backend)
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
                _begin_termination(self.autoscaling_backend, self, s.instance.id)
        if self.name in self.autoscaling_backend.autoscaling_groups:
            self.autoscaling_backend.update_attached_elbs(self.name)
            self.autoscaling_backend.update_attached_target_groups(self.name)

    asg_models.FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity


# --- 5. ELB health checks -------------------------------------------------------------------
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


def _apply_elb_health(backend, group, now: float) -> None:
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
        _begin_termination(backend, group, iid)
        group.set_desired_capacity(group.desired_capacity)


# Calls per caller (access key id) and action, refused ones too: a test that runs a tool under a
# key of its own reads back what it asked (GET /skiff-emulator/calls?key=...).
CALLS: collections.Counter = collections.Counter()


def _count(resp) -> None:
    auth = resp.headers.get("Authorization", "") if resp.headers else ""
    key = auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""
    try:
        action = resp._get_action()
    except Exception:
        action = "?"
    with LOCK:
        CALLS[(key, f"{resp.service_name}:{action}")] += 1


def calls(key: str) -> dict[str, int]:
    with LOCK:
        return {a: n for (k, a), n in sorted(CALLS.items()) if k == key}


def _patch_call_counting() -> None:
    from moto.core.responses import BaseResponse

    original = BaseResponse.call_action

    def call_action(self):
        _count(self)
        return original(self)

    BaseResponse.call_action = call_action


def _patch_ec2_limits() -> None:
    """Every EC2 request first passes AWS's request limits (limits.py): one over them is answered
    with AWS's error, never by moto."""
    from moto.ec2.responses import EC2Response

    original = EC2Response.call_action

    def call_action(self):
        refused = limits.ec2_filter_limit(self.querystring)
        if refused is None:
            return original(self)
        _count(self)
        err = ProtocolError("ec2", refused[0], refused[1], status=400)
        status, headers, body = self._transform_response(
            self.response_headers, (err.description, {"status": err.code}))
        headers, body = self._enrich_response(headers, body)
        return status, headers, body

    EC2Response.call_action = call_action


def _patch_autoscaling_responses() -> None:
    for fn in (complete_lifecycle_action, record_lifecycle_action_heartbeat,
               start_instance_refresh, describe_instance_refreshes, cancel_instance_refresh):
        setattr(AutoScalingResponse, fn.__name__, fn)
    # Every Auto Scaling request first applies what time decided (hook timeouts, refresh steps).
    original = AutoScalingResponse.call_action

    def call_action(self):
        with LOCK:
            try:
                tick(self.autoscaling_backend)
            except Exception:  # never fail a request because of bookkeeping
                import traceback
                traceback.print_exc()
            return original(self)

    AutoScalingResponse.call_action = call_action


# --- entry points ---------------------------------------------------------------------------

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


def apply() -> None:
    _patch_call_counting()  # first: the other patches of call_action wrap the counting one
    ActionAuthenticatorMixin._authenticate_and_authorize_normal_action = _authorize
    _patch_template_url()
    _patch_change_set_outputs()
    _patch_role_cfn()
    _patch_group_cfn()
    _patch_lifecycle()
    _patch_capacity()
    _patch_target_health()
    _patch_autoscaling_responses()
    _patch_ec2_limits()


def bootstrap_admin(account_id: str, user: str = "skiff-ci-admin") -> dict:
    """An administrator created inside the process before it serves (no unauthenticated
    window): tests use it to create stacks and users."""
    backend = iam_backends[account_id]["aws"]
    backend.create_user(region_name="us-east-1", user_name=user)
    backend.put_user_policy(user, "admin", '{"Version": "2012-10-17", "Statement": '
                            '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}')
    key = backend.create_access_key(user)
    return {"user": user, "access_key_id": key.access_key_id,
            "secret_access_key": key.secret_access_key, "account": account_id}


def instance_credentials(account_id: str, region: str, role_arn: str, instance_id: str) -> dict:
    """What EC2 hands an instance through its instance profile: temporary credentials of the
    role. The role's trust policy must name ec2.amazonaws.com, as AWS requires.
    https://docs.aws.amazon.com/IAM/latest/UserGuide/id_roles_use_switch-role-ec2.html"""
    import json as _json

    from moto.sts.models import sts_backends

    iam = iam_backends[account_id][get_partition(region)]
    role = iam.get_role_by_arn(role_arn)
    trust = policy.parse_document(role.assume_role_policy_document)
    ok = any(s.get("Effect") == "Allow" and "sts:AssumeRole" in policy._as_list(s.get("Action"))
             and "ec2.amazonaws.com" in policy._as_list((s.get("Principal") or {}).get("Service"))
             for s in policy._as_list(trust.get("Statement")))
    if not ok:
        raise PermissionError(f"role {role_arn} does not trust ec2.amazonaws.com: {_json.dumps(trust)}")
    sts = sts_backends[account_id][get_partition(region)]
    assumed = sts.assume_role(region_name=region, role_session_name=instance_id, role_arn=role_arn,
                              policy=None, duration=3600, external_id=None)
    return {"AccessKeyId": assumed.access_key_id, "SecretAccessKey": assumed.secret_access_key,
            "Token": assumed.session_token,
            "Expiration": assumed.expiration.strftime("%Y-%m-%dT%H:%M:%SZ")}
