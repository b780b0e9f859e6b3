"""The one sliding-window limiter (logins, share-link opens) and the key a client is counted by."""

from __future__ import annotations

from pacs.security.login_guard import LoginGuard, LoginRefused
from pacs.security.ratelimit import RateLimiter, client_key


def test_client_key_ignores_the_port_and_counts_ipv6_by_its_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7" != client_key("192.0.2.8")
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7" and client_key("[2001:db8::1]") == "2001:db8::/64"
    assert client_key("testclient") == "testclient"


def test_a_flood_of_new_keys_never_resets_a_live_counter_and_expired_ones_are_dropped() -> None:
    now = [0.0]
    limiter = RateLimiter(2, window_s=60, max_keys=100, clock=lambda: now[0])
    limiter.hit("guesser")
    limiter.hit("guesser")
    for i in range(1000):  # ten times max_keys, all live
        limiter.hit(f"flood-{i}")
    assert limiter.limited("guesser") and len(limiter) == 1001
    now[0] = 61.0
    for i in range(700):  # the next prune comes at twice the live keys (amortised): 1001 → 1600 tracked
        limiter.hit(f"later-{i}")
    assert not limiter.limited("guesser") and len(limiter) <= 700  # the expired keys went


def test_a_key_keeps_at_most_limit_events_and_retry_after_follows_the_oldest_counted() -> None:
    now = [0.0]
    limiter = RateLimiter(3, window_s=60, clock=lambda: now[0])
    for t in range(10):
        now[0] = float(t)
        limiter.hit("k")
    assert limiter.limited("k")
    assert limiter.retry_after("k") == 60 - (9 - 7) + 1  # the third newest event (t=7) leaves at 67
    now[0] = 67.0
    assert not limiter.limited("k")


def test_login_attempts_from_one_ipv6_network_share_a_window() -> None:
    guard = LoginGuard(attempts_per_minute=2, max_concurrent=2)
    refused = 0
    for i in range(1, 30):  # another address of the same /64 for every attempt
        try:
            guard.attempt(f"user{i}", f"2001:db8:7:7::{i:x}", lambda: None)
        except LoginRefused as exc:
            assert exc.status == 429
            refused += 1
    assert refused > 0  # the per-address window (5 × 2 a minute) caught the whole /64
