#!/usr/bin/env python3
"""A fleet in a box: skiff's whole release path on one machine.

    box.py up [--instances 3] [--boot-delay 2]   # idempotent: an existing box is kept
    box.py down                                  # idempotent: leaves nothing behind
    box.py status
    box.py env                                   # the shell lines to run ctl against the box
    box.py imds-delay [--samples 10]             # CreateTags -> the tag visible in a host's IMDS

What `up` builds (all state under /var/lib/skiff-fleet and /run/skiff-fleet):
  * a bridge skfbr0 (10.201.0.1/24) standing in for the VPC's private subnets;
  * skiff's emulator (testbed/emulator, IAM enforced) of its own on 10.201.0.1:5060;
  * the app stack `app-fleet` created from the real templates/app.yaml (as the emulator's
    administrator), its release parameter created first as `make create-stack` does, and an
    IAM user holding the stack's DeployerPolicy (the credentials ctl runs with, as Jenkins');
  * the test image (busybox httpd; see README) pushed as <repo>:<tag> to the registry that the
    ECR-shaped host name 123456789012.dkr.ecr.us-east-1.amazonaws.com serves;
  * a controller process (`box.py controller`) that follows the group's instances in the
    emulator: for each one it boots a host (after --boot-delay): a network namespace with its own
    address, its own dockerd, a per-instance IMDSv2 and the real agent with the config the
    launch template's user data writes; an instance that left the group is torn down; HAProxy
    (the ALB) gets the InService instances as targets, health checked like the target group.

Exit codes: 0 done, 1 failed (the message says what to do), 64 bad arguments.
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "templates"))
sys.path.insert(0, os.path.join(ROOT, "testbed"))
from kit import emulator as kit_emulator  # noqa: E402
from kit import imds as kit_imds  # noqa: E402
from kit.emulator import session  # noqa: E402
from kit.waits import wait_until  # noqa: E402

CI_HOME = os.environ.get("SKIFF_CI_HOME", "/var/lib/skiff-ci")
TARGET = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/skiff-target")
STATE = os.environ.get("SKIFF_FLEET_STATE", "/var/lib/skiff-fleet")
RUN_DIR = os.environ.get("SKIFF_FLEET_RUN", "/run/skiff-fleet")
BRIDGE, GATEWAY, PREFIX = "skfbr0", "10.201.0.1", "10.201.0"
EMULATOR_PORT, IMDS_PORT, LB_PORT, HAPROXY_SLOTS = 5060, 8169, 8880, 16
TAGS_MAX_AGE = 0.5  # seconds the box's IMDS serves an instance's tags from its cache
ENDPOINT = f"http://{GATEWAY}:{EMULATOR_PORT}"
REGION = "us-east-1"
ENV_NAME = "fleet"
STACK = f"app-{ENV_NAME}"
REPO = "skiff-fleet/app"
ECR_HOST = f"123456789012.dkr.ecr.{REGION}.amazonaws.com"
LOCAL_REGISTRY = "127.0.0.1:5000"  # the ECR-shaped host serves this registry's storage (setup.sh)
REGISTRY_CA = os.path.join(CI_HOME, "registry-ecr", "ca.crt")
BOX_FILE = os.path.join(STATE, "box.json")
# The app stack's template: the working tree's by default; FLEET_TEMPLATE=<file> for another.
TEMPLATE = os.path.abspath(os.environ.get("FLEET_TEMPLATE", os.path.join(ROOT, "templates", "app.yaml")))
PY = os.path.join(CI_HOME, "venv-moto", "bin", "python")


def say(msg):
    print(f"[fleet] {msg}", flush=True)


class BoxError(Exception):
    pass


def run(*cmd, check=True, quiet=False, **kw):
    p = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise BoxError(f"{' '.join(cmd)}: {(p.stderr or p.stdout).strip()}")
    return p


def binary(name):
    """FLEET_AGENT_BIN / FLEET_CTL_BIN, else the debug build fleet.sh makes, else the release
    build. Not "the newest": the target directory is shared, and a build from another checkout
    may be newer than this tree's."""
    override = os.environ.get(f"FLEET_{name.upper()}_BIN")
    candidates = [override] if override else [os.path.join(TARGET, d, name) for d in ("debug", "release")]
    for p in candidates:
        if os.access(p, os.X_OK):
            return os.path.abspath(p)
    raise BoxError(f"no {name} binary ({', '.join(candidates)}): cargo build -p skiff-agent -p skiff-ctl"
                   + (f", or fix FLEET_{name.upper()}_BIN" if override else ""))


def load_box():
    try:
        with open(BOX_FILE) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def admin_clients(box):
    s = session(box["admin"]["access_key_id"], box["admin"]["secret_access_key"])
    return lambda svc: s.client(svc, endpoint_url=ENDPOINT)


# --- the template's settings the box follows -----------------------------------------------

def template_settings(stack_params):
    """Target group health check, deregistration delay and hook settings from templates/app.yaml,
    with this box's parameter values substituted (one source for HAProxy, the model, the runner)."""
    from test_stacks import load_template

    _, t = load_template(TEMPLATE)
    tg = t["Resources"]["TargetGroup"]["Properties"]
    asg = t["Resources"]["AutoScalingGroup"]["Properties"]

    def value(v):
        if isinstance(v, dict) and "Ref" in v:
            name = v["Ref"]
            return stack_params.get(name, t["Parameters"][name].get("Default"))
        return v

    attrs = {a["Key"]: value(a["Value"]) for a in tg.get("TargetGroupAttributes", [])}
    return {
        "interval": int(tg["HealthCheckIntervalSeconds"]),
        "timeout": int(tg["HealthCheckTimeoutSeconds"]),
        "healthy": int(tg["HealthyThresholdCount"]),
        "unhealthy": int(tg["UnhealthyThresholdCount"]),
        "path": tg["HealthCheckPath"],
        "health_port": int(value(tg["HealthCheckPort"])),
        "app_port": int(value(tg["Port"])),
        "deregistration_delay": int(attrs.get("deregistration_delay.timeout_seconds", 300)),
        "grace": int(asg.get("HealthCheckGracePeriod", 0)),
        "max_healthy": int(asg["InstanceMaintenancePolicy"]["MaxHealthyPercentage"]),
        "min_healthy": int(asg["InstanceMaintenancePolicy"]["MinHealthyPercentage"]),
    }


# --- images --------------------------------------------------------------------------------

APPS = ("busybox", "graceful")
GRACEFUL_BASE = "skiff-ci/graceful-app:1"
_graceful_base_checked = []


def default_app():
    """The test app the box's releases are built from: the box's own (FLEET_APP at `up`), else
    FLEET_APP, else busybox."""
    box = load_box() or {}
    return box.get("app") or os.environ.get("FLEET_APP", "busybox")


