"""The load balancer: HAProxy standing in for the ALB, its configuration (one server slot per
host, health checked like the target group) and its runtime view through the stats socket."""

import os
import socket

from settings import BoxError, GATEWAY, HAPROXY_SLOTS, LB_PORT, run, RUN_DIR, STACK, STATE
from kit.waits import wait_until  # noqa: E402


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
        row = dict(zip(fields, line.split(","), strict=False))
        if row.get("pxname") == "app" and row.get("svname") not in ("BACKEND", "FRONTEND", None):
            out[row["svname"]] = row
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
