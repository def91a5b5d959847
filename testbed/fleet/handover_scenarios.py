"""Scenarios 15-21: the in-place strategy with SwapMode handover on the graceful app (the new
container takes the port before the old one stops): release, failing release, agent killed,
ctl stopped, rollback, and the 6-instance bench."""

import json
import math
import os
import re
import signal
import threading
import time
import images  # noqa: E402
import loadbalancer  # noqa: E402
import network  # noqa: E402
import settings  # noqa: E402
from load import ProcessLoad  # noqa: E402

from scenario import agent_answers, auto_scaling_quiet, ctl_stream, host_ip, parameter, Scenario, served, skiff_tags, stack_instances, tag_part, URL, Watch
from kit.waits import wait_until  # noqa: E402


# --- handover (issue 17): the new container on the idle slot, the redirect flipped -----------

HANDOVER_BENCH = []  # (what, instances, wall s, floor s or None, failed requests, terms)
HANDOVER_LOAD = []  # how the handover scenarios' load was made, for the table
# Each request holds 20 ms in the graceful app: at 200/s some are always in flight when an old
# container gets its SIGTERM.
HANDOVER_PATH = "/?sleep=0.02"


def host_ns(iid):
    """The host's namespace: skf-N holds 10.201.0.(10+N) (box.py Host)."""
    ip = host_ip(iid)
    return f"skf-{int(ip.rsplit('.', 1)[1]) - 10}" if ip else None


def app_containers(iid):
    """The host's running containers: [(id, PORT from its environment)]."""
    sock = f"unix://{os.path.join(settings.RUN_DIR, 'hosts', iid, 'docker.sock')}"
    ids = settings.run("docker", "-H", sock, "ps", "-q", check=False).stdout.split()
    out = []
    for cid in ids:
        p = settings.run("docker", "-H", sock, "inspect", "-f", "{{json .Config.Env}}", cid, check=False)
        try:
            env = json.loads(p.stdout or "[]")
        except ValueError:
            env = []
        out.append((cid[:12], next((e[5:] for e in env if e.startswith("PORT=")), None)))
    return out


def handover_settled(box, ids, timeout=30):
    """Wait until every host runs one container (the old one got its SIGTERM `hold` after the
    flip and exits within its grace); returns (settled, seconds waited)."""
    t = time.monotonic()
    ok = wait_until(lambda: all(len(app_containers(i)) == 1 for i in ids), timeout, 0.5)
    return bool(ok), time.monotonic() - t


def check_redirects(sc, box, ids):
    """Each host: one app container running, and the agent's redirect sends the app port to the
    slot that container listens on (its PORT)."""
    port = box["settings"]["app_port"]
    slots = []
    for i in ids:
        running = app_containers(i)
        red = network.host_redirect(host_ns(i))
        ports = [p for _, p in running]
        sc.check(len(running) == 1 and str(red.get(port)) in ports,
                 f"{i}: running {running}, redirect {red} (want one container, :{port} -> its PORT)")
        slots.append(red.get(port))
    return slots


class TargetView:
    """HAProxy's own view of the instances' targets across a scenario: its counters (`show stat`)
    at the start and at the end (UP -> DOWN transitions, failed checks, 5xx, response and
    connection errors per server), beside the Watch's samples every 0.5 s."""

    def __init__(self, ids):
        self.ids = ids
        self.before = self.snapshot()

    def snapshot(self):
        stats, servers = loadbalancer.lb_stats(), loadbalancer.lb_servers()
        out = {}
        for i in self.ids:
            ip = host_ip(i)
            name = next((n for n, (addr, _, admin) in servers.items() if addr == ip and not admin & 0x3B), None)
            if name in stats:
                out[i] = stats[name]
        return out

    def check(self, sc, watch, t0):
        after = self.snapshot()
        notes = []
        for i in self.ids:
            b, a = self.before.get(i), after.get(i)
            if not (b and a):
                sc.check(False, f"{i}: no HAProxy server for it (start {bool(b)}, end {bool(a)})")
                continue
            d = {k: int(a.get(k) or 0) - int(b.get(k) or 0) for k in ("chkdown", "chkfail", "hrsp_5xx", "eresp", "econ")}
            sc.check(d["chkdown"] == 0 and a["status"].startswith("UP"),
                     f"{i}: HAProxy took the target out ({d['chkdown']} UP -> DOWN, status now {a['status']})")
            out = [round(t - t0, 1) for t, v in watch.changes(i, "lb", t0) if not v]
            sc.check(not out, f"{i}: HAProxy did not send it traffic at +{out} s")
            if any(d.values()):
                notes.append(f"{i}: " + ", ".join(f"{k} +{v}" for k, v in d.items() if v))
        return "every target UP in HAProxy throughout" + (f" ({'; '.join(notes)})" if notes else " (0 failed checks)")