def push_image(tag, healthy=True, app=None, fail_after=None, slow_start=None):
    """The test app as REPO:tag, whose page names the release and the host's address, on $PORT:
      * busybox: busybox httpd; no keep-alive (every response closes its connection), and as
        PID 1 without a handler it ignores SIGTERM (the engine kills it after the stop timeout);
      * graceful: testbed/images/graceful-app.py: keep-alive, and on SIGTERM finishes what is in
        flight, closes each kept-alive connection after its next response, and exits.
    healthy=False: /health never passes (busybox: 404, graceful: 500); fail_after=S (graceful
    only): /health fails from S seconds after its first pass on (a release that fails after the
    agent's gate); slow_start=S (graceful only): /health 503 for its first S seconds."""
    app = app or default_app()
    if app not in APPS:
        raise BoxError(f"app {app!r}: one of {', '.join(APPS)}")
    ctx = os.path.join(STATE, "image", tag)
    shutil.rmtree(ctx, ignore_errors=True)
    os.makedirs(os.path.join(ctx, "www"))
    if app == "busybox":
        if fail_after is not None or slow_start is not None:
            raise BoxError("fail_after and slow_start need the graceful app")
        if healthy:
            with open(os.path.join(ctx, "www", "health"), "w") as f:
                f.write("ok\n")
        page = ('a=$(ip -o -4 addr show eth0 2>/dev/null | awk \'{print $4}\'); '
                'echo "release=$SKIFF_RELEASE_TAG host=${a%/*}" > /www/index.html; '
                'exec httpd -f -p $PORT -h /www')
        dockerfile = (f"FROM skiff-ci/busybox:1\nLABEL skiff.fleet.tag={tag}\n"
                      "COPY www /www\n"
                      f"CMD [\"/bin/sh\", \"-c\", {json.dumps(page)}]\n")
    else:
        if not _graceful_base_checked:  # idempotent: rebuilt only when graceful-app.py changed
            run("bash", os.path.join(ROOT, "testbed", "images", "graceful-app.sh"))
            _graceful_base_checked.append(True)
        knobs = (([] if healthy else ["UNHEALTHY=1"]) + ([] if fail_after is None else [f"FAIL_AFTER={fail_after:g}"])
                 + ([] if slow_start is None else [f"SLOW_START={slow_start:g}"]))
        dockerfile = (f"FROM {GRACEFUL_BASE}\nLABEL skiff.fleet.tag={tag}\n"
                      + (f"ENV {' '.join(knobs)}\n" if knobs else ""))
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write(dockerfile)
    ref = f"{LOCAL_REGISTRY}/{REPO}:{tag}"
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    # No RUN step: nothing runs at build time, so the build needs no network (nor docker0).
    run("docker", "build", "-q", "--network", "none", "-t", ref, ctx, env=env)
    try:
        run("docker", "push", ref)
    finally:
        run("docker", "rmi", ref, check=False)  # only the registry keeps it: the hosts pull
    return f"{ECR_HOST}/{REPO}:{tag}"


# --- up ------------------------------------------------------------------------------------

def bridge_up():
    if run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")


def start_emulator():
    os.makedirs(RUN_DIR, exist_ok=True)
    admin_file = os.path.join(STATE, "emulator-admin.json")
    py = os.path.join(CI_HOME, "venv-moto", "bin", "python")
    log = open(os.path.join(STATE, "emulator.log"), "w")
    p = subprocess.Popen([py, os.path.join(ROOT, "testbed", "emulator", "server.py"), "-H", GATEWAY,
                          "--port", str(EMULATOR_PORT), "--iam", "--admin-file", admin_file],
                         stdout=log, stderr=log, start_new_session=True)
    with open(os.path.join(RUN_DIR, "emulator.pid"), "w") as f:
        f.write(str(p.pid))

    def ready():
        try:
            with urllib.request.urlopen(f"{ENDPOINT}/skiff-emulator/version", timeout=2) as r:
                return json.load(r)
        except OSError:
            if p.poll() is not None:
                raise BoxError(f"the emulator exited ({p.returncode}); see {STATE}/emulator.log")
            return None

    if not wait_until(ready, 60, 0.5):
        raise BoxError(f"the emulator did not answer on {ENDPOINT} in 60 s; see {STATE}/emulator.log")
    with open(admin_file) as f:
        return json.load(f)


def drain_seconds(t):
    """The box's DrainSeconds: FLEET_DRAIN, else the target group's detection window
    (UnhealthyThresholdCount x HealthCheckIntervalSeconds + HealthCheckTimeoutSeconds, 12 s with
    the template's settings). An in-place swap drains by failing the health check while the old
    container still serves; stopped any sooner, the load balancer may still send it requests.
    Measured with 5 s: the target never left the load balancer (2 checks of 5 s not yet failed),
    3-5 requests of ~430 failed (503) per in-place release on 3 instances."""
    if os.environ.get("FLEET_DRAIN"):
        return int(os.environ["FLEET_DRAIN"])
    tg = t["Resources"]["TargetGroup"]["Properties"]
    return (int(tg["UnhealthyThresholdCount"]) * int(tg["HealthCheckIntervalSeconds"])
            + int(tg["HealthCheckTimeoutSeconds"]))


def swap_mode(stack_params):
    """The stack's SwapMode (its parameter, else the template's default), or None when the
    template has no such parameter."""
    from test_stacks import load_template

    _, t = load_template(TEMPLATE)
    if "SwapMode" not in t["Parameters"]:
        return None
    return stack_params.get("SwapMode") or t["Parameters"]["SwapMode"].get("Default")


def create_stack(c, tag, instances, params_extra):
    from test_stacks import load_template, outputs, params

    text, t = load_template(TEMPLATE)
    ec2, acm, ssm, sm, cfn, iam = (c(x) for x in ("ec2", "acm", "ssm", "secretsmanager",
                                                  "cloudformation", "iam"))
    vpc = ec2.create_vpc(CidrBlock="10.201.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.201.{i + 1}.0/24",
                                 AvailabilityZone=REGION + z)["Subnet"]["SubnetId"]
               for i, z in enumerate("abab")]
    cert = acm.request_certificate(DomainName="fleet.skiff.example.com")["CertificateArn"]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    # No database server in the box: an existing database named by parameter (the test app does
    # not connect to it); its secret is real, so the instance role's secret scope still applies.
    secret = sm.create_secret(Name=f"skiff-{ENV_NAME}-db", SecretString='{"username":"skiff"}')["ARN"]
    p = {"Environment": ENV_NAME, "VpcId": vpc, "PublicSubnetIds": ",".join(subnets[:2]),
         "PrivateSubnetIds": ",".join(subnets[2:]), "CertificateArn": cert, "AmiId": ami,
         "InitialTag": tag, "MinSize": instances, "MaxSize": max(2 * instances, 2),
         "ImageRepositoryName": REPO, "DrainSeconds": drain_seconds(t), "StopTimeoutSeconds": 5,
         "StartTimeoutSeconds": 15, "LaunchHookTimeoutSeconds": 120,
         "DatabaseHost": "db.example.internal", "DatabaseSecretArn": secret}
    p.update(params_extra)
    p = {k: v for k, v in p.items() if k in t["Parameters"]}
    # Created once before the stack, as `make create-stack` does; only ctl writes it afterwards.
    ssm.put_parameter(Name=f"/skiff/{ENV_NAME}/release", Value=tag, Type="String",
                      Description="skiff release of fleet, written by ctl release")
    cfn.create_stack(StackName=STACK, TemplateBody=text, Parameters=params(p),
                     Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"])
    stack = wait_until(lambda: (lambda s: s if not s["StackStatus"].endswith("_IN_PROGRESS") else None)(
        cfn.describe_stacks(StackName=STACK)["Stacks"][0]), 120, 1)
    if not stack or stack["StackStatus"] != "CREATE_COMPLETE":
        raise BoxError(f"stack {STACK}: {stack and stack['StackStatus']}: {stack and stack.get('StackStatusReason')}")
    out = outputs(stack)
    resources = {r["LogicalResourceId"]: r.get("PhysicalResourceId") for r in
                 cfn.describe_stack_resources(StackName=STACK)["StackResources"] if "LogicalResourceId" in r}
    role_name = resources["InstanceRole"]
    user = "fleet-deployer"
    iam.create_user(UserName=user)
    iam.attach_user_policy(UserName=user, PolicyArn=out["DeployerPolicyArn"])
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"outputs": out, "params": p, "launch_template": resources["LaunchTemplate"],
            "role_name": role_name, "role_arn": iam.get_role(RoleName=role_name)["Role"]["Arn"],
            "deployer": {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}}


