"""The test app's images: built from testbed/images and pushed as <repo>:<tag> to the registry the
ECR-shaped host serves; forgotten again when the box goes down."""

import json
import os
import shutil
import urllib.error
import urllib.request

from settings import BoxError, ECR_HOST, load_box, LOCAL_REGISTRY, REPO, ROOT, run, STATE


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
