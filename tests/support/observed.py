"""What llama.cpp actually evaluated in each ECSO step, through the engine's observer hook."""

from __future__ import annotations


def evaluated_per_step(engine, fn):
    """Runs fn(on_event) with the engine's observer on; returns (its result, {step: {"tokens": [...],
    "image_positions": n}}): the text token ids and image positions llama.cpp decoded while each step ran."""
    current = {"step": None}
    seen: dict[str, dict] = {}

    def on_event(ev):
        if ev.kind == "step_start":
            current["step"] = ev.step
            seen[ev.step] = {"tokens": [], "image_positions": 0}

    def observer(kind, what, pos):
        rec = seen.setdefault(current["step"], {"tokens": [], "image_positions": 0})
        if kind == "text":
            rec["tokens"].extend(what)
        else:
            rec["image_positions"] += what

    engine.observer = observer
    try:
        result = fn(on_event)
    finally:
        engine.observer = None
    return result, seen