def base(args):
    """The box without a stack (for a stack someone else creates, e.g. `make create-stack` in
    testbed/fleet/branch.sh): the bridge, the emulator, and the network values a stack needs, printed
    as shell lines (the emulator's administrator keys, VPC_ID, subnets, certificate, AMI)."""
    if load_box() or os.path.exists(RUN_DIR):
        say("a box is (half) up: tearing it down first")
        down(args)
    agent, ctl = binary("agent"), binary("ctl")
    for tool in ("haproxy", "nsenter", "dockerd", "ip"):
        if not shutil.which(tool):
            raise BoxError(f"{tool} missing: run bash .ci/setup.sh (it installs it)")
    ensure_dependencies()
    shutil.rmtree(os.path.join(STATE, "logs"), ignore_errors=True)
    os.makedirs(STATE, exist_ok=True)
    os.makedirs(RUN_DIR, exist_ok=True)
    bridge_up()
    admin = start_emulator()
    box = {"admin": admin, "agent": agent, "ctl": ctl, "boot_delay": args.boot_delay}
    c = admin_clients(box)
    ec2, acm = c("ec2"), c("acm")
    vpc = ec2.create_vpc(CidrBlock="10.201.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.201.{i + 1}.0/24",
                                 AvailabilityZone=REGION + z)["Subnet"]["SubnetId"]
               for i, z in enumerate("abab")]
    box["network"] = {"VPC_ID": vpc, "PUBLIC_SUBNETS": ",".join(subnets[:2]),
                      "PRIVATE_SUBNETS": ",".join(subnets[2:]),
                      "CERTIFICATE_ARN": acm.request_certificate(DomainName="fleet.skiff.example.com")["CertificateArn"],
                      "AMI_ID": ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]}
    save_box(box)
    env = {"AWS_ENDPOINT_URL": ENDPOINT, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
           "AWS_ACCESS_KEY_ID": admin["access_key_id"], "AWS_SECRET_ACCESS_KEY": admin["secret_access_key"],
           "AWS_EC2_METADATA_DISABLED": "true", **box["network"]}
    for k, v in env.items():
        print(f"export {k}={v}")
    return 0


def adopt(args):
    """Follow a stack created in the box's emulator by someone else (`box.py base` first): a
    deployer user with its DeployerPolicy, HAProxy as its load balancer, the controller booting
    the hosts its group launches; waits until --instances serve."""
    box = load_box()
    if not box or "network" not in box:
        raise BoxError("no base box: box.py base first")
    if box.get("stack"):
        raise BoxError(f"the box follows {box['stack']} already; box.py down first")
    c = admin_clients(box)
    cfn, iam = c("cloudformation"), c("iam")
    from test_stacks import outputs

    stack = cfn.describe_stacks(StackName=args.stack)["Stacks"][0]
    out = outputs(stack)
    if "AutoScalingGroup" not in out or "DeployerPolicyArn" not in out:
        raise BoxError(f"stack {args.stack} has no AutoScalingGroup/DeployerPolicyArn outputs: {sorted(out)}")
    resources = {r["LogicalResourceId"]: r.get("PhysicalResourceId") for r in
                 cfn.describe_stack_resources(StackName=args.stack)["StackResources"] if "LogicalResourceId" in r}
    role_name = resources["InstanceRole"]
    user = f"deployer-{args.stack}"[:64]
    iam.create_user(UserName=user)
    iam.attach_user_policy(UserName=user, PolicyArn=out["DeployerPolicyArn"])
    key = iam.create_access_key(UserName=user)["AccessKey"]
    p = {x["ParameterKey"]: x.get("ParameterValue") for x in stack.get("Parameters", [])}
    box.update({"stack": args.stack, "outputs": out, "params": p, "launch_template": resources["LaunchTemplate"],
                "role_name": role_name, "role_arn": iam.get_role(RoleName=role_name)["Role"]["Arn"],
                "deployer": {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}})
    box["settings"] = template_settings(p)
    save_box(box)
    write_haproxy_config(box)
    p = start_controller()
    say(f"following stack {args.stack}: waiting for {args.instances} instances InService behind the load balancer")
    ok = wait_until(lambda: len(lb_up()) >= args.instances or p.poll() is not None, args.timeout, 1)
    if p.poll() is not None:
        raise BoxError(f"the controller exited; see {STATE}/controller.log")
    if not ok:
        raise BoxError(f"not {args.instances} instances serving in {args.timeout} s (group "
                       f"{out['AutoScalingGroup']}: {group_states(box)}); see {STATE}/controller.log and "
                       f"{STATE}/hosts/*/agent.log")
    say(f"{len(lb_up())} instances serve http://127.0.0.1:{LB_PORT}/")
    print_env(box)
    return 0


def save_box(box):
    with open(BOX_FILE + ".new", "w") as f:
        json.dump(box, f, indent=1)
    os.chmod(BOX_FILE + ".new", 0o600)
    os.replace(BOX_FILE + ".new", BOX_FILE)


def start_controller():
    log = open(os.path.join(STATE, "controller.log"), "a")
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "controller"], stdout=log, stderr=log,
                         start_new_session=True, cwd=ROOT)
    with open(os.path.join(RUN_DIR, "controller.pid"), "w") as f:
        f.write(str(p.pid))
    return p


def dependencies():
    """What the box needs of the machine and does not start itself: the registry the test
    image is pushed to, and the ECR-shaped registry every host pulls from (both started by
    .ci/setup.sh). Returns the problems (empty when both answer)."""
    import ssl

    problems = []
    try:
        urllib.request.urlopen(f"http://{LOCAL_REGISTRY}/v2/", timeout=3).close()
    except OSError as e:
        problems.append(f"the registry {LOCAL_REGISTRY} ({e})")
    try:
        ctx = ssl.create_default_context(cafile=REGISTRY_CA)
        urllib.request.urlopen(f"https://{ECR_HOST}/v2/", timeout=3, context=ctx).close()
    except urllib.error.HTTPError as e:
        if e.code != 401:  # 401: it answers and wants moto's ECR token, as it should
            problems.append(f"the ECR-shaped registry https://{ECR_HOST} (HTTP {e.code})")
    except (OSError, ssl.SSLError) as e:
        problems.append(f"the ECR-shaped registry https://{ECR_HOST} ({e})")
    return problems


def ensure_dependencies():
    """Restart what the box depends on through .ci/setup.sh (idempotent) when it does not
    answer; fail with what to do when that does not help. Returns what was restarted."""
    problems = dependencies()
    if not problems:
        return []
    say(f"not answering: {'; '.join(problems)}: running .ci/setup.sh to restart it")
    p = subprocess.run(["bash", os.path.join(ROOT, ".ci", "setup.sh")], capture_output=True, text=True,
                       timeout=900)
    still = dependencies()
    if p.returncode != 0 or still:
        raise BoxError(f"{'; '.join(still or problems)} still not answering after .ci/setup.sh (exit "
                       f"{p.returncode}: {(p.stderr or p.stdout).strip()[-500:]}); see "
                       f"{CI_HOME}/registry-5000/log and {CI_HOME}/registry-ecr/log, then rerun")
    return problems


