"""The test app's images: built from testbed/images, pushed as <repo>:<tag> to the registry the
ECR-shaped host serves and signed (cosign's format, `ctl sign --key-file`) with the box's signing
key, whose public key the box's stack trusts (TrustedKeys); forgotten again when the box goes down."""

import json
import os
import shutil
import urllib.error
import urllib.request

from settings import binary, BoxError, ECR_HOST, load_box, LOCAL_REGISTRY, REGION, REPO, ROOT, run, STATE


# --- images --------------------------------------------------------------------------------

APPS = ("busybox", "graceful")
GRACEFUL_BASE = "skiff-ci/graceful-app:1"
_graceful_base_checked = []
# The box's signing key (P-256, PKCS#8 PEM), new at every `up`: Jenkins' key file in the box.
SIGNING_KEY = os.path.join(STATE, "signing", "key.pem")


def new_signing_key():
    """A new P-256 signing key for this box run (openssl, as the README tells Jenkins to make
    one); returns its public key (PEM), the stack's TrustedKeys."""
    os.makedirs(os.path.dirname(SIGNING_KEY), mode=0o700, exist_ok=True)
    run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", SIGNING_KEY)
    os.chmod(SIGNING_KEY, 0o600)
    return run("openssl", "pkey", "-in", SIGNING_KEY, "-pubout").stdout


def sign_image(tag):
    """Sign REPO:tag's digest with the box's key (`ctl sign --key-file`, what `make sign` runs in
    Jenkins), in the registry the ECR-shaped host serves. Returns ctl's line (digest, key id)."""
    if not os.path.exists(SIGNING_KEY):
        raise BoxError(f"no signing key ({SIGNING_KEY}): `box.py up` creates it")
    env = dict(os.environ, AWS_REGION=REGION, AWS_EC2_METADATA_DISABLED="true")
    return run(binary("ctl"), "--image", f"{LOCAL_REGISTRY}/{REPO}", "sign", "--tag", tag,
               "--key-file", SIGNING_KEY, env=env).stdout.strip()


def default_app():
    """The test app the box's releases are built from: the box's own (FLEET_APP at `up`), else
    FLEET_APP, else busybox."""
    box = load_box() or {}
    return box.get("app") or os.environ.get("FLEET_APP", "busybox")


def push_image(tag, healthy=True, app=None, fail_after=None, slow_start=None, signed=True):
    """The test app as REPO:tag, whose page names the release and the host's address, on $PORT:
      * busybox: busybox httpd; no keep-alive (every response closes its connection), and as
        PID 1 without a handler it ignores SIGTERM (the engine kills it after the stop timeout);
      * graceful: testbed/images/graceful-app.py: keep-alive, and on SIGTERM finishes what is in
        flight, closes each kept-alive connection after its next response, and exits.
    healthy=False: /health never passes (busybox: 404, graceful: 500); fail_after=S (graceful
    only): /health fails from S seconds after its first pass on (a release that fails after the
    agent's gate); slow_start=S (graceful only): /health 503 for its first S seconds.
    signed=False: pushed without a signature (a release the stack's hosts must refuse)."""
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
    if signed:
        sign_image(tag)
    return f"{ECR_HOST}/{REPO}:{tag}"


def digest_of(tag):
    """REPO:tag's manifest digest, as the registry the ECR-shaped host serves answers it."""
    req = urllib.request.Request(f"http://{LOCAL_REGISTRY}/v2/{REPO}/manifests/{tag}", method="HEAD",
                                 headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers["Docker-Content-Digest"]


def forget_images():
    """Delete the box's tags (REPO only) from the registry the ECR-shaped host serves; the
    registry's garbage collection, not run here, frees the blobs."""
    base = f"http://{LOCAL_REGISTRY}/v2/{REPO}"
    try:
        with urllib.request.urlopen(f"{base}/tags/list", timeout=5) as r:
            tags = json.load(r).get("tags") or []
    except (OSError, ValueError):
        return
    # the images' (Docker) and their signatures' (OCI) manifests
    accept = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
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