def handover_load(rate):
    """Keep-alive clients at `rate` through the load balancer, in a process of their own."""
    HANDOVER_LOAD[:] = [f"{rate:g}/s keep-alive on 64 connections, GET {HANDOVER_PATH}"]
    return ProcessLoad(URL.rstrip("/") + HANDOVER_PATH, rate, keepalive=True, connections=64).start()


def agent_hold():
    """[app] hold of the agents' rendered config (5 s when absent, the agent's default)."""
    hosts = os.path.join(settings.STATE, "hosts")
    for iid in sorted(os.listdir(hosts)) if os.path.isdir(hosts) else []:
        try:
            with open(os.path.join(hosts, iid, "etc-skiff", "agent.toml")) as f:
                m = re.search(r'(?m)^hold\s*=\s*"(\d+)s"', f.read())
            return float(m.group(1)) if m else 5.0
        except OSError:
            continue
    return 5.0


def ctl_batches(lines, after_t=0.0):
    """The batches as ctl ran them, from its progress lines (`in-place: batch k/N: switch i-a
    i-b to T`): [(t, [instances])]. Handover batches follow each other within a second or two,
    too fast to tell apart by the tags' timing (Watch.batches)."""
    out = []
    for t, x in lines:
        m = re.search(r"in-place: batch \d+/\d+: switch (.+?) to \S+", x)
        if m and t >= after_t:
            out.append((t, m.group(1).split()))
    return out


def handover_floor(watch, tag, bake, after, lines=None):
    """The floor of a handover release: the slowest pull (all at once), then per batch the
    slowest start-to-healthy (the agent's gate on the slot) and the bake, and the agents' hold
    after the last batch beyond the bake (ctl watches the last batch that long for a flip back:
    ctl/src/inplace.rs HANDOVER_HOLD). No load-balancer term: the target never changes state."""
    batches = ctl_batches(lines) if lines else watch.batches(tag, after)
    known = [watch.pull_ms[(i, tag)] for i in watch.ids if (i, tag) in watch.pull_ms]
    per = []
    for _, ids in batches:
        starts = [watch.start_ms[(i, tag)] for i in ids if (i, tag) in watch.start_ms]
        per.append(max(starts) / 1000 if starts else None)
    if not known or not per or None in per:
        return None, f"floor unknown: pulls {known}, start-to-healthy per batch {per}"
    pull = max(known) / 1000
    hold = max(agent_hold() - bake, 0)
    floor = pull + sum(x + bake for x in per) + hold
    return floor, (f"floor {floor:.1f} s = pull {pull:.1f} + {len(per)} batch(es) x (start-to-healthy "
                   f"{'/'.join(f'{x:.1f}' for x in per)} + bake {bake:g}) + the last batch's hold {hold:g}")


