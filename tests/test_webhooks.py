"""stylequeue.webhooks without servers: signatures against a computation written here from the
Standard Webhooks scheme, verification, and where a delivery may go."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

from stylequeue.exceptions import ConfigError, JobSpecError, WebhookURLError, WebhookVerificationError
from stylequeue.job import JobSpec
from stylequeue.settings import Settings
from stylequeue.webhooks import check_url, new_secret, sign, signed_headers, signing_keys, verify

SECRET = "whsec_" + base64.b64encode(b"a key of twenty-four byt").decode()


def _reference(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The scheme, independently: HMAC-SHA256 keyed by the secret's base64 after "whsec_", over
    "{id}.{timestamp}.{body}", base64, behind "v1,"."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def test_signature_matches_the_reference_computation() -> None:
    body = json.dumps({"type": "job.succeeded", "data": {"job_id": "j-1", "status": "succeeded"}}).encode()
    assert sign(SECRET, "msg_1", 1_700_000_000, body) == _reference(SECRET, "msg_1", 1_700_000_000, body)
    headers = signed_headers(SECRET, "msg_2", body, now=1_700_000_123.9)
    assert headers["webhook-id"] == "msg_2" and headers["webhook-timestamp"] == "1700000123"
    assert headers["webhook-signature"] == _reference(SECRET, "msg_2", 1_700_000_123, body)
    # Rotation: one signature per key, space-separated; each key alone verifies.
    other = new_secret()
    both = sign(f"{SECRET},{other}", "m", 5, body).split(" ")
    assert both == [_reference(SECRET, "m", 5, body), _reference(other, "m", 5, body)]


def test_verify_accepts_a_good_delivery_and_refuses_forged_altered_and_old_ones() -> None:
    body = b'{"data":{"job_id":"j"}}'
    now = time.time()
    headers = signed_headers(SECRET, "msg_ok", body, now=now)
    verify(SECRET, headers, body, now=now + 10)
    verify(SECRET, {k.title(): v for k, v in headers.items()}, body.decode(), now=now)  # any header case
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(new_secret(), headers, body, now=now)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(SECRET, headers, body.replace(b"j", b"k"), now=now)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(SECRET, {**headers, "webhook-id": "msg_other"}, body, now=now)
    with pytest.raises(WebhookVerificationError, match="replay"):
        verify(SECRET, headers, body, now=now + 301)
    with pytest.raises(WebhookVerificationError, match="replay"):
        verify(SECRET, headers, body, now=now - 400)
    with pytest.raises(WebhookVerificationError, match="missing header"):
        verify(SECRET, {"webhook-id": "x"}, body, now=now)


@pytest.mark.parametrize("secret", ["", "plain-text", "whsec_not base64!"])
def test_a_secret_not_in_the_scheme_form_is_refused(secret: str) -> None:
    with pytest.raises(ConfigError, match="whsec_|WEBHOOK_SECRET"):
        signing_keys(secret)


def _resolver(table: dict[str, list[str]]):
    """Names resolve as this table says (the addresses a DNS answer could give)."""
    return lambda host, port: table[host]


@pytest.mark.parametrize("url,why", [
    ("ftp://hooks.example.com/x", "https://"),
    ("file:///etc/passwd", "https://"),
    ("https://user:pass@hooks.example.com/x", "credentials"),
    ("https://token@hooks.example.com/x", "credentials"),
    ("https:///no-host", "names no host"),
])
def test_url_form_is_checked_without_settings(url: str, why: str) -> None:
    with pytest.raises(WebhookURLError, match=why):
        check_url(url, None)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.7", "169.254.169.254", "::1",
                                     "fe80::1", "fd00::5", "::ffff:127.0.0.1", "224.0.0.251", "0.0.0.0",
                                     "100.64.0.1"])
def test_non_public_addresses_are_refused_under_a_wildcard(address: str) -> None:
    resolver = _resolver({"hooks.example.com": ["93.184.216.34", address]})
    with pytest.raises(WebhookURLError, match="non-public address"):
        check_url("https://hooks.example.com/x", "*.example.com", resolver=resolver)
    literal = f"[{address}]" if ":" in address else address
    with pytest.raises(WebhookURLError, match="non-public address"):
        check_url(f"http://{literal}:8080/x", "*")


def test_non_public_addresses_pass_when_the_host_is_listed_by_name() -> None:
    resolver = _resolver({"hooks.internal": ["10.0.0.5"]})
    assert check_url("http://hooks.internal/x", "hooks.internal", resolver=resolver).addresses == ("10.0.0.5",)
    assert check_url("http://127.0.0.1:9000/in?a=1", "127.0.0.1").path == "/in?a=1"
    assert check_url("http://127.0.0.1:9000/in", "http://127.0.0.1:9000/in/").port == 9000
    public = check_url("https://a.example.com/x", "*.example.com",
                       resolver=_resolver({"a.example.com": ["93.184.216.34"]}))
    assert (public.host, public.port, public.addresses) == ("a.example.com", 443, ("93.184.216.34",))


@pytest.mark.parametrize("url,allowed", [
    ("https://evil.com/x", "hooks.example.com"),
    ("https://hooks.example.com.evil.com/x", "https://hooks.example.com"),
    ("https://hooks.example.com/other", "https://hooks.example.com/in/"),
    ("https://hooks.example.com/in-evil", "https://hooks.example.com/in"),
    ("http://hooks.example.com/in/x", "https://hooks.example.com/in/"),
    ("https://hooks.example.com:8443/x", "hooks.example.com:443"),
    ("https://example.com/x", "*.example.com"),
    ("https://hooks.example.com/x", ""),
])
def test_urls_off_the_allow_list_are_refused(url: str, allowed: str) -> None:
    with pytest.raises(WebhookURLError, match="allow-list"):
        check_url(url, allowed, resolve=False)


def test_a_spec_with_a_webhook_is_checked_at_parse_and_its_webhook_leaves_the_digest_alone() -> None:
    base = {"job_id": "w-1", "content": "s3://b/c.png", "styles": ["s3://b/s.png"]}
    settings = Settings(storage_root="s3://b", webhook_allowed="hooks.example.com", webhook_secret=SECRET)
    spec = JobSpec.parse({**base, "webhook": {"url": "https://hooks.example.com/x", "events": ["started"]}},
                         settings)
    assert spec.webhook is not None and spec.webhook.events == ["started"]
    assert spec.digest() == JobSpec.parse(base).digest()
    assert "webhook" not in spec.public_dict()
    assert JobSpec.parse({**base, "webhook": {"url": "https://hooks.example.com/x"}}).webhook.events == [
        "succeeded", "failed", "cancelled", "timed_out"]
    with pytest.raises(JobSpecError, match="webhook.url: .*allow-list"):
        JobSpec.parse({**base, "webhook": {"url": "https://elsewhere.example.org/x"}}, settings)
    with pytest.raises(JobSpecError, match="unknown event"):
        JobSpec.parse({**base, "webhook": {"url": "https://hooks.example.com/x", "events": ["done"]}})
    assert "***" in repr(settings) and SECRET not in repr(settings)