def up(args):
    box = load_box()
    if box and controller_alive():
        say(f"the box is up already (stack {STACK}); `box.py down` first to start afresh")
        print_env(box)
        return 0
    if box or os.path.exists(RUN_DIR):
        say("a box is half up: tearing it down first")
        down(args)
    for what, path in (("setup.sh's moto venv", os.path.join(CI_HOME, "venv-moto", "bin", "python")),
                       ("the ECR-shaped registry's CA (setup.sh)", REGISTRY_CA)):
        if not os.path.exists(path):
            raise BoxError(f"{what} missing ({path}): run bash .ci/setup.sh first")
    agent, ctl = binary("agent"), binary("ctl")
    for tool in ("haproxy", "nsenter", "dockerd", "ip"):
        if not shutil.which(tool):
            raise BoxError(f"{tool} missing: run bash .ci/setup.sh (it installs it)")
    ensure_dependencies()
    shutil.rmtree(os.path.join(STATE, "logs"), ignore_errors=True)  # the previous box's
    os.makedirs(STATE, exist_ok=True)
    os.makedirs(RUN_DIR, exist_ok=True)
    tag = args.tag
    app = os.environ.get("FLEET_APP", "busybox")
    say(f"pushing the test image {ECR_HOST}/{REPO}:{tag} ({app} app)")
    push_image(tag, app=app)
    bridge_up()
    say(f"starting the emulator (IAM enforced) on {ENDPOINT}")
    admin = start_emulator()
    box = {"admin": admin, "agent": agent, "ctl": ctl, "boot_delay": args.boot_delay, "initial_tag": tag,
           "app": app}
    extra = {}
    if os.environ.get("FLEET_SWAP_MODE"):
        # the stack parameter SwapMode (handover | drain), when the template has it
        extra["SwapMode"] = os.environ["FLEET_SWAP_MODE"]
    say(f"creating stack {STACK} from templates/app.yaml ({args.instances} instances)")
    box.update(create_stack(admin_clients(box), tag, args.instances, extra))
    box["swap_mode"] = swap_mode(box["params"])
    say(f"swap mode: {box['swap_mode'] or 'none (the template has no SwapMode parameter)'}")
    check_type = os.environ.get("FLEET_ASG_HEALTH_CHECK")
    if check_type:
        # A diagnostic deviation from the template, said at every `up` and in the scenarios'
        # tables: EC2 makes Auto Scaling ignore the load balancer's view of the targets.
        if check_type not in ("EC2", "ELB"):
            raise BoxError(f"FLEET_ASG_HEALTH_CHECK={check_type}: EC2 or ELB")
        admin_clients(box)("autoscaling").update_auto_scaling_group(
            AutoScalingGroupName=box["outputs"]["AutoScalingGroup"], HealthCheckType=check_type)
        box["asg_health_check"] = check_type
        say(f"FLEET_ASG_HEALTH_CHECK: the group's HealthCheckType is {check_type}, not the template's")
    box["settings"] = template_settings(box["params"])
    with open(BOX_FILE + ".new", "w") as f:
        json.dump(box, f, indent=1)
    os.chmod(BOX_FILE + ".new", 0o600)
    os.replace(BOX_FILE + ".new", BOX_FILE)
    write_haproxy_config(box)
    log = open(os.path.join(STATE, "controller.log"), "a")
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "controller"], stdout=log, stderr=log,
                         start_new_session=True, cwd=ROOT)
    with open(os.path.join(RUN_DIR, "controller.pid"), "w") as f:
        f.write(str(p.pid))
    group = box["outputs"]["AutoScalingGroup"]
    say(f"waiting for {args.instances} instances InService behind the load balancer")
    def refused():
        with open(os.path.join(STATE, "controller.log")) as f:
            return "not restarted" in f.read()

    ok = wait_until(lambda: len(lb_up()) >= args.instances or p.poll() is not None or refused(),
                    args.timeout, 1)
    if refused():
        logs = "".join(open(f).read()[:600] for f in sorted(
            os.path.join(STATE, "hosts", h, "agent.log") for h in os.listdir(os.path.join(STATE, "hosts")))[:1])
        raise BoxError(f"an agent refused the config the launch template's user data writes ({TEMPLATE}); "
                       f"template and agent disagree:\n{logs}")
    if p.poll() is not None:
        raise BoxError(f"the controller exited; see {STATE}/controller.log")
    if not ok:
        raise BoxError(f"not all of {args.instances} instances became healthy in {args.timeout} s "
                       f"(group {group}: {group_states(box)}); see {STATE}/controller.log and "
                       f"{STATE}/hosts/*/agent.log")
    say(f"up: {len(lb_up())} instances serve http://127.0.0.1:{LB_PORT}/")
    print_env(box)
    return 0