def handover_run(box, rate, ids, ctl_args, on_watch=None, **kw):
    """ctl under the keep-alive load, the load kept on until every old container exited (its
    SIGTERM comes `hold` after the flip, possibly after ctl's end: the pooled connections close
    then) + 1 s. Returns (rc, lines, took, killed, counts, watch, view, t0, settle seconds)."""
    view = TargetView(ids)
    watch = Watch(box, ids).start()
    if on_watch:
        on_watch(watch)
    load = handover_load(rate)
    t0 = time.monotonic()
    try:
        rc, lines, took, killed = ctl_stream(box, *ctl_args, **kw)
        settled, waited = handover_settled(box, ids)
        time.sleep(1)
    finally:
        counts = load.stop()
        watch.stop()
    return rc, lines, took, killed, counts, watch, view, t0, (settled, waited)


def handover_common(sc, box, ids, watch, view, t0, counts, settled):
    auto_scaling_quiet(sc, watch, t0)
    sc.check(settled[0], f"old containers still running {settled[1]:.0f} s after ctl: "
                         f"{ {i: app_containers(i) for i in ids} }")
    slots = check_redirects(sc, box, ids)
    targets = view.check(sc, watch, t0)
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure}; "
                                 f"statuses {dict(counts.statuses)})")
    return targets, slots


def handover_release(box, rate, tag, n, number, rollback_to=None, bake=0):
    """Scenarios 15, 18 and 21: a handover release (or `ctl rollback`) on n instances under the
    keep-alive load: exit 0, every instance kept and on the release, every target UP in HAProxy
    throughout, each host on one container the redirect points at, 0 failed requests."""
    previous = parameter(box)[0]
    target = rollback_to or tag
    sc = Scenario(number, f"handover {'rollback' if rollback_to else 'release'} {previous} -> {target} on {n} instances")
    if not rollback_to:
        images.push_image(tag)
    ids = stack_instances(box)
    sc.check(len(ids) == n, f"{len(ids)} instances InService, not {n}")
    args = (("rollback", "--strategy", "in-place") if rollback_to else
            ("release", "--tag", tag, "--strategy", "in-place", "--bake", f"{bake}s"))
    rc, lines, took, _, counts, watch, view, t0, settled = handover_run(box, rate, ids, args)
    out = "\n".join(x for _, x in lines)
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == target, f"parameter holds {parameter(box)[1]}")
    sc.check(set(stack_instances(box)) == set(ids), f"instances changed: {ids} -> {stack_instances(box)}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == target for i in ids),
             f"skiff:release: {[tags[i].get('skiff:release') for i in ids]}")
    targets, slots = handover_common(sc, box, ids, watch, view, t0, counts, settled)
    now = served()
    sc.check(set(now) == {target}, f"the load balancer serves {now}")
    floor, terms = handover_floor(watch, target, bake, t0, lines)
    batches = ctl_batches(lines)
    # a switch line read after the agent already reported the release (the line is timed when
    # ctl's output is read) counts as 0
    per_batch = [max(max((watch.first(i, "serving", target, t - 2) or math.nan) - t, 0) for i in ids_)
                 for t, ids_ in batches]
    ratio = f"{took / floor:.2f}x the floor" if floor else "ratio unknown"
    sc.figures += [f"ctl {took:.1f} s, {ratio}; {terms}",
                   f"batches {[len(b) for _, b in batches]}, switch line -> serving (agent): "
                   f"{', '.join(f'{x:.1f}' for x in per_batch)} s",
                   f"old containers gone {settled[1]:.1f} s after ctl; slots now {slots}", targets, counts.line()]
    HANDOVER_BENCH.append((f"handover {'rollback ' if rollback_to else ''}{previous} -> {target}", n, took, floor,
                           counts.failed, terms))
    sc.done()
    return previous


