"""Who holds a token: opaque shared tokens (GATEWAY_AUTH_TOKENS) and JWTs verified with PyJWT, HS256 with a
shared secret (GATEWAY_JWT_SECRET) or RS256/ES256 with public keys from a JWKS file (GATEWAY_JWT_JWKS_FILE).

The algorithm always comes from configuration: HS256 for the secret, each JWKS key's own algorithm for that key
(from its ``alg``, else its key type), and only those in GATEWAY_JWT_ALGORITHMS; a token's header only picks the
key (``kid``), so ``alg: none`` and algorithm swaps are refused. ``exp`` and ``sub`` are required."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Optional

import jwt

log = logging.getLogger("gateway.auth")
JWKS_ALGORITHMS = ("RS256", "ES256")  # the default for keys from a JWKS file
REQUIRED_CLAIMS = ("exp", "sub")


_TOKEN_IN_URL = re.compile(r"(?i)([?&]token=)[^&\s\"']+")


class RedactTokens(logging.Filter):
    """Hides ``?token=`` values in log lines (uvicorn logs a WebSocket's whole URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower():
            record.msg, record.args = _TOKEN_IN_URL.sub(r"\1[redacted]", message), None
        return True


class AuthRefused(Exception):
    """A token that does not authenticate; the message says why (it is sent to the client)."""


@dataclass(frozen=True)
class Identity:
    """The holder of a verified token: its subject (a JWT's ``sub``; for an opaque token a digest of it) and when
    the token expires (epoch seconds; None: never)."""

    subject: str
    expires_at: Optional[float] = None
    shared: bool = False  # an opaque token, shared by whoever holds it: no per-subject session limit

    def expired(self, leeway_s: float = 0.0) -> bool:
        return self.expires_at is not None and time.time() > self.expires_at + leeway_s


ANONYMOUS = Identity("anonymous")  # every caller, when no auth is configured


@dataclass(frozen=True)
class AuthSettings:
    tokens: tuple[str, ...] = ()
    jwt_secret: str = ""
    jwks_file: str = ""
    audience: str = ""
    issuer: str = ""
    leeway_s: float = 30.0
    algorithms: tuple[str, ...] = JWKS_ALGORITHMS

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.jwt_secret or self.jwks_file)