def ctl_env(box):
    return {"AWS_ENDPOINT_URL": ENDPOINT, "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": box["deployer"]["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": box["deployer"]["secret_access_key"],
            "AWS_EC2_METADATA_DISABLED": "true", "SKIFF_STACK": box.get("stack", STACK),
            "SKIFF_REGISTRY_CA": REGISTRY_CA}


def print_env(box):
    path = os.path.join(STATE, "ctl.env")
    with open(path, "w") as f:
        for k, v in ctl_env(box).items():
            f.write(f"export {k}={v}\n")
    os.chmod(path, 0o600)
    s = box["settings"]
    warmup = f"{s['healthy'] * s['interval'] + 2}s"  # the new targets' first checks, + 2 s
    print(f"""
  load balancer:  curl http://127.0.0.1:{LB_PORT}/
  release:        {PY} testbed/fleet/box.py push v2        # a new test image tag
                  . {path}                  # deployer credentials, endpoint, stack
                  {box['ctl']} release --tag v2 --warmup {warmup}
                  {box['ctl']} status; {box['ctl']} history; {box['ctl']} rollback --warmup {warmup}
  state:          python3 testbed/fleet/box.py status
  down:           make fleet-down
""", flush=True)


# --- the controller: instances -> hosts, IMDSv2, load balancer -----------------------------

class Host:
    """One instance: a network namespace, its dockerd and the agent."""

    def __init__(self, box, instance_id, index):
        self.box, self.id, self.index = box, instance_id, index
        self.ns, self.veth = f"skf-{index}", f"skfv{index}"
        self.ip = f"{PREFIX}.{10 + index}"
        self.dir = os.path.join(STATE, "hosts", instance_id)
        self.run = os.path.join(RUN_DIR, "hosts", instance_id)
        self.sock = os.path.join(self.run, "docker.sock")
        self.token = uuid.uuid4().hex
        self.creds = None
        self.ready = False  # namespace, engine and agent started
        self.stopping = False
        self.lock = threading.Lock()

    def boot(self):
        time.sleep(self.box["boot_delay"])  # EC2's boot before the user data runs
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.run, exist_ok=True)
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        run("ip", "link", "set", self.veth, "master", BRIDGE, "up")
        for cmd in (["addr", "add", f"{self.ip}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", GATEWAY]):
            run("ip", "-n", self.ns, *cmd)
        with open(os.path.join(self.run, "address"), "w") as f:
            f.write(self.ip)  # for the scenarios: the host's address (agent port, IMDS caller)
        with open(os.path.join(self.dir, "daemon.json"), "w") as f:
            f.write("{}\n")  # not the machine's /etc/docker/daemon.json
        # nsenter --net, not `ip netns exec`: that remounts /sys and hides the cgroup mounts.
        # On EC2 the engine's awslogs driver takes the instance role's credentials from IMDS at
        # 169.254.169.254, which the box does not serve: it gets them in its environment.
        self.creds = instance_credentials(self.box, self.id)
        engine_env = dict(os.environ, AWS_ACCESS_KEY_ID=self.creds["AccessKeyId"],
                          AWS_SECRET_ACCESS_KEY=self.creds["SecretAccessKey"],
                          AWS_SESSION_TOKEN=self.creds["Token"], AWS_REGION=REGION)
        self.spawn("dockerd", ["dockerd", "--config-file", os.path.join(self.dir, "daemon.json"),
                               "--bridge=none", "--iptables=false", "--ip6tables=false",
                               "--data-root", os.path.join(self.dir, "docker"),
                               "--exec-root", os.path.join(self.run, "exec"),
                               "-H", f"unix://{self.sock}", "--pidfile", os.path.join(self.run, "docker.pid")],
                   env=engine_env)
        if not wait_until(lambda: run("docker", "-H", f"unix://{self.sock}", "version", check=False).returncode == 0, 60, 0.3):
            raise BoxError(f"{self.id}: dockerd did not answer in 60 s; see {self.dir}/dockerd.log")
        self.creds = instance_credentials(self.box, self.id)
        config = render_config(self.box, self.dir, self.ns)
        env = {"PATH": os.environ["PATH"], "HOME": self.dir, "DOCKER_HOST": f"unix://{self.sock}",
               "AWS_ENDPOINT_URL": ENDPOINT, "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{GATEWAY}:{IMDS_PORT}",
               "AWS_CONFIG_FILE": os.path.join(self.dir, "none"),
               "AWS_SHARED_CREDENTIALS_FILE": os.path.join(self.dir, "none"), "RUST_LOG": "info"}
        self.agent_cmd, self.agent_env = [self.box["agent"], "run", "--config", config], env
        self.agent = self.spawn("agent", self.agent_cmd, env=env)
        self.ready = True
        threading.Thread(target=self.supervise, daemon=True).start()

    def supervise(self):
        """systemd's part (packer/files/skiff-agent.service): Restart=always after RestartSec,
        except for exit 64 (RestartPreventExitStatus: the config is invalid)."""
        restart_sec, prevent = unit_restart()
        while True:
            rc = self.agent.wait()
            if self.stopping:
                return
            if rc in prevent:
                print(f"{time.strftime('%H:%M:%S')} {self.id}: agent exited {rc}: not restarted", flush=True)
                return
            print(f"{time.strftime('%H:%M:%S')} {self.id}: agent exited {rc}, restart in {restart_sec} s", flush=True)
            time.sleep(restart_sec)
            if self.stopping:
                return
            self.agent = self.spawn("agent", self.agent_cmd, env=self.agent_env)

    def spawn(self, name, cmd, env=None):
        log = open(os.path.join(self.dir, f"{name}.log"), "a")
        p = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{self.ns}", *cmd], stdout=log, stderr=log,
                             env=env, start_new_session=True)
        with open(os.path.join(self.run, f"{name}.pid"), "w") as f:
            f.write(str(p.pid))
        return p

    def teardown(self):
        self.stopping = True
        teardown_host(self.ns, self.veth, self.run, self.dir)


def unit_restart():
    """RestartSec and RestartPreventExitStatus of the agent's systemd unit on the AMI."""
    restart_sec, prevent = 2.0, {64}
    try:
        with open(os.path.join(ROOT, "packer", "files", "skiff-agent.service")) as f:
            text = f.read()
        m = re.search(r"(?m)^RestartSec=(\d+)", text)
        restart_sec = float(m.group(1)) if m else restart_sec
        m = re.search(r"(?m)^RestartPreventExitStatus=([\d ]+)", text)
        prevent = {int(x) for x in m.group(1).split()} if m else prevent
    except OSError:
        pass
    return restart_sec, prevent