def handover_failing(box, rate, bad, n, number, fail_after=None):
    """Scenarios 16 and 17: a release that never passes the gate on its slot (16: only the
    canary told, the bad release serves nothing), or passes it and fails `fail_after` s later,
    within the hold (17: the canary's agent flips back by itself and answers skiff:failed; ctl
    may have told later batches meanwhile, the canary being done once it reported the release
    healthy, and reverts them). Both: ctl exit 1 (ctl/README: failed, previous release back),
    parameter back, every instance on the previous release and one container, every target UP
    in HAProxy throughout, 0 failed requests."""
    good = parameter(box)[0]
    what = "never passes its gate" if fail_after is None else f"fails {fail_after:g} s after its gate"
    sc = Scenario(number, f"handover release {bad} that {what}")
    images.push_image(bad, healthy=fail_after is not None, fail_after=fail_after)
    ids = stack_instances(box)
    rc, lines, took, _, counts, watch, view, t0, settled = handover_run(
        box, rate, ids, ("release", "--tag", bad, "--strategy", "in-place"))
    out = "\n".join(x for _, x in lines)
    batches = watch.batches(bad, t0)
    touched = [i for _, b in batches for i in b]
    sc.check(rc == 1, f"ctl exit {rc}, documented 1 (failed, previous release back): {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == good, f"parameter holds {parameter(box)[1]}, not {good}")
    told_at = sorted((t, i) for t, i, w, v in watch.events if w == "skiff:target" and tag_part(v) == bad and t > t0)
    canary = told_at[0][1] if told_at else None
    if fail_after is None:
        sc.check(len(touched) == 1, f"told {bad}: {[(round(t - t0, 1), b) for t, b in batches]} (expected the canary)")
    else:
        flipped_back = next((t for t, v in watch.changes(canary, "skiff:failed", t0) if tag_part(v) == bad), None)
        logged = [v for v in agent_answers(canary, "skiff:failed") if tag_part(v) == bad] if canary else []
        sc.check(flipped_back is not None or logged,
                 f"the canary {canary} never answered skiff:failed={bad} (its agent's flip back): "
                 f"not in the watch, not in its agent's log")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == good for i in ids), f"skiff:release: {tags}")
    for i in ids:
        if i not in touched:
            sc.check(not watch.changes(i, "serving", t0), f"{i} (not in the first batch) changed: "
                                                         f"{watch.changes(i, 'serving', t0)}")
    if fail_after is None:
        sc.check(bad not in counts.releases, f"{bad} served {counts.releases[bad]} responses")
    targets, slots = handover_common(sc, box, ids, watch, view, t0, counts, settled)
    now = served()
    sc.check(set(now) == {good}, f"the load balancer serves {now}")
    for i in touched:
        told = next((t for t, v in watch.changes(i, "skiff:target", t0) if tag_part(v) == bad), None)
        failed = next((t for t, v in watch.changes(i, "skiff:failed", t0) if tag_part(v) == bad), None)
        on_bad = watch.first(i, "serving", bad, t0)
        back = watch.first(i, "serving", good, on_bad or told or t0)
        def rel(x):
            return f"+{x - t0:.1f} s" if x else "never"
        sc.figures.append(f"{i}: told {rel(told)}, serving {bad} (agent) {rel(on_bad)}, skiff:failed "
                          f"{rel(failed)}, serving {good} again {rel(back) if on_bad else 'throughout'}")
    line = next((x for _, x in lines if "in-place" in x and re.search(r"fail|revert", x, re.I)), None)
    sc.figures += [f"ctl exit {rc} after {took:.1f} s; told {len(told_at)} instance(s), canary {canary}",
                   f"{bad} served {counts.releases.get(bad, 0)} responses",
                   targets, counts.line()] + ([f"line: {line.strip()[:140]}"] if line else [])
    sc.done()


