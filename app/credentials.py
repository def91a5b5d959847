"""The MySQL login: fixed (from DATABASE_URL) or read from a Secrets Manager secret.

RDS keeps its master user's password in a secret (`ManageMasterUserPassword`) and rotates it.
The secret is read once, on the first connection, and kept; when MySQL later rejects the login,
the store asks for it again (`reread`) and retries once with what it gets. Re-reads are spaced
by `min_reread_interval`, so a login that stays wrong does not call Secrets Manager for every
request. Neither the password nor the secret's text is ever logged or put in an error.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from config import SecretRef

log = logging.getLogger("app.credentials")

# Secrets Manager error codes worth another try later; everything else (no such secret, access
# denied, a secret that cannot be decrypted) needs someone to fix the setup.
_RETRYABLE_CODES = {
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
    "InternalServiceError", "InternalFailure", "ServiceUnavailable",
}


class CredentialsError(Exception):
    """The login could not be read. `retryable`: a network or throttling failure that may pass."""

    def __init__(self, message: str, *, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)


class FixedCredentials:
    """The user and password of a DATABASE_URL: nothing to re-read."""

    source = "DATABASE_URL"

    def __init__(self, user: str, password: str):
        self._credentials = Credentials(user, password)

    def current(self) -> Credentials:
        return self._credentials

    def reread(self, rejected: Credentials) -> Credentials | None:
        return None


class SecretsManagerCredentials:
    """The user and password in a secret, as JSON {"username": ..., "password": ...}."""

    def __init__(
        self,
        secret: SecretRef,
        *,
        timeout: float = 5.0,
        min_reread_interval: float = 5.0,
        client_factory: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.secret = secret
        self.source = f"secret {secret.arn}"
        self._timeout = timeout
        self._min_reread_interval = min_reread_interval
        self._client_factory = client_factory or self._boto3_client
        self._clock = clock
        self._lock = threading.Lock()
        self._credentials: Credentials | None = None
        self._last_reread: float | None = None
        self._client: Any = None
        self._client_pid = 0

    def current(self) -> Credentials:
        with self._lock:
            if self._credentials is None:
                self._credentials = self._read()
            return self._credentials

    def reread(self, rejected: Credentials) -> Credentials | None:
        """After MySQL rejected `rejected`: the secret's value now, if it differs; None when it
        is the same, or when the last re-read was too recent to ask again."""
        with self._lock:
            if self._credentials is not None and self._credentials != rejected:
                return self._credentials  # another thread has re-read it already
            now = self._clock()
            if self._last_reread is not None and now - self._last_reread < self._min_reread_interval:
                return None
            self._last_reread = now
            fresh = self._read()
            changed = fresh != self._credentials
            self._credentials = fresh
        log.info("re-read %s after a rejected login: %s", self.source,
                 "it has changed" if changed else "unchanged")
        return fresh if changed else None

    def _read(self) -> Credentials:
        import botocore.exceptions

        try:
            value = self._get_client().get_secret_value(SecretId=self.secret.arn)
        except botocore.exceptions.ClientError as err:
            error = err.response.get("Error", {})
            code = error.get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            raise CredentialsError(
                f"cannot read the database login from {self.source}: {code}: {error.get('Message', '')}",
                retryable=code in _RETRYABLE_CODES or status >= 500,
            ) from None
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.NoRegionError) as err:
            raise CredentialsError(
                f"cannot read the database login from {self.source}: {err}", retryable=False
            ) from None
        except botocore.exceptions.BotoCoreError as err:  # connection failures and timeouts
            raise CredentialsError(
                f"cannot read the database login from {self.source}: {err}", retryable=True
            ) from None
        return self._parse(value.get("SecretString"))

    def _parse(self, text: str | None) -> Credentials:
        # The messages name what is missing, never the text, which holds the password.
        if text is None:
            raise CredentialsError(f"{self.source} has no SecretString (binary secrets are not supported)",
                                   retryable=False)
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise CredentialsError(f"{self.source} is not a JSON object", retryable=False)
        user, password = data.get("username"), data.get("password")
        if not isinstance(user, str) or not user or not isinstance(password, str):
            raise CredentialsError(f'{self.source} lacks a string "username" and "password"',
                                   retryable=False)
        return Credentials(user, password)

    def _get_client(self) -> Any:
        # gunicorn forks its workers from the master that made the first connection; a client's
        # pooled HTTPS connections must not be shared across that fork.
        if self._client is None or self._client_pid != os.getpid():
            self._client = self._client_factory()
            self._client_pid = os.getpid()
        return self._client

    def _boto3_client(self) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        # At DEBUG, botocore logs whole response bodies: here, the secret's text.
        botocore_log = logging.getLogger("botocore")
        if botocore_log.getEffectiveLevel() < logging.INFO:
            botocore_log.setLevel(logging.INFO)
        return boto3.session.Session().client(
            "secretsmanager",
            region_name=self.secret.region,
            endpoint_url=self.secret.endpoint_url or None,
            config=BotoConfig(
                connect_timeout=self._timeout,
                read_timeout=self._timeout,
                retries={"mode": "standard", "max_attempts": 3},
            ),
        )
