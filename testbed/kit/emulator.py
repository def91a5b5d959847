"""Talking to skiff's AWS emulator (testbed/emulator): boto3 sessions and the credentials EC2
would hand an instance through its instance profile (POST /skiff-emulator/instance-credentials)."""

from __future__ import annotations

import json
import urllib.request

REGION = "us-east-1"


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
