"""Webhooks as a deployment and a receiver see them: where a delivery may go, how it is signed.

Deliveries are signed in the manner of the Standard Webhooks scheme (standardwebhooks.com), so a
receiver can use that project's libraries or the few lines of :func:`verify`:

    webhook-id:        the delivery's id, the same on every retry of it (a receiver drops repeats)
    webhook-timestamp: unix seconds of this attempt (a receiver refuses old ones: replays)
    webhook-signature: "v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>", space-separated
                       when the deployment signs with several keys while rotating them

The key is the deployment's ``webhook_secret``, ``whsec_`` followed by the key's base64.

A webhook URL is a request this service makes on a producer's behalf, so it goes only where the
deployment allows (:func:`check_url`): http or https, no credentials in it, a host on the
allow-list, and no private, loopback, link-local, multicast or reserved address unless the host
(or a URL prefix naming it) is listed by name. :func:`post` connects to an address that was
checked, never to a second DNS answer, and follows no redirect.

No Celery, storage or torch here: job.py checks URLs at submit, tasks/webhook.py sends, and a
receiver imports :func:`verify` alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from stylequeue import __version__
from stylequeue.exceptions import ConfigError, WebhookURLError, WebhookVerificationError

# What a job may subscribe to; the terminal ones are what it gets when it names none.
EVENTS = ("started", "progress", "succeeded", "failed", "cancelled", "timed_out")
TERMINAL_EVENTS = ("succeeded", "failed", "cancelled", "timed_out")
SECRET_PREFIX = "whsec_"
# How far a delivery's timestamp may be from the receiver's clock (the scheme suggests 5 minutes).
TOLERANCE_S = 300

Resolver = Callable[[str, int], Sequence[str]]


# --- signatures ---------------------------------------------------------------------------------

def new_secret() -> str:
    """A fresh deployment secret in the scheme's form (24 random bytes)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def signing_keys(secret: str) -> list[bytes]:
    """The HMAC keys of ``secret``: one ``whsec_<base64>``, or several comma-separated (rotation)."""
    keys = []
    for part in (p.strip() for p in secret.split(",")):
        if not part:
            continue
        try:
            if not part.startswith(SECRET_PREFIX):
                raise ValueError(part)
            keys.append(base64.b64decode(part[len(SECRET_PREFIX):], validate=True))
        except (ValueError, binascii.Error):
            raise ConfigError(
                "a webhook secret is 'whsec_' followed by base64 (STYLEQUEUE_WEBHOOK_SECRET); make one with "
                "python -c 'from stylequeue.webhooks import new_secret; print(new_secret())'"
            ) from None
    if not keys:
        raise ConfigError("no webhook secret is set: set STYLEQUEUE_WEBHOOK_SECRET (whsec_<base64>)")
    return keys


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>`` for each key, space-separated."""
    return " ".join(f"v1,{_digest(key, msg_id, timestamp, body)}" for key in signing_keys(secret))


def signed_headers(secret: str, msg_id: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The three headers of one delivery attempt (a fresh timestamp each attempt, the same id)."""
    timestamp = int(time.time() if now is None else now)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def verify(secret: str, headers: Mapping[str, str], body: bytes | str, *, tolerance_s: float = TOLERANCE_S,
           now: float | None = None) -> None:
    """Raise :class:`WebhookVerificationError` unless the delivery was signed with ``secret``
    (any of its keys) and its timestamp is within ``tolerance_s`` of ``now``.

    ``body`` must be the raw bytes received, before any JSON parsing. Keep the ``webhook-id`` of
    what you accepted to drop repeats: a retried delivery keeps its id.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not lower.get(h)]
    if missing:
        raise WebhookVerificationError(f"missing header(s) {', '.join(missing)}: not a stylequeue delivery")
    try:
        timestamp = int(lower["webhook-timestamp"])
    except ValueError:
        raise WebhookVerificationError(
            f"webhook-timestamp {lower['webhook-timestamp']!r} is not unix seconds") from None
    skew = (time.time() if now is None else now) - timestamp
    if abs(skew) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {skew:+.0f} s from this clock (tolerance {tolerance_s} s): a replay, "
            "or a clock out of sync")
    raw = body.encode() if isinstance(body, str) else body
    given = [s.split(",", 1)[1] for s in lower["webhook-signature"].split() if s.startswith("v1,")]
    for key in signing_keys(secret):
        expected = _digest(key, lower["webhook-id"], timestamp, raw)
        if any(hmac.compare_digest(expected, sig) for sig in given):
            return
    raise WebhookVerificationError("webhook-signature does not match: another secret, or an altered body")


# --- where deliveries may go --------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A checked webhook URL: where to connect (``addresses``, all checked) and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class AllowEntry:
    """One entry of ``webhook_allowed``: a host (``*.domain`` and ``*`` are wildcards), or a URL prefix."""

    text: str
    host: str  # lower case; "*" or "*.domain" for wildcards
    port: int | None = None
    scheme: str | None = None  # prefixes only
    path: str | None = None  # prefixes only

    @classmethod
    def parse(cls, text: str) -> "AllowEntry":
        if "://" in text:
            parts = urlsplit(text)
            return cls(text, (parts.hostname or "").lower(), _port(parts, text), parts.scheme.lower(),
                       parts.path or "/")
        if text == "*" or text.startswith("*."):
            return cls(text, text.lower())
        parts = urlsplit(f"//{text}")
        return cls(text, (parts.hostname or "").lower(), parts.port if parts.port else None)

    @property
    def named(self) -> bool:
        """Listed by name (not a wildcard): its private addresses are allowed."""
        return not self.host.startswith("*")

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        if self.host == "*":
            host_ok = True
        elif self.host.startswith("*."):
            host_ok = host.endswith(self.host[1:])
        else:
            host_ok = host == self.host
        if not host_ok or (self.port is not None and port != self.port):
            return False
        if self.scheme is None:
            return True
        base = (self.path or "/").rstrip("/")  # "/in" and "/in/" both mean /in and below it
        return scheme == self.scheme and (path == base or path.startswith(base + "/"))


def _port(parts: object, url: str) -> int:
    try:
        port = parts.port  # type: ignore[attr-defined]
    except ValueError:
        raise WebhookURLError(f"webhook URL {url!r} has an invalid port") from None
    return port or (443 if parts.scheme.lower() == "https" else 80)  # type: ignore[attr-defined]


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookURLError(f"webhook host {host!r} does not resolve ({exc}); check the URL") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def check_url(url: str, allowed: str | None, *, resolve: bool = True, resolver: Resolver = _resolve) -> Target:
    """``url`` as a :class:`Target`, or :class:`WebhookURLError` saying why it is refused.

    ``allowed`` is the deployment's ``webhook_allowed`` (None: only the URL's form is checked).
    With ``resolve``, the host's addresses are looked up and every one must be public, unless the
    allow-list names the host; an IP literal is checked either way.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookURLError(f"webhook URL {url!r} must start with https:// or http://")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLError(
            f"webhook URL {url.split('@', 1)[-1]!r} carries credentials (user:password@): deliveries are "
            "signed instead (webhook-signature); remove them")
    host = (parts.hostname or "").lower()
    if not host:
        raise WebhookURLError(f"webhook URL {url!r} names no host")
    port = _port(parts, url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if allowed is None:
        return Target(url, scheme, host, port, path, ())
    entries = [AllowEntry.parse(p.strip()) for p in allowed.split(",") if p.strip()]
    matched = [e for e in entries if e.matches(scheme, host, port, parts.path or "/")]
    if not matched:
        where = f"only to {allowed}" if entries else "to no URL"
        raise WebhookURLError(
            f"webhook URL {url!r} is not on this deployment's allow-list (it sends {where}); use an allowed "
            "URL, or ask the operator to add its host to STYLEQUEUE_WEBHOOK_ALLOWED")
    addresses: list[str] = [host] if _literal(host) else (list(resolver(host, port)) if resolve else [])
    if not any(e.named for e in matched):
        private = [a for a in addresses if not _is_public(a)]
        if private:
            raise WebhookURLError(
                f"webhook URL {url!r} leads to the non-public address {private[0]} (private, loopback, "
                "link-local, multicast or reserved); such hosts are refused unless STYLEQUEUE_WEBHOOK_ALLOWED "
                "lists them by name")
    return Target(url, scheme, host, port, path, tuple(addresses))


# --- sending ------------------------------------------------------------------------------------

class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to an address already checked, verifying the certificate against the URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(target: Target, headers: Mapping[str, str], body: bytes, timeout_s: float) -> int:
    """POST ``body`` to ``target`` (to its first reachable checked address); the HTTP status.

    Redirects are answers like any other (never followed); ``timeout_s`` bounds each socket step.
    Raises OSError (refused, timed out, TLS) when no address answers.
    """
    if not target.addresses:
        raise WebhookURLError(f"webhook URL {target.url!r} was not resolved before sending")
    default = 443 if target.scheme == "https" else 80
    host_header = target.host if ":" not in target.host else f"[{target.host}]"
    host_header += "" if target.port == default else f":{target.port}"
    sent = {"Host": host_header, "Content-Type": "application/json",
            "User-Agent": f"stylequeue/{__version__} (webhooks)", **headers}
    error: OSError | None = None
    for address in target.addresses:
        conn: http.client.HTTPConnection = (
            _PinnedHTTPS(target.host, address, target.port, timeout_s) if target.scheme == "https"
            else http.client.HTTPConnection(address, target.port, timeout=timeout_s))
        try:
            conn.request("POST", target.path, body=body, headers=sent)
            response = conn.getresponse()
            response.read(65536)  # what the receiver says is not kept: only its status counts
            return response.status
        except ConnectionRefusedError as exc:
            error = exc  # the next checked address may answer
        finally:
            conn.close()
    assert error is not None
    raise error


__all__ = ["EVENTS", "TERMINAL_EVENTS", "AllowEntry", "Target", "check_url", "new_secret", "post", "sign",
           "signed_headers", "signing_keys", "verify"]