class Authenticator:
    """Verifies a token into an ``Identity`` (or raises ``AuthRefused``). The JWKS file is read again when it
    changes, so keys rotate without a restart."""

    def __init__(self, settings: AuthSettings):
        self.settings = settings
        unknown = set(settings.algorithms) - set(JWKS_ALGORITHMS) - {"RS384", "RS512", "ES384", "ES512", "PS256",
                                                                      "PS384", "PS512", "EdDSA"}
        if unknown:
            raise ValueError(f"GATEWAY_JWT_ALGORITHMS: {', '.join(sorted(unknown))} not accepted for JWKS keys "
                             "(asymmetric algorithms only; HS256 comes with GATEWAY_JWT_SECRET)")
        self._jwks_lock = threading.Lock()
        self._jwks_stamp: Optional[tuple] = None
        self._keys: dict[Optional[str], jwt.PyJWK] = {}
        if settings.jwks_file:
            self._load_jwks()  # a bad file fails at start-up, not at the first token
        if (settings.jwt_secret or settings.jwks_file) and not settings.audience:
            log.warning("JWTs are accepted without an audience check: set GATEWAY_JWT_AUDIENCE, or tokens your "
                        "identity provider issues for other services are accepted here too")

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def verify(self, token: Optional[str]) -> Identity:
        if not self.enabled:
            return ANONYMOUS
        if not token:
            raise AuthRefused("missing auth token")
        digest = hashlib.sha256(token.encode()).digest()  # compared as digests: no timing from the length either
        matches = [hmac.compare_digest(digest, hashlib.sha256(known.encode()).digest())
                   for known in self.settings.tokens]
        if any(matches):  # every token compared: no early exit on a match
            return Identity("token:" + digest.hex()[:12], shared=True)
        if not (self.settings.jwt_secret or self.settings.jwks_file):
            raise AuthRefused("invalid auth token")
        return self._verify_jwt(token)

    # -- JWT -----------------------------------------------------------------------------------------------

    def _verify_jwt(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthRefused("invalid auth token (neither a configured token nor a JWT)") from None
        key, algorithm = self._key_for(header)
        options = {"require": list(REQUIRED_CLAIMS), "verify_aud": bool(self.settings.audience)}
        try:
            claims = jwt.decode(token, key, algorithms=[algorithm], audience=self.settings.audience or None,
                                issuer=self.settings.issuer or None, leeway=self.settings.leeway_s, options=options)
        except jwt.ExpiredSignatureError:
            raise AuthRefused("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthRefused("token not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthRefused(f"token audience is not {self.settings.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthRefused(f"token issuer is not {self.settings.issuer!r}") from None
        except jwt.InvalidSignatureError:
            raise AuthRefused("token signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise AuthRefused(f"token algorithm {str(header.get('alg'))[:20]!r} is not accepted here "
                              f"(this key: {algorithm})") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthRefused(f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidKeyError as exc:  # a configured key unusable for its algorithm: the operator's to fix
            log.error("JWT key for %r unusable: %s", header.get("kid"), exc)
            raise AuthRefused("token names a key this gateway cannot use") from None
        except jwt.PyJWTError:
            raise AuthRefused("invalid token (malformed)") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject.strip():
            raise AuthRefused("token 'sub' claim is empty")
        try:
            expires_at = float(claims["exp"])
        except (TypeError, ValueError, OverflowError):
            raise AuthRefused("token 'exp' claim is not a time") from None
        return Identity(subject, expires_at)

    def _key_for(self, header: dict) -> tuple[object, str]:
        """The configured key this token names, and the one algorithm configured for it: the secret for HS256
        tokens (whatever their ``kid``: a JWKS never holds HS keys), else the JWKS key its ``kid`` names."""
        if self.settings.jwt_secret and (header.get("alg") == "HS256" or not self.settings.jwks_file):
            return self.settings.jwt_secret, "HS256"
        kid = header.get("kid")
        keys = self._load_jwks()
        key = keys.get(kid) if isinstance(kid, str) else (next(iter(keys.values())) if len(keys) == 1 else None)
        if key is None:
            raise AuthRefused("token names no key in the configured JWKS" if kid is not None else
                              "token names no key (kid) and the JWKS holds several")
        return key.key, key.algorithm_name

    def _load_jwks(self) -> dict:
        path = self.settings.jwks_file
        try:
            status = os.stat(path)
        except OSError as exc:
            if self._keys:  # keep the last good keys while the file is being replaced
                log.warning("JWKS file %s unreadable (%s); keeping the keys read before", path, exc)
                return self._keys
            raise ValueError(f"GATEWAY_JWT_JWKS_FILE {path!r}: {exc.strerror}") from None
        stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        with self._jwks_lock:
            if stamp == self._jwks_stamp:
                return self._keys
            try:
                with open(path, encoding="utf-8") as file:
                    keys = self._parse_jwks(json.load(file))
            except (OSError, ValueError) as exc:
                if self._keys:
                    log.warning("JWKS file %s is unusable (%s); keeping the keys read before", path, exc)
                    self._jwks_stamp = stamp  # not parsed again until it changes
                    return self._keys
                raise ValueError(f"GATEWAY_JWT_JWKS_FILE {path!r} is not a usable JWKS: {exc}") from None
            if self._jwks_stamp is not None:
                log.warning("JWKS file %s changed: %d keys now", path, len(keys))
            self._keys, self._jwks_stamp = keys, stamp
            return keys

    def _parse_jwks(self, document) -> dict:
        """The signing keys of a JWKS document with an accepted algorithm; an unusable key is skipped (logged)."""
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("expected a JSON object with a 'keys' list")
        keys: dict[Optional[str], jwt.PyJWK] = {}
        for index, entry in enumerate(document["keys"]):
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue  # not a key, or an encryption key
            try:
                key = jwt.PyJWK(entry)
                key.Algorithm.prepare_key(key.key)  # a curve that does not fit its algorithm fails here, not later
            except jwt.PyJWTError as exc:
                log.warning("JWKS key %d (%r) skipped: %s", index, entry.get("kid"), exc)
                continue
            if key.algorithm_name not in self.settings.algorithms:
                log.warning("JWKS key %r (%s) skipped: GATEWAY_JWT_ALGORITHMS allows %s", key.key_id,
                            key.algorithm_name, ", ".join(self.settings.algorithms))
                continue
            if key.key_id in keys:
                log.warning("JWKS key %r appears twice; the first is used", key.key_id)
                continue
            keys[key.key_id] = key
        if not keys:
            raise ValueError("no signing key with an accepted algorithm")
        return keys


class SubjectSessions:
    """Sessions (WebSocket sessions and OpenAI speech requests) open per JWT subject on this gateway, with a limit
    per subject (opaque tokens are shared secrets: not limited)."""

    def __init__(self, limit: int):
        self.limit = limit  # 0: no limit
        self.open: dict[str, int] = {}

    def try_open(self, identity: Identity) -> bool:
        count = self.open.get(identity.subject, 0)
        if self.limit and identity is not ANONYMOUS and not identity.shared and count >= self.limit:
            return False
        self.open[identity.subject] = count + 1
        return True

    def close(self, identity: Identity) -> None:
        count = self.open.get(identity.subject, 0) - 1
        if count > 0:
            self.open[identity.subject] = count
        else:
            self.open.pop(identity.subject, None)
