#!/usr/bin/env python3
"""Permissions proven by running: the agent and ctl under the policies the stack itself creates.

Runs against skiff's IAM-enforcing emulator (testbed/emulator, 127.0.0.1:5056; setup.sh starts it)
with the real Docker engine and the real agent and ctl binaries. As the emulator's administrator
it creates two app stacks from templates/app.yaml (environments A and B), then:

  * scope: stack A's instance role (credentials as EC2 hands them out) reads its own release,
    but not stack B's release or env parameters, nor anything outside /skiff/<A>/;
  * agent: the real agent runs with those credentials served through a fake IMDSv2 and the
    config rendered from A's launch-template user data: release read, env path read, ECR token
    and pull, instance tagged skiff:release, launch hook completed, and after the test asks
    Auto Scaling to terminate the instance, terminate hook completed after draining. Any
    AccessDenied in its log fails the check and names the action;
  * ctl: an IAM user with the stack's DeployerPolicy (output DeployerPolicyArn) runs
    `ctl release`, `status`, `history`, `rollback` against stack A; the test stands in for the
    agents of the replacement instances (it completes their lifecycle hooks as administrator).
  * ctl in place (issue 13): `ctl release --strategy in-place` under the same policy tags
    skiff:pull/skiff:target on the group's instance (a stand-in agent answers as administrator);
    the deployer may tag no other key, and no instance outside the group.
  * trusted keys (issue 20): stack B names two keys (TrustedKeys); B's instance role reads
    /skiff/<B>/trusted-keys, A's does not; a user with B's DeployerPolicy reads it but can
    neither PutParameter nor DeleteParameter it, nor UpdateStack B to change TrustedKeys.
  * only itself (issue 18, finding 6): with two instances in A's group, each instance's
    credentials tag that instance, and are denied tagging its peer.

Prints one line per check and 'N passed, N failed'; exits 1 on any failure. Everything it
creates carries a fresh run id and is removed at the end (containers and images skiff-it-*).
Environment: EMULATOR_IAM_ENDPOINT (default http://127.0.0.1:5056), SKIFF_CI_HOME,
AGENT_BIN / CTL_BIN (default $CARGO_TARGET_DIR/debug/{agent,ctl}), ECR_REGISTRY (default
123456789012.dkr.ecr.us-east-1.amazonaws.com).

Why one file of about 900 lines: it is one story, told in the order above, on one World (two
stacks, their users, keys and a cleanup list) that main builds once; every part reads the World
and the parts before it left behind (the stacks' outputs, the pushed image, the instance's
tags). What other tests share lives in testbed/kit (checks, waits, the IMDSv2 stand-in, the
user-data runner, the emulator's sessions).
"""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
import uuid

import botocore.config
import botocore.exceptions

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "templates"))
sys.path.insert(0, os.path.join(ROOT, "testbed"))
from kit import imds as kit_imds  # noqa: E402
from kit import userdata  # noqa: E402
from kit.checks import TALLY, check  # noqa: E402
from kit.emulator import error_code, instance_credentials, session  # noqa: E402
from kit.net import free_port  # noqa: E402
from kit.waits import wait_until  # noqa: E402
from test_stacks import load_template, outputs, params  # noqa: E402  (pure helpers)

ENDPOINT = os.environ.get("EMULATOR_IAM_ENDPOINT", "http://127.0.0.1:5056")
CI_HOME = os.environ.get("SKIFF_CI_HOME", "/var/lib/skiff-ci")
TARGET = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/skiff-target")
AGENT = os.environ.get("AGENT_BIN", os.path.join(TARGET, "debug", "agent"))
CTL = os.environ.get("CTL_BIN", os.path.join(TARGET, "debug", "ctl"))
REGION = "us-east-1"
ECR = os.environ.get("ECR_REGISTRY", f"123456789012.dkr.ecr.{REGION}.amazonaws.com")
RUN = uuid.uuid4().hex[:8]
NO_RETRY = botocore.config.Config(retries={"max_attempts": 1})

def access_denials(text):
    """(action, resource) of every AccessDenied the emulator reported in a log."""
    return sorted(set(re.findall(r"not authorized to perform: ([\w:-]+)(?: on resource: ([^\s\"\\]+))?", text)))


# --- the administrator and the stacks -------------------------------------------------------

def admin_session():
    path = os.path.join(CI_HOME, "emulator-iam-admin.json")
    with open(path) as f:
        a = json.load(f)
    return session(a["access_key_id"], a["secret_access_key"])


def emulator_credentials(role_arn, instance_id):
    return instance_credentials(ENDPOINT, role_arn, instance_id, REGION)


