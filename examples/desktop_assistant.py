"""Embedding ecso in a desktop assistant: one loaded model, requests in a worker thread, a callback that receives
step and token events (what a GUI shows), and a cancel button that stops a request cleanly.

    python examples/desktop_assistant.py                       # the demo model
    python examples/desktop_assistant.py --model llava-1.5-7b --image photo.jpg

The script plays a short session: a question answered live, the same question through all four steps
(--judge always-unsafe, to watch the unsafe path), a long answer cancelled midway by a "button" pressed from another
thread, and one more question to show the model is still usable after the cancel.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import ecso

HERE = Path(__file__).resolve().parent


@dataclass
class Outcome:
    """How a request ended: a Result, a cancel, or an error message (never an exception in the GUI thread)."""

    result: Optional["ecso.Result"] = None
    cancelled: bool = False
    error: Optional[str] = None
    tokens: int = 0  # answer tokens delivered to the callback


class Assistant:
    """What the app holds: a loaded model, at most one request at a time, and a cancel button.

    `on_event(StepEvent)` is called from the worker thread (a GUI would post it to its event loop)."""

    def __init__(self, model: "ecso.Ecso", on_event: Callable[["ecso.StepEvent"], None]):
        self.model = model
        self.on_event = on_event
        self._cancel = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._outcome = Outcome()

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def ask(self, image: Optional[str], question: str, **options) -> None:
        """Starts a request in the background; `options` are EcsoOptions fields (judge=..., max_tokens=...)."""
        if self.busy:
            raise RuntimeError("a request is running: wait for it or cancel it first")
        self._cancel.clear()
        self._outcome = Outcome()
        self._worker = threading.Thread(target=self._work, args=(image, question, options), daemon=True)
        self._worker.start()

    def cancel(self) -> None:
        """The cancel button: safe to call from any thread; the request stops at its next event."""
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> Outcome:
        if self._worker is not None:
            self._worker.join(timeout)
        return self._outcome

    def _work(self, image: Optional[str], question: str, options: dict) -> None:
        events = self.model.stream(image, question, **options)
        try:
            for ev in events:
                if self._cancel.is_set():
                    self._outcome.cancelled = True
                    return
                if ev.kind == "token":
                    self._outcome.tokens += 1
                elif ev.kind == "result":
                    self._outcome.result = ev.result
                self.on_event(ev)
        except ecso.EcsoError as e:  # bad image, prompt over the context, ...: one line for the user
            self._outcome.error = str(e)
        finally:
            events.close()  # leaving the stream stops the request and frees the model for the next one


class ConsoleView:
    """Stands in for the GUI: prints what a chat window would show, and 'presses' cancel when told to."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self.tokens = 0
        self.token_reached = threading.Event()
        self.press_cancel_at: Optional[int] = None

    def on_event(self, ev: "ecso.StepEvent") -> None:
        if ev.kind == "step_start":
            self.write(f"\n  [{ev.step}] ")
        elif ev.kind == "token":
            self.tokens += 1
            self.write(ev.text)
            if self.press_cancel_at is not None and self.tokens >= self.press_cancel_at:
                self.token_reached.set()
        elif ev.kind == "step_end" and ev.step != "answer" and ev.step != "regenerate":
            self.write(ev.text if ev.step == "judge" else ev.text[:120])
        elif ev.kind == "retract":
            self.write("  (retracted)")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def summary(outcome: Outcome) -> str:
    if outcome.error:
        return f"error: {outcome.error}"
    if outcome.cancelled:
        return f"cancelled after {outcome.tokens} tokens"
    r = outcome.result
    verdict = "UNSAFE, answered again without the image" if r.unsafe else "safe"
    return f"{verdict}; steps {' -> '.join(s.name for s in r.steps)}; {r.seconds:.1f} s"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="registry name, GGUF file or export folder (default: demo)")
    ap.add_argument("--mmproj", default=None)
    ap.add_argument("--image", default=str(HERE / "street.png"))
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--cancel-after", type=int, default=8, help="tokens after which the cancel button is pressed")
    args = ap.parse_args(argv)

    view = ConsoleView()
    with ecso.load(args.model, args.mmproj, max_tokens=args.max_tokens, caption_max_tokens=args.max_tokens,
                   n_ctx=2048) as model:
        assistant = Assistant(model, view.on_event)
        question = "What is happening in this picture?"

        print(f"1) {question}")
        assistant.ask(args.image, question)
        print(f"\n   => {summary(assistant.wait())}")

        print("2) the same, with the always-unsafe judge: all four steps")
        assistant.ask(args.image, question, judge="always-unsafe")
        print(f"\n   => {summary(assistant.wait())}")

        print("3) a long answer; the cancel button is pressed from another thread")
        view.tokens, view.press_cancel_at = 0, args.cancel_after
        view.token_reached.clear()
        button = threading.Thread(target=lambda: (view.token_reached.wait(60), assistant.cancel()))
        button.start()
        assistant.ask(args.image, "Write a long story about this picture.", max_tokens=400)
        cancelled = assistant.wait()
        button.join()
        view.press_cancel_at = None
        print(f"\n   => {summary(cancelled)}")

        print("4) after the cancel, the model is still usable")
        assistant.ask(args.image, question)
        after = assistant.wait()
        print(f"\n   => {summary(after)}")
        ok = cancelled.cancelled and after.result is not None
        print("still usable after cancel" if ok else "PROBLEM: the model did not recover from the cancel")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
