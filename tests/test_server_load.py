"""`ecso serve` under load, as a separate process on a free loopback port: a burst of concurrent clients is answered
or cleanly refused, and memory stays flat over sequential requests (the full 500-request soak is
`python bench/soak.py`)."""

from __future__ import annotations

import pytest

from support.reliability import ServerProcess, load, request, soak


@pytest.fixture(scope="module")
def server(demo_files):
    from ecso.models.demo import demo_mmproj_path
    from ecso.models.registry import cache_root

    # the demo projector at 112 px: 64 image tokens instead of 256, so image requests stay quick
    mmproj = str(demo_mmproj_path(cache_root(), image_size=112))
    args = ["--model", demo_files[0], "--mmproj", mmproj, "--ctx", "1024", "--max-tokens", "4",
            "--max-waiting", "6", "--image-cache", "3", "--threads", "1"]
    with ServerProcess(args) as s:
        yield s


def test_fifty_concurrent_clients_are_all_answered_or_cleanly_refused(server):
    report = load(server, clients=50, max_tokens=4)
    assert report.failures == []
    assert report.answered + report.refused == 50
    assert report.answered >= 7 and report.refused >= 1  # the one running + 6 waiting at least; the rest 429
    counts = request(server.port, "GET", "/health").json()["counts"]
    assert counts["answered"] >= report.answered and counts["failed"] == 0


def test_memory_stays_flat_over_sequential_requests_with_cache_evictions(server):
    report = soak(server, requests=60, image_pool=5, max_tokens=4, image_every=3, time_limit=600, progress=False)
    assert report.failures == [] and report.requests == 60
    assert report.growth < 0.05, (report.rss_start, report.rss_end)
    assert request(server.port, "GET", "/health").json()["image_cache_entries"] == 3  # bounded: LRU of 3
