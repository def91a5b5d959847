"""Talking to skiff's AWS emulator (testbed/emulator): boto3 sessions, the credentials EC2 would
hand an instance through its instance profile (POST /skiff-emulator/instance-credentials), and
an emulator of a test's own on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request

from kit.net import free_port
from kit.waits import wait_until

REGION = "us-east-1"


def error_code(call) -> str | None:
    """The AWS error code `call` raised (botocore's ClientError), or None when it succeeded."""
    import botocore.exceptions

    try:
        call()
        return None
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]


def session(key: str, secret: str, token: str | None = None, region: str = REGION):
    import boto3

    return boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                 aws_session_token=token, region_name=region)


def instance_credentials(endpoint: str, role_arn: str, instance_id: str, region: str = REGION) -> dict:
    """{AccessKeyId, SecretAccessKey, Token, Expiration} of the role, as the instance's IMDS
    serves them; the emulator refuses a role that does not trust ec2.amazonaws.com."""
    req = urllib.request.Request(
        f"{endpoint}/skiff-emulator/instance-credentials", method="POST",
        data=json.dumps({"role_arn": role_arn, "instance_id": instance_id, "region": region}).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


@contextlib.contextmanager
def own_server(*args: str):
    """An emulator of the test's own (testbed/emulator/server.py, permissive unless `--iam` is
    among `args`) on a free port, stopped at the end: yields its URL once it answers."""
    server_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emulator", "server.py")
    port = free_port()
    server = subprocess.Popen([sys.executable, server_py, "--port", str(port), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_until(lambda: _answers(url), 30, 0.25):
            raise RuntimeError(f"the emulator on {url} did not start (server.py {' '.join(args)})")
        yield url
    finally:
        server.terminate()
        server.wait(10)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/skiff-emulator/version", timeout=1)
        return True
    except OSError:
        return False
