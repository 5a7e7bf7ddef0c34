"""Callback targets that embed an IPv4 address are judged by the address they embed (issue:
hardening, finding 11: a 6to4 address embedding 127.0.0.1 was accepted)."""

from __future__ import annotations

import ipaddress

import pytest

from cogview_api.addresses import AllowList, UnsafeTarget, check_url, refusal_reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 of the cloud metadata address
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "private"),  # Teredo, client 127.0.0.1
        ("64:ff9b::7f00:1", "reserved"),  # NAT64 of 127.0.0.1
        ("2002:808:808::", None),  # 6to4 of 8.8.8.8: public
        ("8.8.8.8", None),
    ],
)
def test_an_address_that_embeds_ipv4_is_judged_by_it(address: str, reason: str | None) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) == reason


def test_a_callback_resolving_to_a_6to4_loopback_is_refused() -> None:
    def resolve(host: str, port: int) -> list[str]:
        return ["2002:7f00:1::"]

    with pytest.raises(UnsafeTarget, match="loopback"):
        check_url("https://hooks.example.com/cb", AllowList(), resolve)
