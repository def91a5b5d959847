"""Scenarios 10-14: the in-place strategy (ctl tags each instance, its agent swaps the container
behind a drain), its failure, rollback and ctl killed paths, and 13, agents following the
parameter uncoordinated."""

import math
import os
import re
import time
import images  # noqa: E402
import loadbalancer  # noqa: E402
import settings  # noqa: E402
from load import Load  # noqa: E402

from scenario import agent_log, agent_metric, agent_status, auto_scaling_quiet, ctl, ctl_stream, drain_seconds, host_ip, parameter, release_of, RUN, Scenario, served, set_agent_config, skiff_tags, stack_instances, tag_part, URL, Watch, with_load
from kit.waits import wait_until  # noqa: E402
from unsigned import inplace_unsigned
INPLACE_BENCH = []  # (what, instances, wall s, floor s or None, failed requests, terms)

# When the agent's release source last answered (its /metrics): unchanged while it reads nothing.
POLLED = "skiff_agent_last_poll_success_timestamp_seconds"


def inplace_floor(box, watch, tag, bake, after):
    """The floor of an in-place release from what the box measured: the pull on every instance
    at once (the slowest, as its agent measured it), then per batch the slowest start-to-healthy
    (the agent's), the load balancer's detection of a healthy target (HealthyThresholdCount x
    interval, from the template) and the drain (the rendered config), and the bake."""
    s = box["settings"]
    batches = watch.batches(tag, after)
    pulls = [watch.pull_ms.get((i, tag)) for i in watch.ids]
    known = [p for p in pulls if p is not None]
    pull = max(known) / 1000 if known else None
    detect = s["healthy"] * s["interval"]
    drain = drain_seconds()
    per = []
    for _, ids in batches:
        starts = [watch.start_ms.get((i, tag)) for i in ids]
        start = max(x for x in starts if x is not None) / 1000 if any(x is not None for x in starts) else None
        per.append(start)
    if pull is None or any(x is None for x in per) or drain is None:
        return None, (f"floor unknown: pull {pulls}, start-to-healthy per batch {per}, drain {drain}")
    floor = pull + sum(x + detect + drain + bake for x in per)
    terms = (f"floor {floor:.1f} s = pull {pull:.1f} + {len(per)} batch(es) x (start-to-healthy "
             f"{'/'.join(f'{x:.1f}' for x in per)} + LB detection {detect} + drain {drain:.0f} + bake {bake:g})")
    return floor, terms


def lb_lag(watch, tag, after):
    """Per switched instance: the agent serving `tag` -> back in the load balancer, in seconds
    (the load balancer's detection as it happened; HAProxy's next check lands anywhere within
    the interval, so it is (HealthyThresholdCount - 1) to HealthyThresholdCount intervals)."""
    out = []
    for _, ids in watch.batches(tag, after):
        for i in ids:
            s = watch.first(i, "serving", tag, after)
            up = next((t for t, v in watch.changes(i, "lb", s) if v), None) if s else None
            if s and up:
                out.append(up - s)
    return out


def batch_times(watch, tag, after, serving_tag=None):
    """Per batch: told skiff:target -> the last of its instances in the load balancer again and
    serving the release (agent's word), in seconds."""
    out = []
    for t, ids in watch.batches(tag, after):
        ends = []
        for i in ids:
            s = watch.first(i, "serving", serving_tag or tag, t)
            lb_down = next((x for x, v in watch.changes(i, "lb", t) if not v), None)
            lb_up = next((x for x, v in watch.changes(i, "lb", lb_down or t) if v), None) if lb_down else None
            ends.append(max(x for x in (s, lb_up) if x is not None) if s or lb_up else None)
        out.append(None if None in ends else max(ends) - t)
    return out


