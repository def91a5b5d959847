"""KMS Sign and Verify with MessageType as AWS documents them (moto 5.2.6 ignores MessageType).

https://docs.aws.amazon.com/kms/latest/APIReference/API_Sign.html
https://docs.aws.amazon.com/kms/latest/APIReference/API_Verify.html

- `MessageType=RAW` (the default): KMS hashes the message with the signing algorithm's hash and
  signs that; the message is at most 4096 bytes.
- `MessageType=DIGEST`: the message *is* the digest. KMS signs it as it is, without hashing it
  again, and "the length of the Message value must match the length of hashing algorithm
  specified in the SigningAlgorithm parameter" (32 bytes for *_SHA_256, 48 for *_SHA_384, 64 for
  *_SHA_512). moto hashed the digest a second time, so a signature it made over a digest verified
  with no other implementation (cosign, RustCrypto, OpenSSL) against that digest.
- A key that is not Enabled cannot sign or verify (moto signs with a disabled key).
- Verify of a signature that does not verify fails with KMSInvalidSignatureException.
- Any other MessageType (`EXTERNAL_MU` is for ML-DSA keys, which moto does not model) is refused.

Not modelled: grant tokens, dry runs, ML-DSA and SM2 keys. `install()` patches moto's KMS
response handlers; the key material and the rest of moto's checks (key state, key usage,
algorithm allowed for the key) stay moto's.
"""

from __future__ import annotations

import base64
import json

from cryptography.exceptions import InvalidSignature
from moto.core.exceptions import JsonRESTError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

MESSAGE_MAX = 4096
_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def _hash_of(algorithm: str) -> hashes.HashAlgorithm:
    return _HASHES[algorithm.rsplit("_", 1)[-1]]()


def message_error(message: bytes, message_type: str, algorithm: str) -> str | None:
    """The ValidationException message AWS answers for this Message/MessageType, or None."""
    if message_type not in ("RAW", "DIGEST"):
        return (f"1 validation error detected: Value '{message_type}' at 'MessageType' failed to "
                "satisfy constraint: Member must satisfy enum value set: [RAW, DIGEST]")
    if not 1 <= len(message) <= MESSAGE_MAX:
        return ("1 validation error detected: Value at 'Message' failed to satisfy constraint: "
                f"Member must have length between 1 and {MESSAGE_MAX}")
    if message_type == "DIGEST" and algorithm.rsplit("_", 1)[-1] in _HASHES:
        want = _hash_of(algorithm).digest_size
        if len(message) != want:
            return (f"Digest is invalid length for algorithm {algorithm}: {len(message)} bytes, "
                    f"{algorithm} takes a {want}-byte digest")
    return None


def _scheme(key, algorithm: str, message: bytes, message_type: str):
    """(data, signature-scheme arguments) for cryptography's sign/verify: the hash of a RAW
    message is computed by the library, a DIGEST is passed as Prehashed (never hashed again)."""
    h = _hash_of(algorithm)
    alg = utils.Prehashed(h) if message_type == "DIGEST" else h
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return (ec.ECDSA(alg),)
    if algorithm.startswith("RSASSA_PSS_"):
        # moto's RAW signatures use the maximum salt; keep its choice so its Verify agrees.
        return (padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.MAX_LENGTH), alg)
    return (padding.PKCS1v15(), alg)


def install() -> None:
    from moto.kms.exceptions import ValidationException
    from moto.kms.responses import KmsResponse

    def params(self):
        message = self._get_param("Message")
        if isinstance(message, str):
            message = message.encode("utf-8")
        return (self._get_param("KeyId"), message or b"",
                self._get_param("MessageType") or "RAW", self._get_param("SigningAlgorithm"))

    def crypto_key(self, key_id: str, algorithm: str):
        # moto's own checks first: key exists and is enabled, SIGN_VERIFY, algorithm of the key.
        self._validate_key_id(key_id)
        key = self.kms_backend.describe_key(key_id)
        self.kms_backend._KmsBackend__ensure_valid_sign_and_verify_key(key)
        self.kms_backend._KmsBackend__ensure_valid_signing_algorithm(key, algorithm)
        if key.key_state != "Enabled":
            # Sign/Verify list DisabledException ("the specified KMS key is not enabled") and
            # KMSInvalidStateException (e.g. PendingDeletion); moto signs with either.
            code = "DisabledException" if key.key_state == "Disabled" else "KMSInvalidStateException"
            raise JsonRESTError(code, f"{key.arn} is {key.key_state}")
        if algorithm not in key.signing_algorithms:
            raise ValidationException(
                f"1 validation error detected: Value '{algorithm}' at 'SigningAlgorithm' failed "
                f"to satisfy constraint: Member must satisfy enum value set: {key.signing_algorithms}")
        return key, key.private_key.private_key

    def sign(self) -> str:
        key_id, message, message_type, algorithm = params(self)
        key, private = crypto_key(self, key_id, algorithm)
        refused = message_error(message, message_type, algorithm)
        if refused:
            raise ValidationException(refused)
        signature = private.sign(message, *_scheme(private, algorithm, message, message_type))
        return json.dumps({"KeyId": key.arn, "Signature": base64.b64encode(signature).decode(),
                           "SigningAlgorithm": algorithm})

    def verify(self) -> str:
        key_id, message, message_type, algorithm = params(self)
        signature = self._get_param("Signature") or b""
        if isinstance(signature, str):
            signature = base64.b64decode(signature.encode("utf-8"))
        key, private = crypto_key(self, key_id, algorithm)
        refused = message_error(message, message_type, algorithm)
        if refused:
            raise ValidationException(refused)
        public = private.public_key()
        try:
            public.verify(signature, message, *_scheme(public, algorithm, message, message_type))
        except InvalidSignature:
            # "If the signature is not verified, the Verify operation fails with a
            # KMSInvalidSignatureException exception" (moto answered SignatureValid false).
            raise JsonRESTError("KMSInvalidSignatureException", "") from None
        return json.dumps({"KeyId": key.arn, "SignatureValid": True, "SigningAlgorithm": algorithm})

    KmsResponse.sign = sign
    KmsResponse.verify = verify
