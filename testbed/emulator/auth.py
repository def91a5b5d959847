"""Authorization with resources and conditions (policy.py evaluates), and credentials.

For the actions listed in RESOLVERS the request is authorized against the ARN(s) AWS authorizes it
against, with the condition keys our policies use; every other action keeps moto's own check
(Resource "*"), its denial rendered in the protocol's shape. Every extended check is logged
(AUTH_LOG, GET /skiff-emulator/authorizations). Credentials: the administrator the IAM-enforcing
server starts with, and an instance profile's role credentials as EC2 hands them out.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from moto.autoscaling.models import autoscaling_backends
from moto.cloudformation.models import cloudformation_backends
from moto.core.authorization import ActionAuthenticatorMixin
from moto.core.exceptions import AccessDeniedError, _RESTError
from moto.ec2.models import ec2_backends
from moto.iam import models as iam_models
from moto.iam.access_control import IAMRequest
from moto.iam.models import iam_backends
from moto.utilities.utils import get_partition
from moto import settings

import policy
from errors import denial


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
        if kind == "instance":
            # The instance resource's own key (list_amazonec2.html, resource type instance):
            # what `${ec2:InstanceId}` in a policy names.
            ctx["ec2:InstanceID"] = [rid]
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


# CloudWatch: IAM's prefix is cloudwatch: (moto's own check names the endpoint, monitoring:).
# DescribeAlarms is authorized against each alarm's ARN (resource type alarm,
# arn:...:cloudwatch:<region>:<account>:alarm:<name>); without AlarmNames, against every alarm.
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazoncloudwatch.html
def _cloudwatch(resp, action: str) -> list[policy.Check] | None:
    if action != "DescribeAlarms":
        return None
    names = _param(resp, "AlarmNames", []) or []
    return [policy.Check("cloudwatch:DescribeAlarms", _arn(resp, "cloudwatch", f"alarm:{n}"))
            for n in names] or [policy.Check("cloudwatch:DescribeAlarms", _arn(resp, "cloudwatch", "alarm:*"))]


RESOLVERS: dict[str, Callable] = {
    "ssm": _ssm, "ecr": _ecr, "autoscaling": _autoscaling, "ec2": _ec2,
    "cloudformation": _cloudformation, "secretsmanager": _secretsmanager, "kms": _kms,
    "logs": _logs, "elbv2": _elbv2, "cloudwatch": _cloudwatch,
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
    source = _source_instance(key)
    if source:
        for c in checks:
            c.context = {**c.context, **source}
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



def install() -> None:
    ActionAuthenticatorMixin._authenticate_and_authorize_normal_action = _authorize


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


# Requests signed with an instance's profile credentials carry the instance's ARN as
# ec2:SourceInstanceARN ("the ARN of the instance from which the request originated"; present
# only for the role credentials EC2 delivers to an instance), and ec2:RoleDelivery, the version of
# the metadata service that delivered them: AWS's own policies use it to let an instance act only
# on itself (ArnLike ec2:SourceInstanceARN arn:...:instance/${ec2:InstanceId}, the managed policy
# AWSEC2VssSnapshotPolicy). Keyed by the access key id of the credentials instance_credentials
# handed out; credentials from a plain AssumeRole carry neither key.
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonec2.html
# https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/iam-roles-for-amazon-ec2.html
# https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AWSEC2VssSnapshotPolicy.html
INSTANCE_KEYS: dict[str, dict[str, list[str]]] = {}


def _source_instance(key: Any) -> dict[str, list[str]]:
    access_key = getattr(key, "_access_key_id", None) or getattr(key, "access_key_id", None)
    return INSTANCE_KEYS.get(access_key or "", {})


def instance_credentials(account_id: str, region: str, role_arn: str, instance_id: str) -> dict:
    """What EC2 hands an instance through its instance profile: temporary credentials of the
    role. The role's trust policy must name ec2.amazonaws.com, as AWS requires. Requests signed
    with them carry the instance's ARN (INSTANCE_KEYS).
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
    INSTANCE_KEYS[assumed.access_key_id] = {
        "ec2:SourceInstanceARN": [f"arn:{get_partition(region)}:ec2:{region}:{account_id}:instance/{instance_id}"],
        # IMDSv2 (the launch template requires tokens): 2.0.
        "ec2:RoleDelivery": ["2.0"],
    }
    return {"AccessKeyId": assumed.access_key_id, "SecretAccessKey": assumed.secret_access_key,
            "Token": assumed.session_token,
            "Expiration": assumed.expiration.strftime("%Y-%m-%dT%H:%M:%SZ")}
