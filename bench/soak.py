"""Reliability figures in one command: bad inputs (server, CLI, API), 50 concurrent clients, a 500-request soak.

    python bench/soak.py                      # docs/server.md's figures (~15-30 min on 2 busy CPU cores)
    python bench/soak.py --requests 60 --json soak.json

Loopback only: the server runs as a child process (`ecso serve` on a free 127.0.0.1 port, with an API key) on the
demo model. Exit code 0 only when every case passed, no request failed and RSS grew less than --max-growth.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the harness is test support code
from support import reliability as rel  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500, help="sequential soak requests after the warm-up")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients in the burst")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--image-every", type=int, default=4, help="every Nth soak request carries an image")
    p.add_argument("--time-limit", type=float, default=3600.0, help="seconds for the soak; it stops early after")
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth over the soak")
    p.add_argument("--threads", type=int, default=None, help="server CPU threads (default: all cores; 1 is "
                   "faster on a machine busy with other work)")
    p.add_argument("--skip-cli", action="store_true", help="skip the CLI cases (each starts a process)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure and case here")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` still stops the child server (context managers run)

    from ecso.models.registry import resolve
    from ecso.runtime import Engine, EngineConfig

    demo = resolve("demo")
    t0 = time.perf_counter()
    max_image, max_body = 1 << 20, 4 << 20
    with tempfile.TemporaryDirectory(prefix="ecso-soak-") as tmp:
        models = rel.bad_models(Path(tmp) / "models", demo.model)
        args = ["--model", demo.model, "--mmproj", demo.mmproj, "--ctx", "2048", "--max-tokens", str(a.max_tokens),
                "--max-waiting", "8", "--image-cache", "8", "--max-image-mb", "1", "--max-body-mb", "4"]
        if a.threads:
            args += ["--threads", str(a.threads)]
        with rel.ServerProcess(args, api_key="soak-test-key") as server:
            outcomes = list(rel.server_cases(server, max_image, max_body))
            burst = rel.load(server, a.clients, a.max_tokens)
            soaked = rel.soak(server, a.requests, max_tokens=a.max_tokens, image_every=a.image_every,
                              time_limit=a.time_limit)
        with Engine(EngineConfig(model=demo.model, mmproj=demo.mmproj, n_ctx=2048)) as engine:
            outcomes += list(rel.api_cases(engine, models, demo.model))
        if not a.skip_cli:
            outcomes += list(rel.cli_cases(models, Path(tmp) / "cli", demo.model))
    seconds = time.perf_counter() - t0

    passed = sum(o.passed for o in outcomes)
    per = {s: (sum(o.passed for o in outcomes if o.surface == s), sum(o.surface == s for o in outcomes))
           for s in ("server", "cli", "api")}
    mb = lambda b: b / 2**20  # noqa: E731
    print(f"bad inputs: {len(outcomes)} cases tried, {passed} passed "
          f"({', '.join(f'{s} {ok}/{n}' for s, (ok, n) in per.items() if n)})")
    for o in outcomes:
        if not o.passed:
            print(f"  FAILED [{o.surface}] {o.case}: {o.detail}")
    print(f"load: {burst.clients} concurrent clients -> {burst.answered} answered, {burst.refused} refused "
          f"(429/503), {len(burst.failures)} failures, {burst.seconds:.1f} s")
    for f in burst.failures[:10]:
        print(f"  FAILED {f}")
    print(f"soak: {soaked.requests} sequential requests (+{soaked.image_pool} warm-up), {len(soaked.failures)} "
          f"failures; RSS {mb(soaked.rss_loaded):.1f} MB loaded, {mb(soaked.rss_start):.1f} MB after warm-up -> "
          f"{mb(soaked.rss_end):.1f} MB at the end ({soaked.growth:+.1%}), max {mb(soaked.rss_max):.1f} MB; "
          f"{soaked.seconds:.0f} s{' (time limit reached)' if soaked.stopped_early else ''}")
    for f in soaked.failures[:10]:
        print(f"  FAILED {f}")
    print(f"total {seconds:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"cases": [vars(o) for o in outcomes], "load": rel.as_dict(burst),
                                      "soak": rel.as_dict(soaked), "seconds": seconds}, indent=2))
    ok = passed == len(outcomes) and not burst.failures and not soaked.failures and soaked.growth < a.max_growth
    return 0 if ok else 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
