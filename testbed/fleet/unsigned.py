"""Issue 20 in the box: an image nobody signed. ctl refuses to release it (exit 2) before it
writes anything; written past ctl (a leaked deployer credential: the release parameter, and in
place the instance tags), every host keeps serving its signed release, the agent that was asked
refuses it (skiff_agent_signature_checks_total{result="refused"}, skiff:failed) and no request
fails. Part of scenario 3 (refresh, after its scale-in) and scenario 13 (in place, after its own
write past ctl). Each writes the parameter back afterwards, a new version: the leaked record stays
in the history, where a plain `ctl rollback` would pick it and refuse it (exit 2; `--to <tag>`
names another), so neither sits before a rollback scenario (7, 11)."""

import json
import time
import images  # noqa: E402
import loadbalancer  # noqa: E402
import settings  # noqa: E402

from scenario import agent_answers, agent_log, agent_metric, ctl, group, host_ip, parameter, settle, skiff_tags, stack_instances, tag_part, Watch, with_load
from kit.waits import wait_until  # noqa: E402


def refusals(box, iid):
    """The agent's count of signature refusals (its /metrics), or None when it does not answer."""
    n = agent_metric(box, iid, 'skiff_agent_signature_checks_total{result="refused"}')
    return None if n is None else int(n)


def said(iid, fragment):
    """Whether the instance's agent log has a line whose message holds `fragment` (the log
    stays after the instance is gone: scenario 3's refusing instance gives its launch up and is
    gone by the time it is read)."""
    return any(fragment in line for line in agent_log(iid))


def deployer(box):
    """Clients with the deployer's credentials (the stack's DeployerPolicy, as Jenkins holds them)."""
    s = settings.session(box["deployer"]["access_key_id"], box["deployer"]["secret_access_key"])
    return lambda svc: s.client(svc, endpoint_url=settings.ENDPOINT)


def refused_by_ctl(box, sc, tag, *strategy):
    """Push `tag` unsigned; `ctl release` of it exits 2 (refused) with the parameter unchanged.
    Returns the parameter's value as it was and the unsigned digest."""
    images.push_image(tag, signed=False)
    digest = images.digest_of(tag)
    before = parameter(box)[1]
    rc, out, took = ctl(box, "release", "--tag", tag, *strategy)
    sc.check(rc == 2 and "refused" in out and "no signature" in out,
             f"ctl release of the unsigned {tag}: exit {rc}, documented 2 (refused): {out.strip()[-400:]}")
    sc.check(parameter(box)[1] == before, f"the refused release wrote the parameter: {parameter(box)[1]}")
    sc.figures.append(f"unsigned {tag}: ctl exit {rc} in {took:.1f} s, parameter unchanged")
    return before, digest


def write_parameter(box, value):
    deployer(box)("ssm").put_parameter(Name=box["outputs"]["ReleaseParameter"], Value=value, Type="String",
                                       Overwrite=True)


def refresh_unsigned(box, sc, rate, tag, n):
    """Refresh: ctl refuses `tag`; the parameter written to its digest past ctl, then a scale-out
    boots an instance on it: that instance's agent refuses it (no container, never in the load
    balancer) and gives its launch up at once; the n others keep serving their release; 0 failed
    requests. The parameter is then written back and the group held at n."""
    good = parameter(box)[0]
    before, digest = refused_by_ctl(box, sc, tag)
    asg = settings.admin_clients(box)("autoscaling")
    name = box["outputs"]["AutoScalingGroup"]
    ids = set(group(box))
    new, seen = [], {}

    def leak():
        write_parameter(box, json.dumps({"tag": tag, "digest": digest}))
        try:
            asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=n + 1, HonorCooldown=False)
            new[:] = wait_until(lambda: sorted(set(group(box)) - ids) or None, 30, 0.5) or []
            # The agent refuses the digest, answers skiff:failed and gives the launch up at once
            # (nothing to run): the instance may be gone before a metrics read, its log stays.
            wait_until(lambda: new and said(new[0], "release cannot start here: abandoning the launch"), 60, 0.5)
            seen.update(refused=new and said(new[0], "signature check refused"),
                        abandoned=new and said(new[0], "release cannot start here: abandoning the launch"),
                        state=group(box).get(new[0]) if new else None,
                        in_lb=bool(new and host_ip(new[0]) in loadbalancer.lb_up()),
                        failed=next(iter(agent_answers(new[0], "skiff:failed")), None) if new else None)
        finally:
            write_parameter(box, before)
            # The abandoned instance is gone and Auto Scaling may be launching its replacement:
            # take out whatever is not one of the n, then hold the group at n.
            for i in sorted(set(group(box)) - ids):
                try:
                    asg.terminate_instance_in_auto_scaling_group(InstanceId=i, ShouldDecrementDesiredCapacity=True)
                except asg.exceptions.ClientError:
                    pass  # already terminated
            asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=n, HonorCooldown=False)
            settle(box, n)
        return seen

    t0 = time.monotonic()
    _, counts = with_load(box, rate, leak)
    sc.check(len(new) >= 1, f"the scale-out on the unsigned parameter launched {new}")
    sc.check(seen.get("refused"), f"the new instance's agent did not log a signature refusal of {tag}")
    sc.check(seen.get("abandoned"), "the new instance's agent did not give its launch up")
    sc.check(tag_part(seen.get("failed")) == tag, f"the new instance's skiff:failed: {seen.get('failed')}")
    sc.check(not seen.get("in_lb") and seen.get("state") != "InService",
             f"the instance booted on the unsigned release: {seen.get('state')}, in the LB {seen.get('in_lb')}")
    sc.check(settle(box, n, 30) and set(group(box)) == ids, f"the group is not back to its {n}: {group(box)}")
    sc.check(tag not in counts.releases, f"{tag} served {counts.releases[tag]} responses")
    sc.check(set(counts.releases) == {good}, f"served during the leak: {dict(counts.releases)}")
    sc.check(counts.failed == 0, f"failed requests (unsigned): {counts.failed} (first {counts.first_failure})")
    sc.figures.append(f"parameter -> unsigned {tag} past ctl and a scale-out: the new instance refused it "
                      f"({seen.get('state')}, never in the LB), {n} kept {good}; {time.monotonic() - t0:.1f} s; "
                      + counts.line())