def kill_pidfile(path, grace=10, expect=None):
    """SIGTERM, then SIGKILL after `grace`, the process a pidfile names, only while its command
    line still contains `expect`: a stale pidfile may name a reused pid."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    if expect:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if expect.encode() not in f.read():
                    return
        except OSError:
            return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_until(lambda: not alive(pid), grace, 0.2):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def teardown_host(ns, veth, run_dir, data_dir):
    """Agent, engine (it stops its containers), what is left in the namespace, mounts, links."""
    kill_pidfile(os.path.join(run_dir, "agent.pid"), 15, "agent")
    kill_pidfile(os.path.join(run_dir, "docker.pid"), 20, "dockerd")
    kill_pidfile(os.path.join(run_dir, "dockerd.pid"), 5, "dockerd")  # nsenter's pid when dockerd never wrote its own
    if run("ip", "netns", "pids", ns, check=False).returncode == 0:
        for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    if data_dir and os.path.isdir(data_dir):
        # Kept until the next `up`: what an instance did is the first thing to read when a
        # scenario fails.
        logs = os.path.join(STATE, "logs", os.path.basename(data_dir))
        os.makedirs(logs, exist_ok=True)
        for name in ("agent.log", "dockerd.log"):
            if os.path.exists(os.path.join(data_dir, name)):
                shutil.copy(os.path.join(data_dir, name), logs)
    for root in (run_dir, data_dir):
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for m in sorted((m for m in mounts if root and m.startswith(root + "/")), key=len, reverse=True):
            run("umount", "-l", m, check=False)
    run("ip", "link", "del", veth, check=False)
    run("ip", "netns", "del", ns, check=False)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)


def instance_credentials(box, instance_id):
    return kit_emulator.instance_credentials(ENDPOINT, box["role_arn"], instance_id, REGION)


def render_config(box, host_dir, ns):
    """Run the launch template's user data in the host's namespace (its IMDSv2 answers there)
    with /etc/skiff redirected into the host's folder and a systemctl that does nothing (the
    controller starts the agent). A [logs] section gets `endpoint` = the emulator: the engine's
    awslogs driver would otherwise go to the regional CloudWatch Logs endpoint."""
    c = admin_clients(box)
    versions = c("ec2").describe_launch_template_versions(LaunchTemplateId=box["launch_template"])
    user_data = max(versions["LaunchTemplateVersions"], key=lambda v: v["VersionNumber"])["LaunchTemplateData"]["UserData"]
    script = base64.b64decode(user_data).decode()
    etc, bindir = os.path.join(host_dir, "etc-skiff"), os.path.join(host_dir, "bin")
    os.makedirs(bindir, exist_ok=True)
    with open(os.path.join(bindir, "systemctl"), "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(os.path.join(bindir, "systemctl"), 0o755)
    run("nsenter", f"--net=/var/run/netns/{ns}", "bash", "-c", script.replace("/etc/skiff", etc),
        env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
                 AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://{GATEWAY}:{IMDS_PORT}"))
    path = os.path.join(etc, "agent.toml")
    with open(path) as f:
        text = f.read()
    if re.search(r"(?m)^\[logs\]", text) and not re.search(r"(?m)^endpoint\s*=", text):
        text = re.sub(r"(?m)^\[logs\]\n", f'[logs]\nendpoint = "{ENDPOINT}"\n', text, count=1)
        with open(path, "w") as f:
            f.write(text)
    return path


# Polls the box's IMDS from inside a host's namespace (the IMDS tells hosts apart by address):
# reads lines "<key> <value>" on stdin, answers each with the monotonic time (CLOCK_MONOTONIC is
# system-wide) at which tags/instance/<key> first read <value>, or "timeout".
IMDS_PROBE = r"""
import sys, time, urllib.request
base = sys.argv[1]
def call(path, method="GET", headers=None):
    req = urllib.request.Request(base + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
_, token = call("/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
print("ready", flush=True)
for line in sys.stdin:
    key, value = line.split()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        code, body = call("/latest/meta-data/tags/instance/" + key, headers={"X-aws-ec2-metadata-token": token})
        if code == 200 and body == value:
            print(time.monotonic(), flush=True)
            break
        time.sleep(0.01)
    else:
        print("timeout", flush=True)
"""


def imds_tag_delay(box, instance_id, samples=10, key="skiff-box:probe"):
    """CreateTags (as the emulator's administrator) -> the value visible in the box's IMDS, as
    the host of `instance_id` reads it: `samples` delays in seconds (None for one not seen
    within 10 s). The probe tag is deleted afterwards."""
    with open(os.path.join(RUN_DIR, "hosts", instance_id, "address")) as f:
        ip = f.read().strip()
    ns = next((n.split()[0] for n in run("ip", "netns", "list").stdout.splitlines()
               if n.startswith("skf-") and ip in run("ip", "-n", n.split()[0], "-4", "-o", "addr").stdout), None)
    if not ns:
        raise BoxError(f"{instance_id}: no namespace holds {ip}")
    ec2 = admin_clients(box)("ec2")
    p = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{ns}", sys.executable, "-c", IMDS_PROBE,
                          f"http://{GATEWAY}:{IMDS_PORT}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    delays = []
    try:
        if p.stdout.readline().strip() != "ready":
            raise BoxError(f"{instance_id}: the IMDS probe did not start")
        for _ in range(samples):
            value = uuid.uuid4().hex[:12]
            p.stdin.write(f"{key} {value}\n")
            p.stdin.flush()
            t0 = time.monotonic()
            ec2.create_tags(Resources=[instance_id], Tags=[{"Key": key, "Value": value}])
            seen = p.stdout.readline().strip()
            delays.append(None if seen == "timeout" else float(seen) - t0)
            time.sleep(0.3)  # not in step with the cache
    finally:
        p.stdin.close()
        p.wait(15)
        ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": key}])
    return delays


def haproxy_cmd(command):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(os.path.join(RUN_DIR, "haproxy.sock"))
        s.sendall((command + "\n").encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def lb_servers():
    """HAProxy's servers: name (h<slot>) -> (address, op state, admin state)."""
    text = haproxy_cmd("show servers state app")
    out = {}
    for line in text.splitlines()[2:]:
        f = line.split()
        # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ...
        if len(f) > 6:
            out[f[3]] = (f[4], int(f[5]), int(f[6]))
    return out


def lb_up():
    """Addresses of the servers HAProxy sends traffic to (UP and not draining)."""
    try:
        servers = lb_servers()
    except OSError:
        return []
    # op state 2 = running; admin bits 0x23 = maintenance (forced, inherited, resolution),
    # 0x18 = draining; 0x04 is the `disabled` the template slot started with, since cleared.
    return [addr for addr, op, admin in servers.values() if op == 2 and not admin & 0x3B]


def lb_stats():
    """HAProxy's counters per server of the backend (`show stat`): name (h<slot>) -> {field:
    value}; among them status (UP, DOWN, DRAIN, MAINT...), chkfail (failed checks), chkdown
    (UP -> DOWN transitions), hrsp_5xx, eresp, econ."""
    lines = haproxy_cmd("show stat").splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    fields = lines[0][2:].split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(fields, line.split(",")))
        if row.get("pxname") == "app" and row.get("svname") not in ("BACKEND", "FRONTEND", None):
            out[row["svname"]] = row
    return out


def host_redirect(ns, app="app"):
    """Where the agent's nftables redirect (table `ip skiff_<app>`) in namespace `ns` sends the
    public port: {public port: slot}, {} when there is no such table."""
    p = run("nsenter", f"--net=/var/run/netns/{ns}", "nft", "list", "table", "ip", f"skiff_{app}",
            check=False)
    out = {}
    for line in p.stdout.splitlines() if p.returncode == 0 else []:
        m = re.search(r"dport (\d+)\b.*\D(\d+)\s*$", line)
        if m and "dnat" in line or m and "redirect" in line:
            out[int(m.group(1))] = int(m.group(2))
    return out


def write_haproxy_config(box):
    s = box["settings"]
    cfg = f"""# The ALB of stack {STACK}: written by testbed/fleet/box.py from templates/app.yaml's target group.
global
    stats socket {RUN_DIR}/haproxy.sock mode 600 level admin
    pidfile {RUN_DIR}/haproxy.pid
defaults
    mode http
    # Keep-alive on both sides, as an ALB: clients keep their connections, and the connections to
    # the targets are pooled and reused by any request (`http-reuse always`), idle up to the
    # ALB's connection idle timeout (60 s by default, client and target connections alike). A
    # target that closes a pooled connection as a request arrives costs that request a 502, as
    # on an ALB (no retry here either).
    # https://docs.aws.amazon.com/elasticloadbalancing/latest/application/edit-load-balancer-attributes.html#connection-idle-timeout
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    # an ALB does not retry a request on another target
    retries 0
frontend lb
    bind 127.0.0.1:{LB_PORT}
    bind {GATEWAY}:{LB_PORT}
    default_backend app
backend app
    balance roundrobin
    option httpchk GET {s['path']}
    http-check expect status 200
    timeout check {s['timeout']}s
    default-server check port {s['health_port']} inter {s['interval']}s fastinter {s['interval']}s downinter {s['interval']}s rise {s['healthy']} fall {s['unhealthy']} pool-purge-delay 60s
    server-template h 1-{HAPROXY_SLOTS} 0.0.0.0:{s['app_port']} disabled
"""
    path = os.path.join(STATE, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(cfg)
    run("haproxy", "-c", "-q", "-f", path)
    run("haproxy", "-D", "-f", path, "-p", os.path.join(RUN_DIR, "haproxy.pid"))
    if not wait_until(lambda: os.path.exists(os.path.join(RUN_DIR, "haproxy.sock")), 10):
        raise BoxError("haproxy did not open its admin socket in 10 s")


class Controller:
    def __init__(self, box):
        self.box = box
        self.last_states = {}
        self.c = admin_clients(box)
        self.asg = self.c("autoscaling")
        self.ec2 = self.c("ec2")  # made here once: the IMDS threads share it (boto3 clients are thread safe)
        self.tags = {}  # instance id -> (read at, {key: value}): the IMDS tags cache
        self.tags_lock = threading.Lock()
        self.group = box["outputs"]["AutoScalingGroup"]
        self.hosts = {}  # instance id -> Host
        self.leaving = set()  # indices of hosts being torn down
        self.slots = {}  # instance id -> haproxy slot
        self.lb = {}  # instance id -> "ready" | ("drain", since) | "maint"
        self.registered = {}  # instance id -> (registered at, seen up since)
        self.reported = None  # the target states last reported to the emulator
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def host_by_ip(self, ip):
        with self.lock:
            return next((h for h in self.hosts.values() if h.ip == ip), None)

    def instance_tags(self, instance_id):
        """The instance's live EC2 tags, as the instance metadata's tags/instance category shows
        them: read from the emulator (DescribeTags on the instance), cached at most TAGS_MAX_AGE
        so that agents polling their tags every second cost one call per instance and second.
        AWS: "If you add or remove an instance tag, the instance metadata is updated while the
        instance is running" (no delay given):
        https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/work-with-tags-in-IMDS.html"""
        now = time.monotonic()
        with self.tags_lock:
            cached = self.tags.get(instance_id)
            if cached and now - cached[0] < TAGS_MAX_AGE:
                return cached[1]
        tags, token = {}, None
        while True:
            page = self.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}],
                                          **({"NextToken": token} if token else {}))
            tags.update({t["Key"]: t["Value"] for t in page["Tags"]})
            token = page.get("NextToken")
            if not token:
                break
        with self.tags_lock:
            self.tags[instance_id] = (now, tags)
        return tags

    def states(self):
        g = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[self.group])["AutoScalingGroups"]
        return {i["InstanceId"]: i["LifecycleState"] for i in (g[0]["Instances"] if g else [])}

    def imds_instance(self, ip):
        """The instance the box's IMDS answers for a caller's address (each host has its own)."""
        host = self.host_by_ip(ip)
        if host is None:
            return None
        return kit_imds.Instance(
            id=host.id, role=self.box["role_name"], creds=host.creds, region=REGION, ip=host.ip,
            token=host.token, tags=lambda: self.instance_tags(host.id),
            lifecycle_state=lambda: self.last_states.get(host.id))

    def boot(self, host):
        try:
            host.boot()
            print(f"{time.strftime('%H:%M:%S')} {host.id}: host {host.ns} {host.ip} booted", flush=True)
        except Exception as e:  # the instance stays silent: its launch hook times out, as on EC2
            print(f"{time.strftime('%H:%M:%S')} {host.id}: boot failed: {e}", flush=True)

    def free_index(self):
        # A host still being torn down keeps its namespace, link and address until it is gone.
        used = {h.index for h in self.hosts.values()} | self.leaving
        return next(i for i in range(1, 200) if i not in used)

    def teardown(self, host):
        try:
            host.teardown()
        finally:
            with self.lock:
                self.leaving.discard(host.index)

    def free_slot(self):
        used = set(self.slots.values())
        return next(i for i in range(1, HAPROXY_SLOTS + 1) if i not in used)

    def balance(self, states):
        """Targets follow the group: registered when InService, draining for the deregistration
        delay once the instance is terminating or gone, then removed.
        https://docs.aws.amazon.com/autoscaling/ec2/userguide/attach-load-balancer-asg.html
        https://docs.aws.amazon.com/elasticloadbalancing/latest/application/load-balancer-target-groups.html#deregistration-delay"""
        now = time.monotonic()
        delay = self.box["settings"]["deregistration_delay"]
        for iid, host in list(self.hosts.items()):
            state = states.get(iid)
            current = self.lb.get(iid)
            if state == "InService" and host.ready and current is None:
                slot = self.free_slot()
                self.slots[iid] = slot
                srv = f"app/h{slot}"
                # A new target starts unhealthy and serves once it passed HealthyThresholdCount
                # checks (`initial`, then `healthy`). In this order and in one command line:
                # `health down` before `state ready` is lost, and the target would serve at once.
                haproxy_cmd(f"set server {srv} addr {host.ip} port {self.box['settings']['app_port']}; "
                            f"set server {srv} state ready; set server {srv} health down")
                self.lb[iid] = "ready"
                self.registered[iid] = (now, False)
                print(f"{time.strftime('%H:%M:%S')} {iid}: registered as {srv} ({host.ip})", flush=True)
            elif current == "ready" and (state is None or state.startswith("Terminating")):
                haproxy_cmd(f"set server app/h{self.slots[iid]} state drain")
                self.lb[iid] = ("drain", now)
                print(f"{time.strftime('%H:%M:%S')} {iid}: deregistering (draining {delay} s)", flush=True)
            elif isinstance(current, tuple) and now - current[1] >= delay:
                haproxy_cmd(f"set server app/h{self.slots[iid]} state maint")
                self.lb[iid] = "maint"

    def target_states(self, servers, now):
        """The target group's view of each registered instance, from HAProxy's: `healthy` while
        HAProxy sends it traffic, `initial` until it passed its first checks (or failed
        UnhealthyThresholdCount of them), then `unhealthy` when HAProxy took it out, `draining`
        while it deregisters; a removed target is left out (`unused`).
        https://docs.aws.amazon.com/elasticloadbalancing/latest/application/target-group-health-checks.html"""
        s = self.box["settings"]
        first_checks = s["unhealthy"] * s["interval"] + s["timeout"]
        out = {}
        for iid, lb in self.lb.items():
            if isinstance(lb, tuple):
                out[iid] = "draining"
                continue
            if lb != "ready" or iid not in self.slots:
                continue
            _, op, _ = servers.get(f"h{self.slots[iid]}", (None, 0, 0))
            since, seen_up = self.registered.get(iid, (now, False))
            if op == 2:
                self.registered[iid] = (since, True)
                out[iid] = "healthy"
            elif seen_up or now - since >= first_checks:
                out[iid] = "unhealthy"
            else:
                out[iid] = "initial"
        return out

    def report_health(self):
        """Feed the load balancer's view back to the emulator: with the group's HealthCheckType
        ELB the emulator replaces an instance reported unhealthy after the grace period
        (testbed/emulator/health.py), as Auto Scaling does with the ALB's target health."""
        targets = self.target_states(lb_servers(), time.monotonic())
        if targets == self.reported:
            return
        req = urllib.request.Request(
            f"{ENDPOINT}/skiff-emulator/target-health", method="POST",
            data=json.dumps({"group": self.group, "region": REGION, "targets": targets}).encode())
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
        changed = {i: st for i, st in targets.items() if (self.reported or {}).get(i) != st}
        print(f"{time.strftime('%H:%M:%S')} target health: {changed}", flush=True)
        self.reported = targets

    def loop(self):
        while not self.stop.is_set():
            try:
                states = self.states()  # also advances the emulator's lazy hook and refresh clocks
            except Exception as e:
                print(f"describe failed: {e}", flush=True)
                self.stop.wait(1)
                continue
            self.last_states = states
            with self.lock:
                for iid, state in states.items():
                    if iid not in self.hosts and not state.startswith("Terminat"):
                        host = Host(self.box, iid, self.free_index())
                        self.hosts[iid] = host
                        print(f"{time.strftime('%H:%M:%S')} {iid}: {state}, booting {host.ns} ({host.ip})", flush=True)
                        threading.Thread(target=self.boot, args=(host,), daemon=True).start()
            try:
                self.balance(states)
                self.report_health()
            except OSError as e:
                print(f"haproxy or target health: {e}", flush=True)
            with self.lock:
                for iid in [i for i in self.hosts if i not in states]:
                    # Gone from the group (its terminate hook answered or timed out): torn down
                    # once the load balancer let it go.
                    if self.lb.get(iid) in (None, "maint"):
                        host = self.hosts.pop(iid)
                        self.lb.pop(iid, None)
                        self.slots.pop(iid, None)
                        self.registered.pop(iid, None)
                        print(f"{time.strftime('%H:%M:%S')} {iid}: terminated, tearing down {host.ns}", flush=True)
                        self.leaving.add(host.index)
                        threading.Thread(target=self.teardown, args=(host,), daemon=True).start()
            self.stop.wait(0.5)