class World:
    def __init__(self, admin):
        self.s = admin
        c = lambda svc: admin.client(svc, endpoint_url=ENDPOINT)  # noqa: E731
        self.cfn, self.ec2, self.acm, self.ssm, self.asg, self.iam, self.sm, self.ecr = (
            c(x) for x in ("cloudformation", "ec2", "acm", "ssm", "autoscaling", "iam",
                           "secretsmanager", "ecr"))
        self.cleanup = []
        self.secrets = {}

    def key(self):
        kms = self.s.client("kms", endpoint_url=ENDPOINT)
        self.kms_key = kms.create_key(Description=f"skiff-it {RUN}")["KeyMetadata"]["KeyId"]
        self.cleanup.append(lambda: kms.schedule_key_deletion(KeyId=self.kms_key, PendingWindowInDays=7))

    def network(self):
        vpc = self.ec2.create_vpc(CidrBlock="10.88.0.0/16")["Vpc"]["VpcId"]
        self.cleanup.append(lambda: self.ec2.delete_vpc(VpcId=vpc))
        subnets = []
        for i, zone in enumerate("abab"):
            sid = self.ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.88.{i}.0/24",
                                         AvailabilityZone=REGION + zone)["Subnet"]["SubnetId"]
            subnets.append(sid)
            self.cleanup.append(lambda sid=sid: self.ec2.delete_subnet(SubnetId=sid))
        cert = self.acm.request_certificate(DomainName=f"p{RUN}.skiff.example.com")["CertificateArn"]
        self.cleanup.append(lambda: self.acm.delete_certificate(CertificateArn=cert))
        ami = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        return vpc, subnets[:2], subnets[2:], cert, ami

    def stack(self, env, text, t, net, tag, app_port, agent_port, **extra):
        vpc, public, private, cert, ami = net
        declared = t["Parameters"]
        p = {"Environment": env, "VpcId": vpc, "PublicSubnetIds": ",".join(public),
             "PrivateSubnetIds": ",".join(private), "CertificateArn": cert, "AmiId": ami,
             "InitialTag": tag, "AppPort": app_port, "AgentPort": agent_port, "DrainSeconds": 2,
             "MinSize": 1, "MaxSize": 2, "StopTimeoutSeconds": 5,
             # The agent runs here in the machine's own network namespace: a handover would
             # redirect its port there. IAM is what this test checks; the box tests handover.
             "SwapMode": "drain", **extra}
        if "DatabaseHost" in declared:
            # An existing database (no RDS instance in the emulator); its secret is real.
            secret = self.sm.create_secret(Name=f"skiff-it-{env}-db",
                                           SecretString='{"username":"skiff"}')["ARN"]
            self.cleanup.append(lambda: self.sm.delete_secret(SecretId=secret,
                                                              ForceDeleteWithoutRecovery=True))
            p.update(DatabaseHost="db.example.internal", DatabaseSecretArn=secret)
            self.secrets[env] = secret
        p = {k: v for k, v in p.items() if k in declared}
        release = f"/skiff/{env}/release"
        if "ReleaseParameter" not in t["Resources"]:
            # Created once before the stack (make create-stack), owned by ctl afterwards.
            self.ssm.put_parameter(Name=release, Value=tag, Type="String")
            self.cleanup.append(lambda: self.ssm.delete_parameter(Name=release))
        name = f"skiff-it-perm-{env}"
        self.cfn.create_stack(StackName=name, TemplateBody=text, Parameters=params(p),
                              Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"])
        self.cleanup.append(lambda: self.cfn.delete_stack(StackName=name))
        stack = wait_until(lambda: (lambda s: s if not s["StackStatus"].endswith("_IN_PROGRESS") else None)(
            self.cfn.describe_stacks(StackName=name)["Stacks"][0]), 120)
        return name, stack

    def physical_ids(self, stack_name):
        return {r["LogicalResourceId"]: r.get("PhysicalResourceId") for r in
                self.cfn.describe_stack_resources(StackName=stack_name)["StackResources"]
                if "LogicalResourceId" in r}

    def user_with(self, user, policy_arn):
        """An IAM user holding one managed policy (a stack's DeployerPolicy), removed at the end;
        returns its access key."""
        self.iam.create_user(UserName=user)
        self.iam.attach_user_policy(UserName=user, PolicyArn=policy_arn)
        key = self.iam.create_access_key(UserName=user)["AccessKey"]

        def cleanup_user():
            self.iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
            self.iam.detach_user_policy(UserName=user, PolicyArn=policy_arn)
            self.iam.delete_user(UserName=user)
        self.cleanup.append(cleanup_user)
        return key

    def group_instances(self, group):
        g = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
        return {i["InstanceId"]: i["LifecycleState"] for i in (g[0]["Instances"] if g else [])}


# --- a fake IMDSv2 serving the instance's identity, role credentials and lifecycle state -----

class Imds:
    """The kit's IMDSv2 for one instance on a port of its own, its tags live from EC2 (the agent
    reads skiff:target and skiff:pull every turn); `seen` lists the requests."""

    def __init__(self, world, instance_id, group, role_name, role_arn):
        self.seen = []

        def tags():
            found = world.ec2.describe_tags(
                Filters=[{"Name": "resource-id", "Values": [instance_id]}])["Tags"]
            return dict({t["Key"]: t["Value"] for t in found}, **{"aws:autoscaling:groupName": group})

        instance = kit_imds.Instance(
            id=instance_id, role=role_name, creds=emulator_credentials(role_arn, instance_id),
            tags=tags, lifecycle_state=lambda: world.group_instances(group).get(instance_id),
            region=REGION)
        self.server = kit_imds.Server(("127.0.0.1", 0), lambda _address: instance, self.seen)
        self.url = self.server.url

    def close(self):
        self.server.close()


def render_config(user_data_b64, tmp, app_name, env=None):
    """Run the launch template's user data with /etc/skiff and systemctl redirected (the kit's
    userdata.py); the container name gets this run's skiff-it- prefix."""
    path = userdata.run_user_data(user_data_b64, tmp, env)
    with open(path) as f:
        text = f.read()
    text = re.sub(r'(?m)^name = "[^"]*"', f'name = "{app_name}"', text, count=1)
    with open(path, "w") as f:
        f.write(text)
    return path, text


def docker(*args, check_rc=True):
    p = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check_rc and p.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {p.stderr.strip()}")
    return p


def push_app_image(world, repo, tag, tmp):
    """A tiny app (busybox httpd, /health 200) pushed to the ECR-shaped registry as repo:tag,
    logged in with the token moto's ECR hands out; removed from the host afterwards."""
    token = world.ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    user, password = base64.b64decode(token).decode().split(":", 1)
    ctx = os.path.join(tmp, "image")
    os.makedirs(ctx, exist_ok=True)
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write("FROM skiff-ci/busybox:1\nRUN mkdir -p /www && echo ok > /www/health\n"
                'CMD ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]\n')
    ref = f"{ECR}/{repo}:{tag}"
    config = os.path.join(tmp, "docker-config")
    os.makedirs(config, exist_ok=True)
    env = dict(os.environ, DOCKER_CONFIG=config, DOCKER_BUILDKIT="0")
    subprocess.run(["docker", "build", "-q", "-t", ref, ctx], check=True, capture_output=True, env=env)
    try:
        login = subprocess.run(["docker", "login", "-u", user, "--password-stdin", ECR], input=password,
                               capture_output=True, text=True, env=env)
        if login.returncode != 0:
            raise RuntimeError(f"docker login {ECR}: {login.stderr.strip()}")
        push = subprocess.run(["docker", "push", ref], capture_output=True, text=True, env=env)
        if push.returncode != 0:
            raise RuntimeError(f"docker push {ref}: {push.stderr.strip()}")
    finally:
        docker("rmi", ref, check_rc=False)  # only the registry keeps it: the agent must pull
    return ref


# --- the checks -----------------------------------------------------------------------------

def scope_checks(world, role_session, env_a, env_b):
    ssm = role_session.client("ssm", endpoint_url=ENDPOINT, config=NO_RETRY)
    put = world.ssm.put_parameter
    put(Name=f"/skiff/{env_b}/env/SECRET", Value="b-secret", Type="SecureString")
    world.cleanup.append(lambda: world.ssm.delete_parameter(Name=f"/skiff/{env_b}/env/SECRET"))
    put(Name=f"/skiff-it/{RUN}/outside", Value="x", Type="String")
    world.cleanup.append(lambda: world.ssm.delete_parameter(Name=f"/skiff-it/{RUN}/outside"))
    check("scope: A's role reads A's release",
          error_code(lambda: ssm.get_parameter(Name=f"/skiff/{env_a}/release")) is None)
    for what, call in [
        ("B's release", lambda: ssm.get_parameter(Name=f"/skiff/{env_b}/release")),
        ("B's env parameter", lambda: ssm.get_parameter(Name=f"/skiff/{env_b}/env/SECRET", WithDecryption=True)),
        ("B's env path", lambda: ssm.get_parameters_by_path(Path=f"/skiff/{env_b}/env/", WithDecryption=True)),
        ("B's release among A's (GetParameters)",
         lambda: ssm.get_parameters(Names=[f"/skiff/{env_a}/release", f"/skiff/{env_b}/release"])),
        ("a parameter outside /skiff/<env>/", lambda: ssm.get_parameter(Name=f"/skiff-it/{RUN}/outside")),
        ("the whole /skiff/ tree", lambda: ssm.get_parameters_by_path(Path="/skiff/", Recursive=True)),
    ]:
        code = error_code(call)
        check(f"scope: A's role cannot read {what}", code in ("AccessDenied", "AccessDeniedException"),
              f"got {code or 'success'}")
    if env_a in world.secrets and env_b in world.secrets:
        # The app reads its database secret with the instance role (host networking).
        sm = role_session.client("secretsmanager", endpoint_url=ENDPOINT, config=NO_RETRY)
        code = error_code(lambda: sm.get_secret_value(SecretId=world.secrets[env_a]))
        check("scope: A's role reads A's database secret", code is None, f"got {code}")
        code = error_code(lambda: sm.get_secret_value(SecretId=world.secrets[env_b]))
        check("scope: A's role cannot read B's database secret",
              code in ("AccessDenied", "AccessDeniedException"), f"got {code or 'success'}")
    # What Docker's awslogs driver does with the instance role: a stream in its own group and
    # events into it; never in another environment's group, never reading logs back.
    logs = role_session.client("logs", endpoint_url=ENDPOINT, config=NO_RETRY)
    stream = f"i-perm{RUN}/v1"
    code = error_code(lambda: logs.create_log_stream(logGroupName=f"/skiff/{env_a}/app", logStreamName=stream))
    check("scope: A's role creates a stream in A's log group", code is None, f"got {code}")
    code = error_code(lambda: logs.put_log_events(
        logGroupName=f"/skiff/{env_a}/app", logStreamName=stream,
        logEvents=[{"timestamp": int(time.time() * 1000), "message": "hello"}]))
    check("scope: A's role puts events into its stream", code is None, f"got {code}")
    for what, call in [
        ("create a stream in B's log group",
         lambda: logs.create_log_stream(logGroupName=f"/skiff/{env_b}/app", logStreamName=stream)),
        ("put events into B's log group", lambda: logs.put_log_events(
            logGroupName=f"/skiff/{env_b}/app", logStreamName=stream,
            logEvents=[{"timestamp": int(time.time() * 1000), "message": "x"}])),
        ("read its own log group back (FilterLogEvents)",
         lambda: logs.filter_log_events(logGroupName=f"/skiff/{env_a}/app")),
    ]:
        code = error_code(call)
        check(f"scope: A's role cannot {what}", code in ("AccessDenied", "AccessDeniedException"),
              f"got {code or 'success'}")
    kms = role_session.client("kms", endpoint_url=ENDPOINT, config=NO_RETRY)
    blob = world.s.client("kms", endpoint_url=ENDPOINT).encrypt(KeyId=world.kms_key, Plaintext=b"x")["CiphertextBlob"]
    code = error_code(lambda: kms.decrypt(CiphertextBlob=blob))
    check("scope: A's role cannot call kms:Decrypt directly (only through SSM)",
          code in ("AccessDenied", "AccessDeniedException"), f"got {code or 'success'}")


def public_key_pem():
    """A fresh ECDSA P-256 public key, PEM (what TrustedKeys takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def trusted_keys_checks(world, name_b, stack_b, env_b, keys, role_session_a):
    """Issue 20: what the hosts trust is the stack's to change, not the deployer's."""
    out = outputs(stack_b)
    name = out.get("TrustedKeysParameter")
    if not check("keys: stack B outputs TrustedKeysParameter /skiff/<B>/trusted-keys",
                 name == f"/skiff/{env_b}/trusted-keys", str(sorted(out))):
        return
    role_b = world.physical_ids(name_b)["InstanceRole"]
    c = emulator_credentials(world.iam.get_role(RoleName=role_b)["Role"]["Arn"],
                             next(iter(world.group_instances(out["AutoScalingGroup"])), "i-keys"))
    ssm_b = session(c["AccessKeyId"], c["SecretAccessKey"], c["Token"]).client(
        "ssm", endpoint_url=ENDPOINT, config=NO_RETRY)
    got = None
    try:
        got = ssm_b.get_parameter(Name=name)["Parameter"]["Value"]
    except botocore.exceptions.ClientError as e:
        got = e.response["Error"]["Code"]
    check("keys: B's instance role reads B's trusted keys", got is not None and got.strip() == keys.strip(),
          str(got)[:200])
    ssm_a = role_session_a.client("ssm", endpoint_url=ENDPOINT, config=NO_RETRY)
    code = error_code(lambda: ssm_a.get_parameter(Name=name))
    check("keys: A's instance role cannot read B's trusted keys",
          code in ("AccessDenied", "AccessDeniedException"), f"got {code or 'success'}")
    code = error_code(lambda: ssm_b.put_parameter(Name=name, Value=public_key_pem(), Type="String", Overwrite=True))
    check("keys: B's instance role cannot write them", code in ("AccessDenied", "AccessDeniedException"),
          f"got {code or 'success'}")

    key = world.user_with(f"skiff-it-deployer-b-{RUN}", out["DeployerPolicyArn"])
    deployer = session(key["AccessKeyId"], key["SecretAccessKey"])
    ssm, cfn = (deployer.client(x, endpoint_url=ENDPOINT, config=NO_RETRY) for x in ("ssm", "cloudformation"))
    code = error_code(lambda: ssm.get_parameter(Name=name))
    check("keys: B's deployer reads the trusted keys (ctl checks signatures with them)", code is None,
          f"got {code}")
    mine = public_key_pem()
    for what, call in [
        ("PutParameter (overwrite with its own key)",
         lambda: ssm.put_parameter(Name=name, Value=mine, Type="String", Overwrite=True)),
        ("DeleteParameter", lambda: ssm.delete_parameter(Name=name)),
        ("DeleteParameters", lambda: ssm.delete_parameters(Names=[name])),
        ("UpdateStack with its own TrustedKeys", lambda: cfn.update_stack(
            StackName=name_b, UsePreviousTemplate=True, Capabilities=["CAPABILITY_IAM"],
            Parameters=[{"ParameterKey": "TrustedKeys", "ParameterValue": mine}]
            + [{"ParameterKey": p["ParameterKey"], "UsePreviousValue": True}
               for p in stack_b.get("Parameters", []) if p["ParameterKey"] != "TrustedKeys"])),
        ("CreateChangeSet with its own TrustedKeys", lambda: cfn.create_change_set(
            StackName=name_b, ChangeSetName=f"keys{RUN}", UsePreviousTemplate=True,
            Parameters=[{"ParameterKey": "TrustedKeys", "ParameterValue": mine}])),
    ]:
        code = error_code(call)
        check(f"keys: B's deployer cannot {what}", code in ("AccessDenied", "AccessDeniedException"),
              f"got {code or 'success'}")
    kept = world.ssm.get_parameter(Name=name)["Parameter"]["Value"]
    check("keys: the trusted keys are unchanged", kept.strip() == keys.strip(), kept[:200])


def self_tagging_checks(world, group, role_arn):
    """Issue 18, finding 6: with two instances in the group, each one's profile credentials tag
    that instance (TagOwnInstanceWithRelease) and are denied tagging its peer. What AWS cannot
    limit (CompleteLifecycleAction is authorized against the group) is printed, not checked."""
    world.asg.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=2)
    if not check("self: the group has two instances",
                 wait_until(lambda: len(world.group_instances(group)) == 2, 30), str(world.group_instances(group))):
        return
    ids = sorted(world.group_instances(group))
    clients = {}
    for iid in ids:
        c = emulator_credentials(role_arn, iid)
        clients[iid] = session(c["AccessKeyId"], c["SecretAccessKey"], c["Token"]).client(
            "ec2", endpoint_url=ENDPOINT, config=NO_RETRY)
    me, peer = ids

    def tag(client, targets, key="skiff:release"):
        return error_code(lambda: client.create_tags(Resources=targets, Tags=[{"Key": key, "Value": f"self{RUN}"}]))

    for who, target in ((me, me), (peer, peer)):
        for key in ("skiff:release", "skiff:pulled", "skiff:failed"):
            code = tag(clients[who], [target], key)
            check(f"self: an instance tags itself {key}", code is None, f"{who}: got {code}")
    for what, client, targets in [("its peer", clients[me], [peer]), ("its peer (the other way)", clients[peer], [me]),
                                  ("itself and its peer in one request", clients[me], [me, peer])]:
        code = tag(client, targets)
        check(f"self: an instance is denied tagging {what}", code == "UnauthorizedOperation",
              f"got {code or 'success'}")
    seen = {t["ResourceId"]: t["Value"] for t in world.ec2.describe_tags(
        Filters=[{"Name": "resource-id", "Values": ids}, {"Name": "key", "Values": ["skiff:failed"]}])["Tags"]}
    check("self: each instance's skiff:failed is its own answer", sorted(seen) == ids, str(seen))
    print("info instance role: autoscaling:CompleteLifecycleAction is authorized against the group, with no "
          "condition key naming the instance: any instance of the group can complete a peer's hook (documented "
          "in templates/app.yaml, AnswerOwnLifecycleHooks)")


def agent_checks(world, stack_a, env_a, role_name, role_arn, tag, tmp):
    out = outputs(stack_a)
    group = out["AutoScalingGroup"]
    instances = world.group_instances(group)
    check("agent: the group's first instance waits in Pending:Wait for the launch hook",
          list(instances.values()) == ["Pending:Wait"], str(instances))
    instance_id = next(iter(instances))
    ids = world.physical_ids(stack_a["StackName"])
    lt = world.ec2.describe_launch_template_versions(LaunchTemplateId=ids["LaunchTemplate"])
    user_data = max(lt["LaunchTemplateVersions"], key=lambda v: v["VersionNumber"])["LaunchTemplateData"]["UserData"]
    app_name = f"skiff-it-perm-{RUN}"
    # The user data asks IMDSv2 for the instance id that names the app's log streams.
    imds = Imds(world, instance_id, group, role_name, role_arn)
    config, text = render_config(user_data, tmp, app_name, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
    check("agent: the user data names the log streams by the instance id from IMDSv2 ([logs] instance)",
          f'instance = "{instance_id}"' in text and f'group = "/skiff/{env_a}/app"' in text,
          text[text.find("[logs]"):])
    image = re.search(r'(?m)^image = "([^"]+)"', text).group(1)
    drain = int(re.search(r'(?m)^drain = "(\d+)s"', text).group(1))
    repo = image.split("/", 1)[1]

    world.ssm.put_parameter(Name=f"/skiff/{env_a}/env/GREETING", Value="hello", Type="String")
    # A customer managed key: SSM decrypts with the caller's kms:Decrypt (via SSM).
    world.ssm.put_parameter(Name=f"/skiff/{env_a}/env/TOKEN", Value="s3cret", Type="SecureString",
                            KeyId=world.kms_key)
    for n in ("GREETING", "TOKEN"):
        world.cleanup.append(lambda n=n: world.ssm.delete_parameter(Name=f"/skiff/{env_a}/env/{n}"))
    try:
        push_app_image(world, repo, tag, tmp)
    except Exception as e:
        check(f"agent: app image pushed to the ECR-shaped registry {ECR}", False,
              f"{e} (setup.sh's ECR registry block missing?)")
        imds.close()
        return
    world.cleanup.append(lambda: docker("rmi", "-f", f"{image}:{tag}", check_rc=False))

    env = {"PATH": os.environ["PATH"], "HOME": tmp, "AWS_ENDPOINT_URL": ENDPOINT,
           "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url, "RUST_LOG": "info,skiff_agent=debug",
           "AWS_CONFIG_FILE": os.path.join(tmp, "none"), "AWS_SHARED_CREDENTIALS_FILE": os.path.join(tmp, "none")}
    if os.environ.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
    log_path = os.path.join(tmp, "agent.log")
    log = open(log_path, "w")
    agent = subprocess.Popen([AGENT, "run", "--config", config], env=env, stdout=log, stderr=log)
    world.cleanup.append(lambda: [c and docker("rm", "-f", c, check_rc=False) for c in
                                  docker("ps", "-aq", "--filter", f"name={app_name}").stdout.split()])
    try:
        in_service = wait_until(lambda: world.group_instances(group).get(instance_id) == "InService", 90)
        check("agent: launch hook completed under the instance role (instance InService)", in_service,
              f"state {world.group_instances(group).get(instance_id)}")
        tags = world.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]},
                                                {"Name": "key", "Values": ["skiff:release"]}])["Tags"]
        check("agent: instance tagged skiff:release=<tag>", [t["Value"] for t in tags] == [tag], str(tags))
        # An in-place rollout's pull instruction (issue 13), read from the instance tags in IMDS,
        # is answered skiff:pulled under the instance role (TagOwnInstanceWithRelease's keys).
        world.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "skiff:pull", "Value": tag}])

        def pulled():
            return [t["Value"] for t in world.ec2.describe_tags(
                Filters=[{"Name": "resource-id", "Values": [instance_id]},
                         {"Name": "key", "Values": ["skiff:pulled"]}])["Tags"]]
        check("agent: a pull instruction (skiff:pull) answered skiff:pulled under the instance role",
              wait_until(lambda: pulled() == [tag], 30), str(pulled()))
        running = docker("ps", "--filter", f"name={app_name}", "--format", "{{.Names}}").stdout.split()
        check("agent: the release's container runs", len(running) == 1, str(running))
        if running:
            env_out = docker("exec", running[0], "env").stdout
            check("agent: env path read (GREETING and decrypted TOKEN in the container)",
                  "GREETING=hello" in env_out and "TOKEN=s3cret" in env_out)
        world.asg.terminate_instance_in_auto_scaling_group(InstanceId=instance_id,
                                                           ShouldDecrementDesiredCapacity=True)
        check("agent: termination waits in Terminating:Wait for the terminate hook",
              (world.group_instances(group).get(instance_id) or "").startswith("Terminating"),
              str(world.group_instances(group)))
        asked = time.monotonic()
        gone = wait_until(lambda: instance_id not in world.group_instances(group), 60, 0.2)
        took = time.monotonic() - asked
        check("agent: terminate hook completed after draining (instance left the group)", gone,
              str(world.group_instances(group)))
        check(f"agent: the terminate hook waited for the drain ({drain} s; took {took:.1f} s)",
              gone and took >= drain, f"{took:.1f} s")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
        imds.close()
    with open(log_path) as f:
        text = f.read()
    denials = access_denials(text)
    check("agent: no AccessDenied in the agent's log", not denials,
          "; ".join(f"{a} on {r or '?'}" for a, r in denials))
    check("agent: credentials came from IMDSv2 (token first, then the role)",
          imds.seen[:1] == ["PUT /latest/api/token"]
          and any(s.endswith(f"security-credentials/{role_name}") for s in imds.seen), str(imds.seen[:6]))
    usage_report(world, "instance role", f"assumed-role/{role_name}/", role_documents(world, role_name))
    if TALLY.failed:
        print("--- agent log (last 40 lines)\n" + "\n".join(text.splitlines()[-40:]) + "\n---")


def usage_report(world, who, principal, documents):
    """Print (not check) which statements of `documents` allowed what `principal` did, and the
    ones it never needed in this run: candidates for excess, or paths the run did not take."""
    sys.path.insert(0, os.path.join(ROOT, "testbed", "emulator"))
    import policy as emulator_policy

    with urllib.request.urlopen(f"{ENDPOINT}/skiff-emulator/authorizations?principal="
                                + urllib.parse.quote(principal), timeout=10) as r:
        log = json.load(r)
    used = {}
    for entry in log:
        if entry["allowed"]:
            for c, sid in zip(entry["checks"], entry["allowed_by"], strict=False):
                used.setdefault(sid, set()).add(c["action"])
    stmts = emulator_policy.statements(documents)
    sids = [str(st.get("Sid") or f"#{i}") for i, st in enumerate(stmts)]
    for sid, st in zip(sids, stmts, strict=True):
        if sid in used:
            granted = st.get("Action", [])
            granted = [granted] if isinstance(granted, str) else granted
            idle = [a for a in granted if not any(emulator_policy._wildcard(a, u, True) for u in used[sid])]
            print(f"info {who}: statement {sid} allowed {', '.join(sorted(used[sid]))}"
                  + (f"; not needed: {', '.join(idle)}" if idle else ""))
    unused = [sid for sid in sids if sid not in used]
    print(f"info {who}: statements not needed in this run: {', '.join(unused) or 'none'}")


def role_documents(world, role_name):
    docs = [world.iam.get_role_policy(RoleName=role_name, PolicyName=n)["PolicyDocument"]
            for n in world.iam.list_role_policies(RoleName=role_name)["PolicyNames"]]
    for a in world.iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        docs.append(managed_document(world, a["PolicyArn"]))
    return docs


def managed_document(world, arn):
    version = world.iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    return world.iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"]


class HookAnswerer:
    """Stands in for the agents of instances ctl's refresh launches and terminates."""

    def __init__(self, world, group):
        self.world, self.group, self.stop = world, group, threading.Event()
        self.silent_until_cancelled = threading.Event()  # agents that never get healthy
        self.before_silence = self.silenced = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.5):
            try:
                if self.silent_until_cancelled.is_set():
                    # Silent through the first refresh seen, until it ends (ctl's rollback starts
                    # the next one at once).
                    latest = self.world.asg.describe_instance_refreshes(
                        AutoScalingGroupName=self.group)["InstanceRefreshes"][:1]
                    if not latest or latest[0]["InstanceRefreshId"] == self.before_silence:
                        continue  # the silenced release's refresh has not started yet
                    self.silenced = self.silenced or latest[0]["InstanceRefreshId"]
                    if latest[0]["InstanceRefreshId"] == self.silenced and latest[0]["Status"] in (
                            "Pending", "InProgress"):
                        continue
                    self.silent_until_cancelled.clear()
                for iid, state in self.world.group_instances(self.group).items():
                    hook = {"Pending:Wait": "skiff-launch", "Terminating:Wait": "skiff-terminate"}.get(state)
                    if hook:
                        self.world.asg.complete_lifecycle_action(
                            AutoScalingGroupName=self.group, LifecycleHookName=hook,
                            InstanceId=iid, LifecycleActionResult="CONTINUE")
            except botocore.exceptions.ClientError:
                pass

    def silence_next_refresh(self):
        """Leave the next refresh's new instances unanswered until that refresh ends."""
        latest = self.world.asg.describe_instance_refreshes(
            AutoScalingGroupName=self.group)["InstanceRefreshes"][:1]
        self.before_silence = latest[0]["InstanceRefreshId"] if latest else None
        self.silenced = None
        self.silent_until_cancelled.set()

    def close(self):
        self.stop.set()
        self.thread.join(5)


