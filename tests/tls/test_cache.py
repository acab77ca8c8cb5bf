"""The leaf and SSLContext caches: reuse, the size bound, LRU order, re-issue before expiry, and thread safety."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from tests.tls.conftest import FakeClock, MakeCa

from oisp.tls import CertificateAuthority
from oisp.tls.ca import RENEW_BEFORE


def test_same_host_gets_the_cached_leaf_and_context(ca: CertificateAuthority) -> None:
    leaf = ca.leaf_for("api.openai.com")
    assert ca.leaf_for("API.OPENAI.COM.") is leaf
    context = ca.server_context("api.openai.com", ["h2"])
    assert ca.server_context("api.openai.com", ("h2",)) is context
    assert ca.leaf_for("api.openai.com") is leaf  # the context was built from the cached leaf


def test_contexts_are_per_alpn_but_share_the_leaf(ca: CertificateAuthority) -> None:
    leaf = ca.leaf_for("api.openai.com")
    h2 = ca.server_context("api.openai.com", ["h2"])
    h1 = ca.server_context("api.openai.com", ["http/1.1"])
    unset = ca.server_context("api.openai.com", None)
    assert len({id(h2), id(h1), id(unset)}) == 3
    assert ca.leaf_for("api.openai.com") is leaf


def test_leaf_cache_is_bounded_and_evicts_the_least_recently_used(make_ca: MakeCa) -> None:
    ca = make_ca(cache_size=2)
    a, b = ca.leaf_for("a.example.com"), ca.leaf_for("b.example.com")
    assert ca.leaf_for("a.example.com") is a  # a is now the most recently used
    ca.leaf_for("c.example.com")  # evicts b
    assert len(ca._leaves) == 2
    assert ca.leaf_for("a.example.com") is a
    again = ca.leaf_for("b.example.com")
    assert again is not b
    assert again.certificate.serial_number != b.certificate.serial_number


def test_context_cache_is_bounded(make_ca: MakeCa) -> None:
    ca = make_ca(cache_size=2)
    first = ca.server_context("a.example.com", ["h2"])
    ca.server_context("b.example.com", ["h2"])
    ca.server_context("c.example.com", ["h2"])
    assert len(ca._contexts) == 2
    assert ca.server_context("a.example.com", ["h2"]) is not first


def test_leaf_is_reissued_once_it_is_close_to_expiry(make_ca: MakeCa, clock: FakeClock) -> None:
    ca = make_ca()
    leaf = ca.leaf_for("api.openai.com")
    context = ca.server_context("api.openai.com", ["h2"])
    clock.now = leaf.not_after - RENEW_BEFORE - timedelta(seconds=1)
    assert ca.leaf_for("api.openai.com") is leaf
    assert ca.server_context("api.openai.com", ["h2"]) is context
    clock.now = leaf.not_after - RENEW_BEFORE
    renewed = ca.leaf_for("api.openai.com")
    assert renewed is not leaf
    assert renewed.not_after > leaf.not_after
    assert renewed.not_before <= clock.now
    assert ca.server_context("api.openai.com", ["h2"]) is not context


def test_context_is_reissued_with_a_fresh_leaf_even_if_only_the_context_was_cached(
    make_ca: MakeCa, clock: FakeClock
) -> None:
    ca = make_ca()
    context = ca.server_context("api.openai.com", ["h2"])
    old_leaf = ca.leaf_for("api.openai.com")
    clock.now = old_leaf.not_after - RENEW_BEFORE
    new_context = ca.server_context("api.openai.com", ["h2"])
    assert new_context is not context
    assert ca.leaf_for("api.openai.com").not_after > old_leaf.not_after


def test_leaf_is_reissued_when_the_clock_goes_back_before_its_start(make_ca: MakeCa, clock: FakeClock) -> None:
    ca = make_ca()
    clock.now += timedelta(days=30)
    leaf = ca.leaf_for("api.openai.com")
    clock.now = leaf.not_before - timedelta(seconds=1)
    assert ca.leaf_for("api.openai.com") is not leaf


def test_concurrent_requests_for_a_host_get_one_leaf(ca: CertificateAuthority) -> None:
    hosts = [f"h{i % 8}.example.com" for i in range(400)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        leaves = list(pool.map(ca.leaf_for, hosts))
        contexts = list(pool.map(lambda host: ca.server_context(host, ["h2"]), hosts))
    for host in set(hosts):
        assert len({id(leaf) for leaf, name in zip(leaves, hosts, strict=True) if name == host}) == 1
        assert len({id(ctx) for ctx, name in zip(contexts, hosts, strict=True) if name == host}) == 1
