"""A stand-in for the EC2 instance metadata service, IMDSv2 only (HttpTokens: required), serving
what skiff's agent reads: the instance's identity, its role's credentials, its tags and its
Auto Scaling target lifecycle state.
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/work-with-tags-in-IMDS.html
https://docs.aws.amazon.com/autoscaling/ec2/userguide/retrieving-target-lifecycle-state-through-imds.html

One server can serve many instances, told apart by the caller's address (the fleet box), or one
(the permissions test): `instance_for(address)` says which.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

MD = "/latest/meta-data/"


@dataclass
class Instance:
    id: str
    role: str  # the instance profile's role name
    creds: dict  # {AccessKeyId, SecretAccessKey, Token, Expiration}
    tags: Callable[[], dict]  # the instance's live EC2 tags
    lifecycle_state: Callable[[], str | None]  # its LifecycleState in the group, None once gone
    region: str = "us-east-1"
    ip: str | None = None  # local-ipv4
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


def metadata(inst: Instance, path: str) -> str | None:
    """The answer to GET `path`, None for 404."""
    if path == MD + "instance-id":
        return inst.id
    if path == MD + "placement/region":
        return inst.region
    if path == MD + "placement/availability-zone":
        return inst.region + "a"
    if path == MD + "local-ipv4":
        return inst.ip
    if path.rstrip("/") == MD + "iam/security-credentials":
        return inst.role
    if path == MD + f"iam/security-credentials/{inst.role}":
        return json.dumps(dict(inst.creds, Code="Success", Type="AWS-HMAC",
                               LastUpdated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    if path.rstrip("/") == MD + "tags/instance":
        return "\n".join(sorted(inst.tags()))
    if path.startswith(MD + "tags/instance/"):
        return inst.tags().get(path[len(MD + "tags/instance/"):])  # absent: 404
    if path == MD + "autoscaling/target-lifecycle-state":
        # Auto Scaling sets the target state to Terminated when it terminates the instance.
        state = inst.lifecycle_state()
        return "Terminated" if state is None or state.startswith("Terminating") else "InService"
    return None


class Server:
    """IMDSv2 on `address` ((host, port); port 0 picks one: see `url`) in a thread of its own.
    `seen`, when given, gets "METHOD path" of every request."""

    def __init__(self, address: tuple[str, int], instance_for: Callable[[str], Instance | None],
                 seen: list | None = None):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code, body, ttl=None):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                if ttl:
                    self.send_header("X-aws-ec2-metadata-token-ttl-seconds", ttl)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                if seen is not None:
                    seen.append(f"PUT {self.path}")
                inst = instance_for(self.client_address[0])
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if inst and self.path == "/latest/api/token" and ttl:
                    return self.reply(200, inst.token, ttl=ttl)
                return self.reply(400 if inst else 403, "")

            def do_GET(self):
                if seen is not None:
                    seen.append(f"GET {self.path}")
                inst = instance_for(self.client_address[0])
                # IMDSv2 only: no token (or another instance's), 401.
                if not inst or self.headers.get("X-aws-ec2-metadata-token") != inst.token:
                    return self.reply(401, "")
                try:
                    body = metadata(inst, self.path)
                except Exception as e:  # the emulator away: the caller retries, as it would on EC2
                    print(f"{time.strftime('%H:%M:%S')} {inst.id}: IMDS {self.path}: {e}", flush=True)
                    return self.reply(500, "")
                return self.reply(404, "") if body is None else self.reply(200, body)

        self.server = http.server.ThreadingHTTPServer(address, Handler)
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