def inplace_release(box, rate, tag, n, number, bake=0, extra=()):
    """Scenarios 8 and 9: ctl release --strategy in-place on n instances under load."""
    previous = parameter(box)[0]
    sc = Scenario(number, f"in-place release {previous} -> {tag} on {n} instances")
    images.push_image(tag)
    ids = stack_instances(box)
    sc.check(len(ids) == n, f"{len(ids)} instances InService, not {n}")
    watch = Watch(box, ids).start()
    t0 = time.monotonic()
    (rc, lines, took, _), counts = with_load(
        box, rate, lambda: ctl_stream(box, "release", "--tag", tag, "--strategy", "in-place",
                                      "--bake", f"{bake}s", *extra))
    time.sleep(1)
    watch.stop()
    out = "\n".join(x for _, x in lines)
    auto_scaling_quiet(sc, watch, t0)
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    sc.check(set(stack_instances(box)) == set(ids), f"instances changed: {ids} -> {stack_instances(box)}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == tag for i in ids),
             f"skiff:release: {[tags[i].get('skiff:release') for i in ids]}")
    sc.check(len(loadbalancer.lb_up()) == n, f"the load balancer serves {loadbalancer.lb_up()}")
    now = served()
    sc.check(set(now) == {tag}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    floor, terms = inplace_floor(box, watch, tag, bake, t0)
    per_batch = batch_times(watch, tag, t0)
    sizes = [len(b) for _, b in watch.batches(tag, t0)]
    ratio = f"{took / floor:.2f}x the floor" if floor else "ratio unknown"
    lags = lb_lag(watch, tag, t0)
    sc.figures += [f"ctl {took:.1f} s, {ratio}; {terms}",
                   "LB up after the agent's healthy: " + (", ".join(f"{x:.1f}" for x in lags) + " s" if lags else "?"),
                   f"batches {sizes}, told -> serving and in the LB: {', '.join(f'{x:.1f}' if x else '?' for x in per_batch)} s",
                   counts.line()]
    if watch.errors:
        sc.figures.append(f"watch gaps: {len(watch.errors)} ({watch.errors[0]})")
    INPLACE_BENCH.append((f"in-place {previous} -> {tag}", n, took, floor, counts.failed, terms))
    sc.done()
    return previous


def inplace_unhealthy(box, rate, bad, n):
    """Scenario 10: a release that never becomes healthy, in place: only the first batch is
    touched; its instance is back on the previous release (serving, in the load balancer) within
    15 s of the failure being known (ctl's progress line), the parameter holds it again, ctl
    exits 1 (ctl/README: failed, the previous release back), 0 failed requests."""
    good = parameter(box)[0]
    sc = Scenario(10, f"in-place release {bad} that never becomes healthy")
    images.push_image(bad, healthy=False)
    ids = stack_instances(box)
    watch = Watch(box, ids).start()
    t0 = time.monotonic()
    (rc, lines, took, _), counts = with_load(
        box, rate, lambda: ctl_stream(box, "release", "--tag", bad, "--strategy", "in-place"))
    # the reverted instance back in the load balancer (HealthyThresholdCount checks)
    batches = watch.batches(bad, t0)
    touched = [i for _, b in batches for i in b]
    wait_until(lambda: all(host_ip(i) in loadbalancer.lb_up() for i in touched), 30, 0.5)
    time.sleep(1)
    watch.stop()
    out = "\n".join(x for _, x in lines)
    auto_scaling_quiet(sc, watch, t0)
    sc.check(rc == 1, f"ctl exit {rc}, documented 1 (failed, previous release back): {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == good, f"parameter holds {parameter(box)[1]}, not {good}")
    sc.check(len(batches) == 1 and len(touched) == 1,
             f"told {bad}: {[(round(t - t0, 1), b) for t, b in batches]} (expected the first batch, 1 instance)")
    for i in ids:
        if i not in touched:
            sc.check(not watch.changes(i, "serving", t0) and not [v for _, v in watch.changes(i, "lb", t0) if not v],
                     f"{i} (not in the first batch) changed: serving {watch.changes(i, 'serving', t0)}, "
                     f"LB {watch.changes(i, 'lb', t0)}")
    failure_line = next(((t, x) for t, x in lines if "in-place" in x and re.search(r"fail|revert", x, re.I)), None)
    failed_tag = min((watch.first(i, "skiff:failed", v, t0) or math.inf for i in touched
                      for v in {v for _, ii, w, v in watch.events if ii == i and w == "skiff:failed" and tag_part(v) == bad}),
                     default=math.inf)
    back = []
    for i in touched:
        known = failure_line[0] if failure_line else None
        serving = watch.first(i, "serving", good, (batches[0][0] if batches else t0))
        lb = next((t for t, v in watch.changes(i, "lb", batches[0][0]) if v and t >= (serving or 0)), None) if batches else None
        back.append((i, known, serving, lb))
    for i, known, _serving, lb in back:
        sc.check(known is not None, f"no ctl progress line about the failure: {out.strip()[-400:]}")
        sc.check(lb is not None, f"{i} not back in the load balancer on {good}")
        if known is not None and lb is not None:
            sc.check(lb - known <= 15, f"{i} back in the LB {lb - known:.1f} s after the failure was known (> 15 s)")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == good for i in ids), f"skiff:release: {tags}")
    sc.check(bad not in counts.releases, f"{bad} served {counts.releases[bad]} responses")
    now = served()
    sc.check(set(now) == {good}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    for i, known, serving, lb in back:
        def rel(x, known=known):
            return f"{x - known:+.1f} s" if x is not None and known is not None else "?"
        sc.figures.append(f"{i}: failure known (ctl line) at +{(known or t0) - t0:.1f} s (skiff:failed at "
                          f"+{failed_tag - t0:.1f} s); serving {good} again {rel(serving)}, in the LB {rel(lb)}")
    sc.figures += [f"ctl exit {rc} after {took:.1f} s", counts.line()]
    if failure_line:
        sc.figures.append(f"line: {failure_line[1].strip()[:120]}")
    sc.done()


def inplace_rollback(box, rate, to, n):
    """Scenario 11: ctl rollback --strategy in-place after a good in-place release."""
    sc = Scenario(11, f"in-place rollback {parameter(box)[0]} -> {to}")
    ids = stack_instances(box)
    watch = Watch(box, ids).start()
    t0 = time.monotonic()
    (rc, lines, took, _), counts = with_load(box, rate, lambda: ctl_stream(box, "rollback", "--strategy", "in-place"))
    time.sleep(1)
    watch.stop()
    out = "\n".join(x for _, x in lines)
    auto_scaling_quiet(sc, watch, t0)
    sc.check(rc == 0, f"ctl exit {rc}: {out.strip()[-600:]}")
    sc.check(parameter(box)[0] == to, f"parameter holds {parameter(box)[1]}, want {to}")
    sc.check(set(stack_instances(box)) == set(ids), f"instances changed: {ids} -> {stack_instances(box)}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == to for i in ids), f"skiff:release: {tags}")
    now = served()
    sc.check(set(now) == {to}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    per_batch = batch_times(watch, to, t0)
    floor, terms = inplace_floor(box, watch, to, 0, t0)
    sc.figures += [f"ctl {took:.1f} s; per batch told -> serving and in the LB: "
                   f"{', '.join(f'{x:.1f}' if x else '?' for x in per_batch)} s (goal <= 15 s)", terms, counts.line()]
    INPLACE_BENCH.append((f"in-place rollback -> {to}", n, took, floor, counts.failed, terms))
    sc.done()


def inplace_killed(box, rate, tag, n):
    """Scenario 12: ctl SIGKILLed once the first batch switched; `ctl status` shows the
    half-switched rollout; `ctl unlock --force`; the same release again converges, skipping
    the instance already on it; 0 failed requests throughout."""
    sc = Scenario(12, f"ctl SIGKILLed mid in-place release -> {tag}, then run again")
    images.push_image(tag)
    ids = stack_instances(box)
    watch = Watch(box, ids).start()
    load = Load(URL, rate).start()
    t0 = time.monotonic()
    try:
        def switched(lines):
            return any(i for i in ids if watch.last.get((i, "skiff:release")) == tag)
        rc, lines, took, killed = ctl_stream(box, "release", "--tag", tag, "--strategy", "in-place", kill_when=switched)
        first = [i for i in ids if watch.last.get((i, "skiff:release")) == tag]
        src, status_out, _ = ctl(box, "status")
        urc, unlock_out, _ = ctl(box, "unlock", "--force")
        t_rerun = time.monotonic()
        rrc, rlines, rtook, _ = ctl_stream(box, "release", "--tag", tag, "--strategy", "in-place")
    finally:
        time.sleep(1)
        counts = load.stop()
        watch.stop()
    rout = "\n".join(x for _, x in rlines)
    auto_scaling_quiet(sc, watch, t0)
    sc.check(killed, f"ctl was not killed (exit {rc}): {chr(10).join(x for _, x in lines)[-400:]}")
    sc.check(len(first) >= 1, f"no instance on {tag} when ctl was killed")
    sc.check(src == 0, f"ctl status exit {src}")
    m = re.search(r"(?m)^rollout\s+(\d+) of (\d+) instances run (\S+)", status_out)
    sc.check(m and int(m.group(1)) == len(first) and int(m.group(2)) == n and tag_part(m.group(3)) == tag,
             f"ctl status does not show {len(first)} of {n} on {tag}: {status_out.strip()[-500:]}")
    sc.check(urc == 0, f"ctl unlock --force exit {urc}: {unlock_out.strip()[-300:]}")
    sc.check(rrc == 0, f"the re-run: ctl exit {rrc}: {rout.strip()[-600:]}")
    sc.check(parameter(box)[0] == tag, f"parameter holds {parameter(box)[1]}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == tag for i in ids), f"skiff:release: {tags}")
    for i in first:
        sc.check(not [v for _, v in watch.changes(i, "lb", t_rerun) if not v] and not watch.changes(i, "serving", t_rerun),
                 f"{i} (on {tag} before the re-run) was switched again: LB {watch.changes(i, 'lb', t_rerun)}")
    sc.check(re.search(r"already on it: (?!none)", rout), f"the re-run's plan skips nothing: {rout.strip()[:300]}")
    now = served()
    sc.check(set(now) == {tag}, f"the load balancer serves {now}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    rollout = m.group(0) if m else "no rollout line"
    sc.figures += [f"killed after {took:.1f} s with {first} on {tag}; status: '{rollout}'",
                   f"re-run {rtook:.1f} s", counts.line()]
    sc.done()


def uncoordinated(box, rate, tag, n, poll=2):
    """Scenario 13: the parameter written without ctl on the fleet stack (as the emulator's
    administrator), every agent configured `update = "follow"` with a `poll_interval` of
    `poll` s: within 3 poll intervals no instance swaps (all still on the old release) nor reads
    the parameter (a fleet host reads it at boot only: its last successful poll is unchanged,
    and it is not reported stale), and each agent said at start that uncoordinated swaps are
    disabled."""
    sc = Scenario(13, f"parameter -> {tag} without ctl, agents on update = follow")
    images.push_image(tag)
    ids = stack_instances(box)
    old, old_value = parameter(box)
    name = box["outputs"]["ReleaseParameter"]
    ssm = settings.admin_clients(box)("ssm")
    originals = {}
    for i in ids:
        with open(os.path.join(settings.STATE, "hosts", i, "etc-skiff", "agent.toml")) as f:
            originals[i] = f.read()
    uncoordinated_config = {i: re.sub(r'(?m)^poll_interval\s*=.*$', f'poll_interval = "{poll}s"',
                                      re.sub(r'(?m)^update\s*=.*$', 'update = "follow"', t))
                            for i, t in originals.items()}
    load = Load(URL, rate).start()
    try:
        ok = set_agent_config(box, uncoordinated_config)
        sc.check(ok, "agents not healthy again after the restart with update = follow")
        wait_until(lambda: len(loadbalancer.lb_up()) == n, 30, 0.5)
        watch = Watch(box, ids).start()
        last_poll = {i: agent_metric(box, i, POLLED) for i in ids}
        t0 = time.monotonic()
        ssm.put_parameter(Name=name, Value=tag, Type="String", Overwrite=True)
        time.sleep(3 * poll + 2)
        statuses = {i: agent_status(box, host_ip(i)) or {} for i in ids}
        polled_since = {i: agent_metric(box, i, POLLED) for i in ids}
        watch.stop()
    finally:
        ssm.put_parameter(Name=name, Value=old_value, Type="String", Overwrite=True)
        restored = set_agent_config(box, originals)
        wait_until(lambda: len(loadbalancer.lb_up()) == n, 30, 0.5)
        time.sleep(1)
        counts = load.stop()
    sc.check(restored, "agents not healthy again with the template's config")
    auto_scaling_quiet(sc, watch, t0)
    for i in ids:
        st = statuses.get(i, {})
        sc.check(release_of(st) == old and st.get("stale") is False,
                 f"{i}: runs {release_of(st)}, stale {st.get('stale')} (want {old}, not stale)")
        sc.check(last_poll[i] is not None and polled_since[i] == last_poll[i],
                 f"{i}: read the parameter after boot (last poll {last_poll[i]} -> {polled_since[i]})")
        sc.check(not watch.changes(i, "serving", t0) and not [v for _, v in watch.changes(i, "lb", t0) if not v],
                 f"{i} swapped or left the LB: serving {watch.changes(i, 'serving', t0)}, LB {watch.changes(i, 'lb', t0)}")
        said = any("uncoordinated in-place swaps are disabled" in line for line in agent_log(i))
        sc.check(said, f"{i}: the agent did not warn that update = follow is not honoured")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == old for i in ids), f"skiff:release: {tags}")
    sc.check(tag not in counts.releases, f"{tag} served {counts.releases[tag]} responses")
    sc.check(parameter(box)[0] == old, f"parameter not restored: {parameter(box)[1]}")
    sc.check(counts.failed == 0, f"failed requests: {counts.failed} (first {counts.first_failure})")
    sc.figures += [f"{3 * poll + 2} s after the write (poll {poll} s): all {n} on {old}, parameter not read", counts.line()]
    inplace_unsigned(box, sc, rate, f"r{RUN}iun", n)
    sc.done()
