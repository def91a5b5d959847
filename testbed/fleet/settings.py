"""The box's settings (addresses, ports, paths, the stack's name), its state file (box.json)
and the helpers every part of the box uses: `run` a command, `say`, stop a process by pidfile."""

import json
import os
import signal
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "templates"))
sys.path.insert(0, os.path.join(ROOT, "testbed"))
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


def save_box(box):
    with open(BOX_FILE + ".new", "w") as f:
        json.dump(box, f, indent=1)
    os.chmod(BOX_FILE + ".new", 0o600)
    os.replace(BOX_FILE + ".new", BOX_FILE)


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
