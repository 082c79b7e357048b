"""An app talking to `ecso serve` with the official OpenAI client: only the HTTP API, nothing from ecso imported.

    ecso serve --port 8080 &                      # the demo model; --model NAME|FILE.gguf for yours
    python examples/openai_client.py --base-url http://127.0.0.1:8080/v1

Shows a plain answer with ECSO's verdict (the extra `ecso` object of each reply), the unsafe path asked for per
request (`extra_body={"ecso": {"judge": "always-unsafe"}}`), and a streamed answer.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
from pathlib import Path
from typing import Optional

from openai import OpenAI

HERE = Path(__file__).resolve().parent


def image_part(path: str) -> dict:
    """An image as the `data:` URI the server accepts by default (it never reads files or URLs unless allowed)."""
    mime = mimetypes.guess_type(path)[0] or "image/png"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def ask(client: OpenAI, model: str, image: str, question: str, max_tokens: int, ecso: Optional[dict] = None):
    extra = {"ecso": ecso} if ecso else None
    return client.chat.completions.create(
        model=model, max_tokens=max_tokens, extra_body=extra,
        messages=[{"role": "user", "content": [image_part(image), {"type": "text", "text": question}]}])


def verdict(reply) -> str:
    """The server's extra `ecso` object, which OpenAI's client keeps as an extra field."""
    info = (reply.model_extra or {}).get("ecso") or {}
    steps = " -> ".join(s["name"] for s in info.get("timings", {}).get("steps", []))
    state = "UNSAFE, answered again without the image" if info.get("unsafe") else "safe"
    return f"{state}; judge {info.get('judge')} replied {info.get('judge_reply')!r}; steps {steps}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=os.environ.get("ECSO_API_KEY", "unused"),
                    help="the server's --api-key, if it has one (default: $ECSO_API_KEY)")
    ap.add_argument("--image", default=str(HERE / "street.png"))
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    question = "What is happening in this picture?"

    r = ask(client, model, args.image, question, args.max_tokens)
    print(f"[{model}] {r.choices[0].message.content}")
    print(f"  => {verdict(r)}")

    r = ask(client, model, args.image, question, args.max_tokens, ecso={"judge": "always-unsafe"})
    print(f"[{model}, always-unsafe judge] {r.choices[0].message.content}")
    print(f"  => {verdict(r)}")

    print(f"[{model}, streamed] ", end="")
    stream = client.chat.completions.create(
        model=model, max_tokens=args.max_tokens, stream=True,
        messages=[{"role": "user", "content": [image_part(args.image), {"type": "text", "text": question}]}])
    chunks = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            print(chunk.choices[0].delta.content, end="", flush=True)
    print(f"\n  => {chunks} content chunk(s) (the default --stream-mode held sends the answer once the judge cleared it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
