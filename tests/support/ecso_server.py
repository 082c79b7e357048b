"""`ecso serve` in this process on a free loopback port, shared by tests/test_server.py and
tests/test_eval_paper_runs.py."""

from __future__ import annotations

from ecso.runtime import EcsoOptions
from ecso.server import EcsoServer, ServerConfig


def start_server(engine, **kw) -> EcsoServer:
    """An EcsoServer on `engine` (short answers, no request log) started on port 0; `kw`: ServerConfig overrides."""
    cfg = dict(port=0, model_name="demo", log=False)
    cfg.update(kw)
    return EcsoServer(engine, EcsoOptions(max_tokens=16), ServerConfig(**cfg)).start()
