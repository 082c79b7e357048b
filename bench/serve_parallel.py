"""`ecso serve --parallel N` against `--parallel 1`, side by side in one run: N concurrent clients, wall time.

    python bench/serve_parallel.py                       # docs/server.md's figure (4 clients, 3 rounds, ~2-4 min)
    python bench/serve_parallel.py --clients 4 --rounds 1 --max-tokens 16

Loopback only: both servers run as child processes (`ecso serve` on free 127.0.0.1 ports) on the demo model, both
loaded for the whole run; the rounds alternate between them, so only one is busy at a time and both see the same
machine load. Each round sends N new requests (different queries, half with an image never sent before, so no side
gains from its image cache) at once to each side and waits for all N replies. Prints each side's median wall time,
the median of the per-round ratios (the machine's speed drifts between rounds, less within one) and the load
average around the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the harness is test support code
from support import reliability as rel  # noqa: E402

QUERIES = ["What is in this picture?", "Describe the colours you see.", "Name three fruits and their colours.",
           "Is this a safe place to walk at night?", "Write one sentence about the sea.", "What time of day is it?",
           "List two animals that live in forests.", "Is there a person here?"]


def burst(port: int, bodies: list[dict]) -> tuple[float, list[dict]]:
    """Sends every body at once; returns the wall time until the last reply and the replies."""
    replies: list = [None] * len(bodies)
    gate = threading.Barrier(len(bodies) + 1)

    def one(i: int) -> None:
        gate.wait()
        replies[i] = rel.request(port, "POST", "/v1/chat/completions", bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    bad = [r for r in replies if r.status != 200]
    if bad:
        raise SystemExit(f"a request failed: {bad[0].status} {bad[0].body[:300]!r}")
    return seconds, [r.json() for r in replies]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4, help="concurrent requests, and the batched side's --parallel")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="server CPU threads (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)

    from ecso.models.registry import resolve

    demo = resolve("demo")
    common = ["--model", demo.model, "--mmproj", demo.mmproj, "--ctx", "2048", "--max-waiting", str(a.clients)]
    if a.threads:
        common += ["--threads", str(a.threads)]
    def bodies(r: int) -> list[dict]:
        return [rel.chat_body(QUERIES[(r + i) % len(QUERIES)], rel.good_png(seed=1000 * r + i) if i % 2 == 0 else None,
                              max_tokens=a.max_tokens) for i in range(a.clients)]

    load_before = os.getloadavg()
    times: dict[int, list[float]] = {1: [], a.clients: []}
    verdicts: dict[int, list[bool]] = {}
    with rel.ServerProcess(common + ["--parallel", "1"]) as one, \
            rel.ServerProcess(common + ["--parallel", str(a.clients)]) as many:
        for r in range(a.rounds):
            for n, server in ((1, one), (a.clients, many)) if r % 2 == 0 else ((a.clients, many), (1, one)):
                seconds, replies = burst(server.port, bodies(r))
                times[n].append(seconds)
                verdicts.setdefault(n, []).extend(x["ecso"]["unsafe"] for x in replies)
                print(f"round {r + 1}: --parallel {n}: {seconds:.2f} s for {a.clients} concurrent requests",
                      flush=True)
    load_after = os.getloadavg()
    med = {n: statistics.median(ts) for n, ts in times.items()}
    ratio = statistics.median(t1 / tn for t1, tn in zip(times[1], times[a.clients]))
    print(f"\n{a.clients} concurrent requests (demo model, {a.max_tokens}-token answers, paper judge), median of "
          f"{a.rounds} rounds: --parallel 1 {med[1]:.2f} s, --parallel {a.clients} {med[a.clients]:.2f} s "
          f"-> median per-round speed-up {ratio:.2f}x; verdicts equal: "
          f"{sum(x == y for x, y in zip(verdicts[1], verdicts[a.clients]))}/{len(verdicts[1])}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    if a.json:
        a.json.write_text(json.dumps({"clients": a.clients, "max_tokens": a.max_tokens, "seconds": times,
                                      "median": med, "ratio": ratio, "load": [load_before, load_after]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