def controller(args):
    box = load_box()
    if not box:
        raise BoxError("no box: box.py up")
    ctl = Controller(box)
    signal.signal(signal.SIGTERM, lambda *a: ctl.stop.set())
    # IMDSv2 for every host, told apart by the caller's address.
    kit_imds.Server((GATEWAY, IMDS_PORT), ctl.imds_instance)
    print(f"{time.strftime('%H:%M:%S')} controller following group {ctl.group}", flush=True)
    ctl.loop()
    return 0


def controller_alive():
    try:
        with open(os.path.join(RUN_DIR, "controller.pid")) as f:
            return alive(int(f.read()))
    except (OSError, ValueError):
        return False


def group_states(box):
    try:
        return Controller(box).states()
    except Exception as e:
        return f"unknown ({e})"


# --- down ----------------------------------------------------------------------------------

def down(args):
    """Everything `up` may have left, whether or not box.json says so."""
    kill_pidfile(os.path.join(RUN_DIR, "controller.pid"), 10, "box.py")
    hosts_run = os.path.join(RUN_DIR, "hosts")
    hosts_data = os.path.join(STATE, "hosts")
    ids = set(os.listdir(hosts_run) if os.path.isdir(hosts_run) else []) | set(
        os.listdir(hosts_data) if os.path.isdir(hosts_data) else [])
    namespaces = [n.split()[0] for n in run("ip", "netns", "list", check=False).stdout.splitlines()
                  if n.startswith("skf-")]
    for iid in ids:
        teardown_host("", "", os.path.join(hosts_run, iid), os.path.join(hosts_data, iid))
    for ns in namespaces:
        teardown_host(ns, "", "", "")
    for link in run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = link.split(":")[1].strip().split("@")[0]
        if name.startswith("skfv"):
            run("ip", "link", "del", name, check=False)
    kill_pidfile(os.path.join(RUN_DIR, "haproxy.pid"), 10, "haproxy")
    kill_pidfile(os.path.join(RUN_DIR, "emulator.pid"), 10, "server.py")
    run("ip", "link", "del", BRIDGE, check=False)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    forget_images()
    if os.path.isdir(STATE):
        for name in ("controller.log", "emulator.log", "ctl.log"):
            if os.path.exists(os.path.join(STATE, name)):
                os.makedirs(os.path.join(STATE, "logs"), exist_ok=True)
                os.replace(os.path.join(STATE, name), os.path.join(STATE, "logs", name))
        for name in os.listdir(STATE):
            if name != "logs":
                p = os.path.join(STATE, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    left = leftovers()
    if left:
        say(f"down: LEFT BEHIND: {'; '.join(left)}")
        return 1
    say(f"down: no namespaces, engines, agents, haproxy or emulator of the box left "
        f"(its logs: {STATE}/logs, until the next up)")
    return 0


def leftovers():
    """What of a box is still on the machine: namespaces, links, the bridge, processes, mounts."""
    left = [f"namespace {n.split()[0]}" for n in run("ip", "netns", "list", check=False).stdout.splitlines()
            if n.startswith("skf-")]
    for link in run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = link.split(":")[1].strip().split("@")[0]
        if name.startswith("skfv") or name == BRIDGE:
            left.append(f"link {name}")
    marks = (RUN_DIR.encode(), os.path.join(STATE, "hosts").encode(), os.path.join(STATE, "haproxy.cfg").encode(),
             b"emulator-admin.json", os.path.join(HERE, "box.py").encode() + b"\0controller")
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if any(m in cmd for m in marks) and int(pid) != os.getpid():
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
            left.append(f"process {pid} {shown}")
    with open("/proc/mounts") as f:
        left += [f"mount {line.split()[1]}" for line in f
                 if line.split()[1].startswith((RUN_DIR + "/", os.path.join(STATE, "hosts") + "/"))]
    return left


def forget_images():
    """Delete the box's tags (REPO only) from the registry the ECR-shaped host serves; the
    registry's garbage collection, not run here, frees the blobs."""
    base = f"http://{LOCAL_REGISTRY}/v2/{REPO}"
    try:
        with urllib.request.urlopen(f"{base}/tags/list", timeout=5) as r:
            tags = json.load(r).get("tags") or []
    except (OSError, ValueError):
        return
    accept = "application/vnd.docker.distribution.manifest.v2+json"
    for tag in tags:
        try:
            req = urllib.request.Request(f"{base}/manifests/{tag}", method="HEAD", headers={"Accept": accept})
            with urllib.request.urlopen(req, timeout=5) as r:
                digest = r.headers.get("Docker-Content-Digest")
            if digest:
                urllib.request.urlopen(urllib.request.Request(f"{base}/manifests/{digest}", method="DELETE"),
                                       timeout=5).close()
        except OSError:
            pass


def status(args):
    box = load_box()
    if not box:
        say("no box (box.py up)")
        return 1
    print(f"controller: {'running' if controller_alive() else 'NOT running'}")
    print(f"group {box['outputs']['AutoScalingGroup']}: {group_states(box)}")
    print(f"load balancer targets up: {lb_up()}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--instances", type=int, default=int(os.environ.get("FLEET_INSTANCES", 3)))
    u.add_argument("--boot-delay", type=float, default=float(os.environ.get("FLEET_BOOT_DELAY", 2)),
                   help="seconds before an instance's user data runs (25 models AL2023's launch)")
    u.add_argument("--tag", default=os.environ.get("FLEET_TAG", "v1"), help="the initial release")
    u.add_argument("--timeout", type=float, default=180)
    b = sub.add_parser("base", help="bridge and emulator only, for a stack made elsewhere (then adopt)")
    b.add_argument("--boot-delay", type=float, default=float(os.environ.get("FLEET_BOOT_DELAY", 2)))
    a = sub.add_parser("adopt", help="follow STACK (created in the box's emulator) as the box's fleet")
    a.add_argument("stack")
    a.add_argument("--instances", type=int, default=2, help="instances that must serve before it returns")
    a.add_argument("--timeout", type=float, default=240)
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("env")
    sub.add_parser("controller")
    d = sub.add_parser("imds-delay", help="CreateTags -> visible in a host's IMDS, in seconds")
    d.add_argument("--samples", type=int, default=10)
    pu = sub.add_parser("push")
    pu.add_argument("tag")
    pu.add_argument("--unhealthy", action="store_true", help="an image whose /health never passes")
    pu.add_argument("--app", choices=APPS, default=None, help="the test app (default: the box's, FLEET_APP)")
    pu.add_argument("--fail-after", type=float, default=None,
                    help="graceful app: /health fails this many seconds after its first pass")
    args = ap.parse_args()
    if args.cmd == "up" and not 1 <= args.instances <= 6:
        print("fleet: --instances must be 1..6 (2 cores)", file=sys.stderr)
        return 64
    if os.geteuid() != 0:
        print("fleet: run as root (network namespaces, dockerd)", file=sys.stderr)
        return 1
    try:
        if args.cmd == "push":
            print(push_image(args.tag, healthy=not args.unhealthy, app=args.app, fail_after=args.fail_after))
            return 0
        if args.cmd == "imds-delay":
            box = load_box()
            if not box or not controller_alive():
                raise BoxError("no box: make fleet")
            iid = sorted(Controller(box).states())[0]
            d = sorted(x for x in imds_tag_delay(box, iid, args.samples) if x is not None)
            print(f"{iid}: {len(d)}/{args.samples} seen; min {d[0]:.3f} s, median {d[len(d) // 2]:.3f} s,"
                  f" max {d[-1]:.3f} s (the box's IMDS caches tags {TAGS_MAX_AGE} s)" if d else "never seen")
            return 0 if len(d) == args.samples else 1
        if args.cmd == "env":
            box = load_box()
            if not box:
                raise BoxError("no box: make fleet")
            for k, v in ctl_env(box).items():
                print(f"export {k}={v}")
            return 0
        return {"up": up, "down": down, "status": status, "controller": controller, "base": base,
                "adopt": adopt}[args.cmd](args)
    except BoxError as e:
        print(f"fleet: {e}", file=sys.stderr)
        if args.cmd in ("up", "base"):
            down(args)  # nothing half up is left behind; the logs stay for reading
        return 1


if __name__ == "__main__":
    sys.exit(main())
