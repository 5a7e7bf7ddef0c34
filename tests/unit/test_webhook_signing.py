"""Webhook signatures follow the Standard Webhooks scheme byte for byte, so a receiver's own
library (Svix's, standardwebhooks') accepts them; and callback targets inside the server's
network are refused unless the operator allows them."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from pydantic import ValidationError

from cogview_api import signing
from cogview_api.addresses import (
    AllowList,
    UnsafeTarget,
    check_url,
    parse_allow_list,
)
from cogview_api.config import Settings

# The test vector published with the Standard Webhooks reference libraries.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_reproduces_the_spec_test_vector() -> None:
    assert signing.sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_new_secrets_sign_what_an_independent_verifier_accepts() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    headers = signing.headers(secret, "msg_1", 1700000000, b'{"a": 1}')
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, b'msg_1.1700000000.{"a": 1}', hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == "1700000000"
    assert signing.new_secret() != secret


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("unknown host")
        return table[host]

    return resolve


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.5.6.7", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.10", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not publicly routable"),
        ("::ffff:10.0.0.1", "private"),
    ],
)
def test_internal_addresses_are_refused(address: str, reason: str) -> None:
    resolve = resolver({"hooks.example": [address]})
    with pytest.raises(UnsafeTarget, match=f"\\({reason}\\)"):
        check_url("https://hooks.example/cb", AllowList(), resolve)


def test_public_addresses_pass_and_one_internal_answer_spoils_them() -> None:
    public = resolver(
        {"hooks.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]}
    )
    target = check_url("https://hooks.example:8443/cb?x=1", AllowList(), public)
    assert target.port == 8443 and target.addresses[0] == "93.184.215.14"
    mixed = resolver({"hooks.example": ["93.184.215.14", "10.0.0.7"]})
    with pytest.raises(UnsafeTarget, match="non-public address"):
        check_url("https://hooks.example/cb", AllowList(), mixed)


def test_a_refusal_names_no_internal_address_but_the_log_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client (at submit, and in an attempt's error) must not learn where internal names
    point; the operator's log says it."""
    internal = resolver({"db.internal": ["10.1.2.3"]})
    with (
        caplog.at_level("INFO", logger="cogview_api.addresses"),
        pytest.raises(UnsafeTarget) as refused,
    ):
        check_url("https://db.internal/cb", AllowList(), internal)
    assert "10.1.2.3" not in str(refused.value) and "(private)" in str(refused.value)
    assert "10.1.2.3" in caplog.text


def test_an_international_host_is_resolved_and_sent_in_its_ascii_form() -> None:
    seen: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        seen.append(host)
        return ["93.184.215.14"]

    target = check_url("https://B\u00fccher.example/hook", AllowList(), resolve)
    assert target.host == seen[0] == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    "url", ["http://a..b/", f"http://{'x' * 64}.example/", "http://\u00fc..example/"]
)
def test_a_malformed_host_is_refused_not_raised(url: str) -> None:
    """The real resolver raises UnicodeError for these: it must be a refusal (400), not a
    500 at submit nor an escaped error at delivery."""
    with pytest.raises(UnsafeTarget):
        check_url(url, AllowList())


def test_the_operator_allow_list_admits_hosts_and_networks() -> None:
    allow = parse_allow_list(" 127.0.0.1, 10.0.0.0/8 ,Hooks.Internal, ::1")
    resolve = resolver({"hooks.internal": ["192.168.5.5"], "other": ["192.168.5.5"]})
    assert check_url("http://127.0.0.1:9000/x", allow).addresses == ("127.0.0.1",)
    assert check_url("http://10.9.8.7/x", allow).addresses == ("10.9.8.7",)
    assert check_url("http://[::1]:81/x", allow).addresses == ("::1",)
    assert check_url("http://hooks.internal/x", allow, resolve).addresses == ("192.168.5.5",)
    with pytest.raises(UnsafeTarget):
        check_url("http://other/x", allow, resolve)
    with pytest.raises(UnsafeTarget):
        check_url("http://127.0.0.2/x", allow)


@pytest.mark.parametrize(
    "url",
    ["ftp://hooks.example/x", "hooks.example/x", "http:///x", "http://a b/", "http://h:99999/"],
)
def test_urls_that_are_not_http_targets_are_refused(url: str) -> None:
    with pytest.raises(UnsafeTarget):
        check_url(url, AllowList(), resolver({"hooks.example": ["93.184.215.14"]}))


def test_a_host_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(UnsafeTarget, match="does not resolve"):
        check_url("https://nowhere.example/x", AllowList(), resolver({}))


def test_settings_refuse_a_bad_allow_list_or_schedule() -> None:
    with pytest.raises(ValidationError, match="allow-list entry"):
        Settings(webhook_allow_hosts="10.0.0.0/8, not a host")
    with pytest.raises(ValidationError, match="retry schedule"):
        Settings(webhook_retry_schedule="5,soon")
    assert Settings(webhook_retry_schedule="1, 2.5").webhook_retry_delays == (1.0, 2.5)
    assert sum(Settings().webhook_retry_delays) >= 3600  # the contract: at least an hour
