"""The gate every request passes before moto answers it: it counts the call, then applies AWS's
request limits (limits.py decides) and answers one over them with AWS's error, never by moto.

The limits: EC2's 200 filter values (limits.py) and the request-rate buckets per account,
Region and action family (throttle.py applies limits.py's rules; a throttled request is answered
in its protocol: XML for query and EC2, JSON for SSM). throttle.py also installs the target
quota on ELBv2's registration. A new limit plugs into `refusal`, the one function that sees every request. Calls are counted per
caller (access key id) and action, refused ones too: a test that runs a tool under a key of its own
reads back what it asked (GET /skiff-emulator/calls?key=AKID).
"""

from __future__ import annotations

import collections

from moto.core.exceptions import JsonRESTError

from errors import ProtocolError
from lock import LOCK
import limits
import throttle

CALLS: collections.Counter = collections.Counter()


def refusal(resp) -> tuple[str, str] | None:
    """(error code, message) of the limit this request breaks, else None."""
    if resp.service_name == "ec2":
        refused = limits.ec2_filter_limit(resp.querystring)
        if refused:
            return refused
    try:
        action = resp._get_action()
    except Exception:
        action = "?"
    rule = throttle.admit(resp.service_name, action, resp.querystring or {},
                          resp.current_account, resp.region)
    return None if rule is None else (rule.error, limits.throttling_message(rule))


def _count(resp) -> None:
    auth = resp.headers.get("Authorization", "") if resp.headers else ""
    key = auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""
    try:
        action = resp._get_action()
    except Exception:
        action = "?"
    with LOCK:
        CALLS[(key, f"{resp.service_name}:{action}")] += 1


def calls(key: str) -> dict[str, int]:
    with LOCK:
        return {a: n for (k, a), n in sorted(CALLS.items()) if k == key}


def install() -> None:
    """On BaseResponse.call_action, under every service's own call_action (Auto Scaling's wraps it
    with the clock, extensions.tick)."""
    from moto.core.responses import BaseResponse

    original = BaseResponse.call_action

    def call_action(self):
        _count(self)
        refused = refusal(self)
        if refused is None:
            return original(self)
        if self.headers.get("X-Amz-Target"):  # JSON protocol (SSM): {"__type", "message"}
            err = JsonRESTError(refused[0], refused[1])
            extra = dict(err.get_headers() or [])
        else:
            err = ProtocolError(self.service_name, refused[0], refused[1], status=400)
            extra = {}
        status, headers, body = self._transform_response(
            self.response_headers, (err.description, {**extra, "status": err.code}))
        headers, body = self._enrich_response(headers, body)
        return status, headers, body

    BaseResponse.call_action = call_action
    throttle.patch_target_quota()
