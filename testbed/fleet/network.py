"""The box's network: the bridge skfbr0 standing in for the VPC's private subnets, each host's
network namespace torn down with what runs in it, and a host's port redirect to its app."""

import os
import re
import shutil
import signal

from settings import BRIDGE, GATEWAY, kill_pidfile, run, STATE


# --- up ------------------------------------------------------------------------------------

def bridge_up():
    if run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")


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
