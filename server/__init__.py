"""ecso.server: a local OpenAI-compatible API with ECSO on every answer, and a page to watch it work.

Needs the `server` extra (Starlette, sse-starlette, uvicorn, pydantic): `pip install 'ecso[server]'`. It consumes
the runtime as the CLI does; the runtime never imports it.

    from ecso.server import EcsoServer, ServerConfig
    with Engine(EngineConfig(model=...)) as engine, EcsoServer(engine, config=ServerConfig(port=0)).start() as s:
        print(s.url)
"""

from ecso.server.app import LIVE_UNSAFE_NOTICE, ServerConfig, create_app
from ecso.server.http import EcsoServer
from ecso.server.media import MediaPolicy

__all__ = ["EcsoServer", "ServerConfig", "MediaPolicy", "create_app", "LIVE_UNSAFE_NOTICE"]