def ctl_checks(world, stack_a, tags, tmp):
    out = outputs(stack_a)
    arn = out.get("DeployerPolicyArn")
    if not check("ctl: the stack outputs DeployerPolicyArn", bool(arn), f"outputs: {sorted(out)}"):
        return
    user = f"skiff-it-deployer-{RUN}"
    key = world.user_with(user, arn)
    env = {"PATH": os.environ["PATH"], "HOME": tmp, "AWS_ENDPOINT_URL": ENDPOINT,
           "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
           "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true", "BUILD_USER": "permissions-test",
           "AWS_CONFIG_FILE": os.path.join(tmp, "none"), "AWS_SHARED_CREDENTIALS_FILE": os.path.join(tmp, "none"),
           # The ECR-shaped registry's test CA (setup.sh); ctl logs in with the ECR token the
           # deployer policy lets it fetch, never with `docker login` state (HOME is empty).
           "SKIFF_REGISTRY_CA": os.path.join(CI_HOME, "registry-ecr", "ca.crt")}
    stack = stack_a["StackName"]
    bad = f"bad{RUN}"
    repo = out["ImageRepository"].split("/", 1)[1]
    for t in (tags[1], bad):  # tags[0] was pushed by the agent checks
        push_app_image(world, repo, t, tmp)
    group = out["AutoScalingGroup"]
    answerer = HookAnswerer(world, group)
    try:
        # The agent check terminated the group's instance: one again, so that the refreshes
        # replace a real instance and status has one to show.
        world.asg.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=1)
        check("ctl: the group serves one instance again before the release",
              wait_until(lambda: list(world.group_instances(group).values()) == ["InService"], 30),
              str(world.group_instances(group)))
        before = set(world.group_instances(group))
        for name, args in [
            # No --skip-verify: the digest is pinned through the ECR-shaped registry with a token
            # from GetAuthorizationToken, under the deployer policy.
            # --alarm-window 5s: the stack's alarms get the time they need in production (4m
            # bake, ctl's default); here IAM is checked, not alarm timing.
            ("release", ["release", "--tag", tags[1], "--warmup", "1s", "--timeout", "90s", "--alarm-window", "5s"]),
            ("status", ["status"]),
            ("history", ["history"]),
            # FilterLogEvents on the stack's group; with --instance also DescribeLogStreams.
            ("logs", ["logs", "--since", "1h"]),
            ("logs --instance", ["logs", "--instance", f"i-perm{RUN}"]),
            ("rollback", ["rollback", "--warmup", "1s", "--timeout", "90s", "--alarm-window", "5s"]),
        ]:
            p = subprocess.run([CTL, "--stack", stack, *args], env=env, capture_output=True, text=True,
                               timeout=180)
            text = p.stdout + p.stderr
            denials = access_denials(text)
            check(f"ctl {name} under the deployer policy (exit {p.returncode})",
                  p.returncode == 0 and not denials,
                  ("denied: " + "; ".join(f"{a} on {r or '?'}" for a, r in denials) + " | " if denials else "")
                  + text.strip()[-600:])
            if name in ("release", "rollback"):
                want = tags[1] if name == "release" else tags[0]
                value = world.ssm.get_parameter(Name=out["ReleaseParameter"])["Parameter"]["Value"]
                check(f"ctl {name}: the parameter names {want}", want in value, value)
                if name == "release":  # a rollback restores the previous record as it was
                    check("ctl release: the release is pinned to a digest",
                          re.search(r'"digest":\s*"sha256:[0-9a-f]{64}"', value) is not None, value)
                latest = world.asg.describe_instance_refreshes(
                    AutoScalingGroupName=out["AutoScalingGroup"])["InstanceRefreshes"][:1]
                check(f"ctl {name}: its instance refresh ran to Successful",
                      [r["Status"] for r in latest] == ["Successful"], str(latest))
                now = set(world.group_instances(group))
                check(f"ctl {name}: the refresh replaced the instance", now and not (now & before),
                      f"before {sorted(before)}, after {sorted(now)}")
                before = now
        # A release whose instances never become healthy: ctl cancels the refresh at its
        # timeout and rolls back (exit 1), also under the deployer policy.
        answerer.silence_next_refresh()
        p = subprocess.run([CTL, "--stack", stack, "release", "--tag", bad,
                            "--warmup", "1s", "--timeout", "8s", "--alarm-window", "5s"], env=env, capture_output=True,
                           text=True, timeout=180)
        text = p.stdout + p.stderr
        denials = access_denials(text)
        check(f"ctl release that times out is cancelled and rolled back (exit {p.returncode}, want 1)",
              p.returncode == 1 and not denials,
              ("denied: " + "; ".join(f"{a} on {r or '?'}" for a, r in denials) + " | " if denials else "")
              + text.strip()[-600:])
        value = world.ssm.get_parameter(Name=out["ReleaseParameter"])["Parameter"]["Value"]
        check("ctl: after the rollback the parameter names the previous release", tags[0] in value, value)
        check("ctl: after the rollback the group is back to one instance in service",
              wait_until(lambda: list(world.group_instances(group).values()) == ["InService"], 15),
              str(world.group_instances(group)))
        inplace_checks(world, stack, group, env, key, tags)
    finally:
        answerer.close()
    status_target_health_checks(world, stack, group, env, managed_document(world, arn))
    usage_report(world, "deployer policy", f":user/{user}", [managed_document(world, arn)])