def inplace_unsigned(box, sc, rate, tag, n):
    """In place: ctl refuses `tag` before any instance tag; the parameter and every instance's
    skiff:target written to its digest past ctl: each agent refuses it (skiff:failed, its metric)
    and keeps serving its release, in the load balancer throughout; 0 failed requests. The
    parameter is written back and the instruction withdrawn."""
    good = parameter(box)[0]
    ids = stack_instances(box)
    before, digest = refused_by_ctl(box, sc, tag, "--strategy", "in-place")
    tags = skiff_tags(box, ids)
    sc.check(not any(tag_part(tags[i].get("skiff:target")) == tag for i in ids),
             f"the refused release told instances: {tags}")
    counted = {i: refusals(box, i) or 0 for i in ids}
    ec2 = deployer(box)("ec2")
    admin_ec2 = settings.admin_clients(box)("ec2")
    value = f"{tag}@{digest}"
    watch = Watch(box, ids).start()
    t0 = time.monotonic()

    def leak():
        write_parameter(box, json.dumps({"tag": tag, "digest": digest}))
        try:
            ec2.create_tags(Resources=ids, Tags=[{"Key": "skiff:target", "Value": value}])
            answered = wait_until(lambda: all(skiff_tags(box, ids)[i].get("skiff:failed") == value for i in ids),
                                  20, 0.5)
            time.sleep(2)  # a while longer on the instruction: still serving, still in the LB
            return answered
        finally:
            write_parameter(box, before)
            admin_ec2.delete_tags(Resources=ids, Tags=[{"Key": "skiff:target"}, {"Key": "skiff:failed"}])

    answered, counts = with_load(box, rate, leak)
    watch.stop()
    took = time.monotonic() - t0
    sc.check(answered, f"not every instance answered skiff:failed={value}: {skiff_tags(box, ids)}")
    now = {i: refusals(box, i) for i in ids}
    sc.check(all((now[i] or 0) > counted[i] for i in ids),
             f"signature refusals per agent before {counted}, after {now}")
    for i in ids:
        sc.check(not watch.changes(i, "serving", t0) and not [v for _, v in watch.changes(i, "lb", t0) if not v],
                 f"{i} swapped or left the LB: serving {watch.changes(i, 'serving', t0)}, LB {watch.changes(i, 'lb', t0)}")
    tags = skiff_tags(box, ids)
    sc.check(all(tags[i].get("skiff:release") == good for i in ids), f"skiff:release: {tags}")
    sc.check(len(loadbalancer.lb_up()) == n, f"the load balancer serves {loadbalancer.lb_up()}")
    sc.check(tag not in counts.releases, f"{tag} served {counts.releases[tag]} responses")
    sc.check(counts.failed == 0, f"failed requests (unsigned): {counts.failed} (first {counts.first_failure})")
    sc.figures.append(f"parameter and skiff:target -> unsigned {tag} past ctl: {n}/{n} refused it (skiff:failed), "
                      f"kept {good} in the LB; {took:.1f} s; " + counts.line())