def handover_agent_killed(box, rate, tag, n):
    """Scenario 19: agents SIGKILLed mid-swap, restarted as systemd would: the canary's before
    the flip (the new container runs beside the old one and the redirect still names the old
    slot; the release is slow to pass /health, 3 s, so that the kill lands there), the next
    instance's after the flip, during the hold (both containers run, the redirect names the new
    slot). Each restarted agent finds its swap and finishes it (gate, flip) or undoes it; the
    release completes (exit 0), 0 failed requests, every target UP in HAProxy throughout (the
    redirect is kernel state: it serves while the agent is away)."""
    sc = Scenario(19, f"agents SIGKILLed mid-handover -> {tag}, before and after the flip")
    images.push_image(tag, slow_start=3)
    ids = stack_instances(box)
    killed, holder = [], []
    stop = threading.Event()
    port = box["settings"]["app_port"]

    def killer():
        # 1st kill: two containers and the redirect on the old one's PORT (before the flip);
        # 2nd, on another instance: two containers and the redirect on the new one's (the hold).
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline and len(killed) < 2:
            for i in ids:
                if not holder or tag_part(holder[0].last.get((i, "skiff:target"))) != tag or i in [k[0] for k in killed]:
                    continue
                running = app_containers(i)
                if len(running) < 2:
                    continue
                red = network.host_redirect(host_ns(i)).get(port)
                newest = running[0][1]  # docker ps lists the newest first
                if (str(red) != newest) == (not killed):
                    with open(os.path.join(settings.RUN_DIR, "hosts", i, "agent.pid")) as f:
                        os.kill(int(f.read()), signal.SIGKILL)
                    killed.append((i, time.monotonic(), running, red, "before the flip" if not killed else "during the hold"))
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rc, lines, took, _, counts, watch, view, t0, settled = handover_run(
            box, rate, ids, ("release", "--tag", tag, "--strategy", "in-place"), on_watch=holder.append)
    finally:
        stop.set()
        t.join(5)
    out = "\n".join(x for _, x in lines)
    sc.check(len(killed) == 2, f"agents caught mid-swap and killed: {[(k[0], k[4]) for k in killed]} (want one "
                               "before the flip and one during the hold)")
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == tag for i in ids), f"skiff:release: {tags}")
    targets, slots = handover_common(sc, box, ids, watch, view, t0, counts, settled)
    now = served()
    sc.check(set(now) == {tag}, f"the load balancer serves {now}")
    for i, at, running, red, when in killed:
        sc.figures.append(f"killed the agent of {i} {when} at +{at - t0:.1f} s ({len(running)} containers on "
                          f"PORTs {[p for _, p in running]}, the redirect on :{red})")
    sc.figures += [f"ctl exit {rc} after {took:.1f} s", targets, counts.line()]
    sc.done()


def handover_ctl_stopped(box, rate, tag, n):
    """Scenario 20: ctl SIGTERMed (a Jenkins abort) once the first batch's instance reports the
    release: ctl tells the switched instances the previous release, waits until they report it,
    writes it back and exits 1 (ctl/README, Signals); 0 failed requests, every target UP in
    HAProxy throughout."""
    good = parameter(box)[0]
    sc = Scenario(20, f"ctl SIGTERMed mid handover release -> {tag}")
    images.push_image(tag)
    ids = stack_instances(box)
    holder = []

    def switched(lines):
        return bool(holder and any(holder[0].last.get((i, "skiff:release")) == tag for i in ids))

    rc, lines, took, stopped, counts, watch, view, t0, settled = handover_run(
        box, rate, ids, ("release", "--tag", tag, "--strategy", "in-place"), on_watch=holder.append,
        kill_when=switched, sig=signal.SIGTERM)
    out = "\n".join(x for _, x in lines)
    first = [i for i in ids if watch.first(i, "skiff:release", tag, t0)]
    sc.check(stopped, f"ctl was not stopped (exit {rc}): {out.strip()[-400:]}")
    sc.check(rc == 1, f"ctl exit {rc}, documented 1 after a signal (previous release back): {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == good, f"parameter holds {parameter(box)[1]}, not {good}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == good for i in ids), f"skiff:release: {tags}")
    targets, slots = handover_common(sc, box, ids, watch, view, t0, counts, settled)
    now = served()
    sc.check(set(now) == {good}, f"the load balancer serves {now}")
    sc.figures += [f"SIGTERM once {first} ran {tag}; ctl exit {rc} after {took:.1f} s", targets, counts.line()]
    sc.done()