def inplace_checks(world, stack, group, env, key, tags):
    """ctl release --strategy in-place (issue 13) under the deployer policy: ctl tags skiff:pull
    and skiff:target on the group's instances (statement SteerOwnInstances) and reads the answers,
    which a stand-in agent writes here as the administrator. The deployer may tag no other key,
    and no instance outside the group."""
    stop = threading.Event()

    def agent():
        while not stop.wait(0.3):
            try:
                ids = list(world.group_instances(group))
                if not ids:
                    continue
                seen = {}
                for t in world.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": ids}])["Tags"]:
                    seen.setdefault(t["ResourceId"], {})[t["Key"]] = t["Value"]
                for iid, kv in seen.items():
                    answer = []
                    if "skiff:pull" in kv and kv.get("skiff:pulled") != kv["skiff:pull"]:
                        answer.append({"Key": "skiff:pulled", "Value": kv["skiff:pull"]})
                    want = kv.get("skiff:target", "").split("@")[0]
                    if want and kv.get("skiff:release") != want:
                        answer.append({"Key": "skiff:release", "Value": want})
                    if answer:
                        world.ec2.create_tags(Resources=[iid], Tags=answer)
            except botocore.exceptions.ClientError:
                pass

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    try:
        p = subprocess.run([CTL, "--stack", stack, "release", "--tag", tags[1], "--strategy", "in-place",
                            "--pull-timeout", "60s", "--batch-timeout", "60s", "--alarm-window", "5s",
                            # One instance swapped by drain: ctl refuses that unless told.
                            "--accept-downtime"], env=env,
                           capture_output=True, text=True, timeout=180)
        text = p.stdout + p.stderr
        denials = access_denials(text)
        check(f"ctl release --strategy in-place under the deployer policy (exit {p.returncode})",
              p.returncode == 0 and not denials and "in place" in p.stdout,
              ("denied: " + "; ".join(f"{a} on {r or '?'}" for a, r in denials) + " | " if denials else "")
              + text.strip()[-600:])
        ids = list(world.group_instances(group))
        told = {t["ResourceId"]: t["Value"] for t in world.ec2.describe_tags(
            Filters=[{"Name": "resource-id", "Values": ids}, {"Name": "key", "Values": ["skiff:target"]}])["Tags"]}
        check("ctl in place: every instance of the group is told the release (skiff:target)",
              ids and all(told.get(i, "").split("@")[0] == tags[1] for i in ids), str(told))
    finally:
        stop.set()
        thread.join(5)
    ec2 = session(key["AccessKeyId"], key["SecretAccessKey"]).client("ec2", endpoint_url=ENDPOINT)
    ids = list(world.group_instances(group))
    if ids:
        check("deployer: may not tag another key on the group's instances",
              error_code(lambda: ec2.create_tags(Resources=ids[:1], Tags=[{"Key": "Name", "Value": "x"}])) is not None)
    ami = world.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    outside = world.ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    try:
        check("deployer: may not tag skiff:target on an instance outside the group",
              error_code(lambda: ec2.create_tags(Resources=[outside],
                                             Tags=[{"Key": "skiff:target", "Value": tags[1]}])) is not None)
    finally:
        world.ec2.terminate_instances(InstanceIds=[outside])


