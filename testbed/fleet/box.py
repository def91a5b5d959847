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
    ECR-shaped host name 123456789012.dkr.ecr.us-east-1.amazonaws.com serves, and signed
    (`ctl sign --key-file`) with a P-256 key made for this box (openssl); the stack trusts its
    public key (TrustedKeys), so ctl and every agent check each release's signature;
  * a controller process (`box.py controller`) that follows the group's instances in the
    emulator: for each one it boots a host (after --boot-delay): a network namespace with its own
    address, its own dockerd, a per-instance IMDSv2 and the real agent with the config the
    launch template's user data writes; an instance that left the group is torn down; HAProxy
    (the ALB) gets the InService instances as targets, health checked like the target group.

Exit codes: 0 done, 1 failed (the message says what to do), 64 bad arguments.

This file is the command line and the box's up/adopt/down; the parts, one module each:
settings.py (addresses, paths, box.json, run/say), network.py (bridge, namespaces),
loadbalancer.py (HAProxy), controller.py (hosts, IMDS, target health), stack.py (the box's
emulator and app stack), images.py (the test app's images); testbed/kit for what the testbed shares.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

from controller import Controller, controller, controller_alive, group_states, imds_tag_delay
from images import APPS, digest_of, forget_images, new_signing_key, push_image, SIGNING_KEY
from loadbalancer import lb_up, write_haproxy_config
from network import bridge_up, teardown_host
from settings import admin_clients, binary, BOX_FILE, BoxError, BRIDGE, CI_HOME, ECR_HOST, ENDPOINT, HERE, kill_pidfile, LB_PORT, load_box, LOCAL_REGISTRY, PY, REGION, REGISTRY_CA, REPO, ROOT, run, RUN_DIR, save_box, say, STACK, STATE, TAGS_MAX_AGE, TEMPLATE
from stack import create_stack, start_emulator, swap_mode, template_settings
from kit.waits import wait_until  # noqa: E402


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
    # Signed releases (issue 20): a new key per box; the stack trusts its public key, so ctl and
    # every agent check that each release is signed by it; every image the box pushes is.
    trusted_keys = new_signing_key()
    say(f"pushing and signing the test image {ECR_HOST}/{REPO}:{tag} ({app} app; key {SIGNING_KEY})")
    push_image(tag, app=app)
    bridge_up()
    say(f"starting the emulator (IAM enforced) on {ENDPOINT}")
    admin = start_emulator()
    box = {"admin": admin, "agent": agent, "ctl": ctl, "boot_delay": args.boot_delay, "initial_tag": tag,
           "app": app, "signing_key": SIGNING_KEY}
    extra = {"TrustedKeys": trusted_keys}
    if os.environ.get("FLEET_SWAP_MODE"):
        # the stack parameter SwapMode (handover | drain), when the template has it
        extra["SwapMode"] = os.environ["FLEET_SWAP_MODE"]
    say(f"creating stack {STACK} from templates/app.yaml ({args.instances} instances)")
    box.update(create_stack(admin_clients(box), tag, args.instances, extra, digest=digest_of(tag)))
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
            # The stack names release alarms nobody feeds here: no 4-minute bake or watch for
            # them (ctl/tests/inplace.rs tests the window).
            "SKIFF_ALARM_WINDOW": "0s",
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
    pu.add_argument("--unsigned", action="store_true",
                    help="not signed with the box's key (its hosts and ctl refuse it)")
    args = ap.parse_args()
    if args.cmd == "up" and not 1 <= args.instances <= 6:
        print("fleet: --instances must be 1..6 (2 cores)", file=sys.stderr)
        return 64
    if os.geteuid() != 0:
        print("fleet: run as root (network namespaces, dockerd)", file=sys.stderr)
        return 1
    try:
        if args.cmd == "push":
            print(push_image(args.tag, healthy=not args.unhealthy, app=args.app, fail_after=args.fail_after,
                             signed=not args.unsigned))
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
