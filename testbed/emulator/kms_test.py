#!/usr/bin/env python3
"""The emulator's KMS Sign/Verify (kms.py) checked by a verifier that is not ours: python
`cryptography` (OpenSSL) verifies the emulator's signatures as AWS documents them
(https://docs.aws.amazon.com/kms/latest/APIReference/API_Sign.html): MessageType=DIGEST signs
the given digest as it is (verified with Prehashed), RAW signs the message's hash; a digest of
the wrong length and an unknown MessageType are refused; Verify fails with
KMSInvalidSignatureException on a bad signature. Against the running emulator (default
http://127.0.0.1:5055, SKIFF_EMULATOR_URL to change; .ci/setup.sh starts it). Prints one line
per check and 'N passed, N failed'."""

import hashlib
import os
import sys

import boto3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kit.emulator import error_code  # noqa: E402

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}" + (f": {detail}" if detail else ""))


def verifies(public, signature, data, *scheme):
    try:
        public.verify(signature, data, *scheme)
        return True
    except InvalidSignature:
        return False


def main():
    url = os.environ.get("SKIFF_EMULATOR_URL", "http://127.0.0.1:5055")
    kms = boto3.client("kms", endpoint_url=url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    message = b"skiff kms_test " + os.urandom(8).hex().encode()
    digest = hashlib.sha256(message).digest()

    key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY",
                         Description="skiff kms_test")["KeyMetadata"]["KeyId"]
    try:
        public = serialization.load_der_public_key(kms.get_public_key(KeyId=key)["PublicKey"])

        def sign(msg, kind, alg="ECDSA_SHA_256", key_id=key):
            return kms.sign(KeyId=key_id, Message=msg, MessageType=kind,
                            SigningAlgorithm=alg)["Signature"]

        by_digest = sign(digest, "DIGEST")
        check("P-256 DIGEST: the signature verifies over the digest as given (Prehashed SHA-256)",
              verifies(public, by_digest, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))
        check("P-256 DIGEST: it is not a signature over the digest hashed again",
              not verifies(public, by_digest, digest, ec.ECDSA(hashes.SHA256())))
        check("P-256 DIGEST: it verifies as ECDSA-SHA256 over the message the digest came from",
              verifies(public, by_digest, message, ec.ECDSA(hashes.SHA256())))
        by_raw = sign(message, "RAW")
        check("P-256 RAW: the signature verifies as ECDSA-SHA256 over the message",
              verifies(public, by_raw, message, ec.ECDSA(hashes.SHA256())))
        check("DIGEST of 31 bytes refused (length of SHA-256)",
              error_code(lambda: sign(digest[:31], "DIGEST")) == "ValidationException")
        check("DIGEST of a 48-byte value refused for ECDSA_SHA_256",
              error_code(lambda: sign(hashlib.sha384(message).digest(), "DIGEST"))
              == "ValidationException")
        check("MessageType EXTERNAL_MU refused for an ECC key",
              error_code(lambda: sign(digest, "EXTERNAL_MU")) == "ValidationException")
        check("RAW message of 4097 bytes refused",
              error_code(lambda: sign(b"x" * 4097, "RAW")) == "ValidationException")
        check("Verify of its DIGEST signature: valid",
              kms.verify(KeyId=key, Message=digest, MessageType="DIGEST", Signature=by_digest,
                         SigningAlgorithm="ECDSA_SHA_256")["SignatureValid"] is True)
        check("Verify of another digest: KMSInvalidSignatureException",
              error_code(lambda: kms.verify(
                  KeyId=key, Message=hashlib.sha256(b"other").digest(), MessageType="DIGEST",
                  Signature=by_digest, SigningAlgorithm="ECDSA_SHA_256"))
              == "KMSInvalidSignatureException")

        rsa_key = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
        rsa_public = serialization.load_der_public_key(
            kms.get_public_key(KeyId=rsa_key)["PublicKey"])
        rsa_sig = sign(digest, "DIGEST", "RSASSA_PKCS1_V1_5_SHA_256", rsa_key)
        check("RSA PKCS#1 v1.5 DIGEST: verifies over the digest as given",
              verifies(rsa_public, rsa_sig, digest, padding.PKCS1v15(),
                       utils.Prehashed(hashes.SHA256())))
        kms.schedule_key_deletion(KeyId=rsa_key, PendingWindowInDays=7)
        kms.disable_key(KeyId=key)
        check("a disabled key cannot sign: DisabledException",
              error_code(lambda: sign(digest, "DIGEST")) == "DisabledException")
        check("a key pending deletion cannot sign: KMSInvalidStateException",
              error_code(lambda: sign(digest, "DIGEST", "RSASSA_PKCS1_V1_5_SHA_256", rsa_key))
              == "KMSInvalidStateException")
    finally:
        kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
