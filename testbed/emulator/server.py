#!/usr/bin/env python3
"""skiff's AWS emulator: moto's server with skiff's extensions (extensions.py) applied.

    python testbed/emulator/server.py --port 5055            # permissive, like moto_server
    python testbed/emulator/server.py --port 5056 --iam      # IAM enforced from the first request

With --iam, an administrator user is created inside the process before it serves and its keys
are written (mode 0600) to --admin-file (default $SKIFF_CI_HOME/emulator-iam-admin.json).
Besides moto's API it serves:
    GET  /skiff-emulator/version                 -> version and --stamp (setup.sh compares it)
    POST /skiff-emulator/instance-credentials    {"role_arn", "instance_id", "region"}
         -> the role's temporary credentials, as EC2 hands them to an instance with that role
            in its instance profile (the role must trust ec2.amazonaws.com)
    POST /skiff-emulator/target-health  {"group", "region", "targets": {instance id: state}}
         -> the load balancer's view of the group's targets (initial, healthy, unhealthy,
            draining, ...): with HealthCheckType ELB an InService instance reported unhealthy
            after the grace period is replaced (elb_health.py, health.py)
    GET  /skiff-emulator/authorizations?principal=S  -> the extended checks made for callers whose
         ARN contains S: actions, resources, allowed, the statement (Sid) that allowed each
    GET  /skiff-emulator/rates  -> per request bucket (throttle.py): its size, refill, page, calls
         per second and refusals
    GET  /skiff-emulator/instance-metadata?group=G  -> each instance's tags and lifecycle state,
         as its IMDS serves them (metadata.py; not an API call, draws from no bucket)
    GET  /skiff-emulator/calls?key=AKID  -> {"<service>:<Action>": count} of the calls signed
         with that access key id (any key works on the permissive server: a test that runs a
         tool under a key of its own counts what it asked)
POST /moto-api/reset is refused with --iam (it would drop the administrator): restart instead.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5055)
    parser.add_argument("--iam", action="store_true", help="enforce IAM from the first request")
    parser.add_argument("--stamp", default="", help="echoed by /skiff-emulator/version (setup.sh "
                        "passes a hash of the launcher's code to spot a stale server)")
    parser.add_argument("--admin-file", default=os.path.join(
        os.environ.get("SKIFF_CI_HOME", "/var/lib/skiff-ci"), "emulator-iam-admin.json"))
    args = parser.parse_args()

    # moto reads both at import time.
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
    if args.iam:
        os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    else:
        os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    sys.path.insert(0, HERE)

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    import auth
    import elb_health
    import extensions
    import limits_gate
    from lock import LOCK

    extensions.apply()
    if args.iam:
        admin = auth.bootstrap_admin(DEFAULT_ACCOUNT_ID)
        tmp = args.admin_file + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dict(admin, endpoint=f"http://{args.host}:{args.port}"), f)
        os.replace(tmp, args.admin_file)

    moto_app = DomainDispatcherApplication(create_backend_app)

    def app(environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD")

        def answer(status, body):
            data = json.dumps(body).encode()
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(data)))])
            return [data]

        if path == "/skiff-emulator/version":
            return answer("200 OK", {"version": extensions.VERSION, "stamp": args.stamp,
                                      "iam": args.iam})
        if path == "/skiff-emulator/authorizations":
            # ?principal=<substring of the caller's ARN>
            from urllib.parse import parse_qs

            want = parse_qs(environ.get("QUERY_STRING", "")).get("principal", [""])[0]
            return answer("200 OK", [e for e in list(auth.AUTH_LOG) if want in e["principal"]])
        if path == "/skiff-emulator/calls":
            from urllib.parse import parse_qs

            key = parse_qs(environ.get("QUERY_STRING", "")).get("key", [""])[0]
            return answer("200 OK", limits_gate.calls(key))
        if path == "/skiff-emulator/rates":
            import throttle

            return answer("200 OK", throttle.rates())
        if path == "/skiff-emulator/instance-metadata":
            from urllib.parse import parse_qs

            import metadata

            q = parse_qs(environ.get("QUERY_STRING", ""))
            try:
                with LOCK:
                    return answer("200 OK", metadata.group_instances(
                        DEFAULT_ACCOUNT_ID, q.get("region", ["us-east-1"])[0], q["group"][0]))
            except KeyError as e:
                return answer("404 Not Found", {"error": f"no such group: {e}"})
        if path == "/skiff-emulator/instance-credentials" and method == "POST":
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                req = json.loads(environ["wsgi.input"].read(length))
                with LOCK:
                    creds = auth.instance_credentials(
                        DEFAULT_ACCOUNT_ID, req.get("region", "us-east-1"), req["role_arn"],
                        req.get("instance_id", "i-emulated"))
                return answer("200 OK", creds)
            except (KeyError, ValueError, PermissionError) as e:
                return answer("400 Bad Request", {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # e.g. moto's NoSuchEntity for an unknown role
                return answer("404 Not Found", {"error": f"{type(e).__name__}: {e}"})
        if path == "/skiff-emulator/target-health" and method == "POST":
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                req = json.loads(environ["wsgi.input"].read(length))
                with LOCK:
                    elb_health.report_target_health(DEFAULT_ACCOUNT_ID, req.get("region", "us-east-1"),
                                                    req["group"], req["targets"])
                return answer("200 OK", {})
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                return answer("400 Bad Request", {"error": f"{type(e).__name__}: {e}"})
        if args.iam and path == "/moto-api/reset":
            return answer("403 Forbidden", {
                "error": "reset would drop the emulator's administrator; restart the emulator instead"})
        return moto_app(environ, start_response)

    print(f"{extensions.VERSION} on http://{args.host}:{args.port} (IAM {'enforced' if args.iam else 'off'})",
          flush=True)
    run_simple(args.host, args.port, app, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
