#!/usr/bin/env python3
"""Who is calling, as AWS tells it: requests signed with an instance's profile credentials carry
the instance's ARN (ec2:SourceInstanceARN), so a policy can let an instance act on itself only
(issue 18, finding 6). Starts its own IAM-enforcing server (server.py --iam, a free port, its
administrator in a temporary file, stopped at the end) and drives it with boto3:

  * an instance tags itself and is denied (UnauthorizedOperation) tagging a peer, and a request
    naming itself and a peer, under AWS's own "only the calling instance" pattern;
  * its peer, with credentials of the same role, tags itself;
  * a user holding the same policy (no instance behind its request) is denied.

Prints one line per check and 'N passed, N failed'."""

import json
import os
import sys
import tempfile

import boto3

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from kit.checks import check, summary  # noqa: E402
from kit.emulator import error_code, instance_credentials, own_server  # noqa: E402

REGION = "us-east-1"
# AWS's pattern, as in the managed policy AWSEC2VssSnapshotPolicy:
# https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AWSEC2VssSnapshotPolicy.html
SELF_ONLY = {"Version": "2012-10-17", "Statement": [{
    "Sid": "TagItself", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "arn:aws:ec2:*:*:instance/*",
    "Condition": {"ArnLike": {"ec2:SourceInstanceARN": "arn:aws:ec2:*:*:instance/${ec2:InstanceId}"}}}]}
TRUST_EC2 = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def session(key, secret, token=None):
    return boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                 aws_session_token=token, region_name=REGION)


def tag(ec2, ids):
    return lambda: ec2.create_tags(Resources=ids, Tags=[{"Key": "skiff:release", "Value": "v1"}])


def main():
    with tempfile.TemporaryDirectory(prefix="skiff-identity-") as tmp:
        admin_file = os.path.join(tmp, "admin.json")
        with own_server("--iam", "--admin-file", admin_file) as url:
            with open(admin_file) as f:
                a = json.load(f)
            admin = session(a["access_key_id"], a["secret_access_key"])
            iam, ec2 = admin.client("iam", endpoint_url=url), admin.client("ec2", endpoint_url=url)
            ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
            ids = [i["InstanceId"] for i in ec2.run_instances(ImageId=ami, MinCount=2, MaxCount=2)["Instances"]]
            name, document = "self-only", SELF_ONLY
            role = iam.create_role(RoleName=f"skiff-{name}", AssumeRolePolicyDocument=json.dumps(TRUST_EC2))["Role"]
            iam.put_role_policy(RoleName=role["RoleName"], PolicyName="tags", PolicyDocument=json.dumps(document))
            clients = []
            for iid in ids:
                c = instance_credentials(url, role["Arn"], iid, REGION)
                clients.append(session(c["AccessKeyId"], c["SecretAccessKey"], c["Token"]).client(
                    "ec2", endpoint_url=url))
            mine, peer = ids
            got = error_code(tag(clients[0], [mine]))
            check(f"an instance tags itself (got {got or 'success'})", got is None)
            got = error_code(tag(clients[0], [peer]))
            check(f"an instance is denied tagging a peer (got {got or 'success'})",
                  got == "UnauthorizedOperation")
            got = error_code(tag(clients[0], [mine, peer]))
            check(f"itself and a peer in one request: denied (got {got or 'success'})",
                  got == "UnauthorizedOperation")
            got = error_code(tag(clients[1], [peer]))
            check(f"the peer, same role, tags itself (got {got or 'success'})", got is None)
            user = iam.create_user(UserName=f"skiff-{name}-user")["User"]["UserName"]
            iam.put_user_policy(UserName=user, PolicyName="tags", PolicyDocument=json.dumps(document))
            k = iam.create_access_key(UserName=user)["AccessKey"]
            plain = session(k["AccessKeyId"], k["SecretAccessKey"]).client("ec2", endpoint_url=url)
            got = error_code(tag(plain, [mine]))
            check(f"a user with the same policy (no instance behind it) is denied (got {got or 'success'})",
                  got == "UnauthorizedOperation")
            tags = {t["ResourceId"] for t in ec2.describe_tags(
                Filters=[{"Name": "key", "Values": ["skiff:release"]}])["Tags"]}
            check("only the allowed requests tagged anything (each instance by itself)", tags == set(ids), str(tags))
    return summary()


if __name__ == "__main__":
    sys.exit(main())