def status_target_health_checks(world, stack, group, env, deployer_doc):
    """ctl status reads target health (elasticloadbalancing:DescribeTargetHealth, ReadTargetHealth);
    without that statement it still shows each instance's release, with a note, exit 0."""
    p = subprocess.run([CTL, "--json", "--stack", stack, "status"], env=env, capture_output=True,
                       text=True, timeout=60)
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        doc = {}
    instances = doc.get("instances", [])
    check("ctl status under the deployer policy: each instance with its target health",
          p.returncode == 0 and instances and all(i.get("target_health") for i in instances)
          and doc.get("target_health_error") is None, (p.stdout + p.stderr)[-600:])
    if isinstance(deployer_doc, str):
        deployer_doc = json.loads(urllib.parse.unquote(deployer_doc))
    without = dict(deployer_doc, Statement=[st for st in deployer_doc["Statement"]
                                            if st.get("Sid") != "ReadTargetHealth"])
    user = f"skiff-it-no-elb-{RUN}"
    world.iam.create_user(UserName=user)
    world.iam.put_user_policy(UserName=user, PolicyName="deployer-without-elb",
                              PolicyDocument=json.dumps(without))
    key = world.iam.create_access_key(UserName=user)["AccessKey"]
    try:
        env2 = dict(env, AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        p = subprocess.run([CTL, "--stack", stack, "status"], env=env2, capture_output=True, text=True,
                           timeout=60)
        rows = [line for line in p.stdout.splitlines() if line.startswith("i-")]
        check("ctl status without DescribeTargetHealth: exit 0, the releases, a note saying what to grant",
              p.returncode == 0 and rows and "note: target health unknown" in p.stdout
              and "elasticloadbalancing:DescribeTargetHealth was denied" in p.stdout
              and "DeployerPolicy" in p.stdout, (p.stdout + p.stderr)[-800:])
    finally:
        world.iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
        world.iam.delete_user_policy(UserName=user, PolicyName="deployer-without-elb")
        world.iam.delete_user(UserName=user)


def main():
    override = os.environ.get("SKIFF_APP_TEMPLATE")  # e.g. an older app.yaml, to see it fail
    if override:
        import yaml
        from test_stacks import CfnLoader
        with open(override) as f:
            text = f.read()
        t = yaml.load(text, Loader=CfnLoader)
    else:
        text, t = load_template("app.yaml")
    try:
        admin = admin_session()
    except OSError as e:
        check("emulator administrator keys readable", False, f"{e}: run .ci/setup.sh")
        return TALLY.summary()
    world = World(admin)
    env_a, env_b = f"pa{RUN}", f"pb{RUN}"
    tag = f"rel{RUN}"
    tmp = tempfile.mkdtemp(prefix="skiff-perm-")
    try:
        for b in (AGENT, CTL):
            if not os.access(b, os.X_OK):
                raise RuntimeError(f"{b} missing: cargo build -p skiff-agent -p skiff-ctl")
        net = world.network()
        world.key()
        stack_a = stack_b = None
        name_a, stack_a = world.stack(env_a, text, t, net, tag, free_port(), free_port())
        keys = public_key_pem() + public_key_pem()
        name_b, stack_b = world.stack(env_b, text, t, net, tag, free_port(), free_port(), TrustedKeys=keys)
        for env, s in ((env_a, stack_a), (env_b, stack_b)):
            check(f"stack {env} created as administrator", s["StackStatus"] == "CREATE_COMPLETE",
                  f"{s['StackStatus']}: {s.get('StackStatusReason')}")
        if stack_a["StackStatus"] != "CREATE_COMPLETE" or stack_b["StackStatus"] != "CREATE_COMPLETE":
            raise RuntimeError("no stacks")
        role_name = world.physical_ids(name_a)["InstanceRole"]
        role_arn = world.iam.get_role(RoleName=role_name)["Role"]["Arn"]
        group = outputs(stack_a)["AutoScalingGroup"]
        first = next(iter(world.group_instances(group)))
        c = emulator_credentials(role_arn, first)
        role_session = session(c["AccessKeyId"], c["SecretAccessKey"], c["Token"])
        scope_checks(world, role_session, env_a, env_b)
        trusted_keys_checks(world, name_b, stack_b, env_b, keys, role_session)
        agent_checks(world, stack_a, env_a, role_name, role_arn, tag, tmp)
        ctl_checks(world, stack_a, [tag, f"next{RUN}"], tmp)
        self_tagging_checks(world, group, role_arn)
    except Exception:
        check("permission checks ran to the end", False, traceback.format_exc())
    finally:
        for undo in reversed(world.cleanup):
            try:
                undo()
            except Exception:
                pass
        subprocess.run(["rm", "-rf", tmp])
    return TALLY.summary()


if __name__ == "__main__":
    sys.exit(main())
