"""Options and config shared by `ecso eval` and `ecso data-engine` (one home, so neither command imports the other)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import click

from ecso.runtime.prompts import JUDGE_NAMES as SELF_JUDGES

from ecso.cli.common import backend_options, engine_config, remote_config

BENCH_HELP = ("mm-safetybench (alias mmsb), vlsafe, vlsbench, custom (a JSONL of {id, image, query, category}); "
              "utility: mme (the MME release folder), benign (a custom JSONL of benign inputs).")
JUDGE_HELP = ("Who reads the answers: rule (offline refusal/compliance patterns, default), llm (a local GGUF with the "
              "benchmark's own judge prompt; --judge-model, default the demo model; sees images with a projector), "
              "guard (a Llama Guard 3 GGUF in --judge-model, its own prompt and categories), guard:URL (a guard "
              "behind an OpenAI-compatible server), openai:URL (any OpenAI-compatible endpoint, e.g. "
              "openai:https://api.openai.com/v1 --judge-model gpt-4o), none.")
# options a preset sets: CLI parameter -> (Preset field, flag)
PRESET_OPTIONS = {"max_tokens": ("max_tokens", "--max-tokens"), "temperature": ("temperature", "--temperature"),
                  "categories": ("categories", "--scenario/--category"), "modes": ("modes", "--mode"),
                  "judge_prompts": ("judge.prompts", "--judge-prompts")}


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.strip() for item in values for v in item.split(",") if v.strip())


def selection_options(f: Callable) -> Callable:
    """Benchmark data and selection, shared by eval and data-engine."""
    opts = [
        click.option("--data", required=False, type=click.Path(exists=True),
                     help="The downloaded benchmark folder (or file), in its official layout."),
        click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
                     help="VLSafe: the COCO train2017 image folder (default: searched next to the jsonl)."),
        click.option("--limit", type=int, default=None, help="Only the first N samples of the selection."),
        click.option("--category", "--scenario", "categories", multiple=True,
                     help="Repeatable or comma-separated. MM-SafetyBench scenarios by name, number ('01') or "
                          "'ecso' (the paper's 01-07 + 09); VLSBench categories or sub-categories; MME subtasks."),
        click.option("--mode", "modes", multiple=True, type=click.Choice(["SD", "SD_TYPO", "TYPO", "text"]),
                     help="MM-SafetyBench image modes (repeatable; default SD, SD_TYPO, TYPO). text: the original "
                          "question without an image."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def generation_options(f: Callable) -> Callable:
    """How the model answers (as in `ecso-run`) and who judges, shared by eval and data-engine."""
    opts = [
        click.option("--max-tokens", type=int, default=512, show_default=True,
                     help="Max tokens of each answer and caption (the paper allows 1024-2048)."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy (the paper)."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Requests decoded together (one llama_decode carries a token of each); 1 = one at a "
                          "time, bit-exact as ecso-run. With --backend: requests in flight on the server. Records "
                          "are still written one by one, resumably."),
        click.option("--self-judge", type=click.Choice(SELF_JUDGES),
                     default="paper", show_default=True, help="ECSO's step-2 self-judge (see `ecso-run --help`)."),
        click.option("--rule", "decision_rule", type=click.Choice(["exact", "contains"]), default="exact",
                     show_default=True, help="How the self-judge's reply is read (exact = the paper)."),
        click.option("--threshold", type=float, default=0.5, show_default=True,
                     help="P(yes) threshold of the logit self-judges."),
        click.option("--judge", default=None, help=JUDGE_HELP),
        click.option("--judge-model", default=None,
                     help="llm / guard: GGUF path or registered name (llm default: demo); openai / guard:URL: the "
                          "model name."),
        click.option("--judge-mmproj", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="llm: a vision projector for the judge, so it sees the images (VLSBench, leakage pairs). A "
                          "registered --judge-model brings its own."),
        click.option("--judge-max-tokens", type=int, default=None,
                     help="Max tokens of a judge reply (default per benchmark: local 16/384/256, API unset/128)."),
        click.option("--judge-ctx", type=int, default=4096, show_default=True, help="Context of a local judge."),
        click.option("--judge-prompts", type=click.Choice(["official", "ecso"]), default="official",
                     show_default=True, help="MM-SafetyBench: evaluation.py's templates, or ECSO's copy of the "
                                             "safety template (its paper's numbers)."),
        click.option("--judge-text-only", is_flag=True,
                     help="Never show the judge an image (VLSBench: data.json's image description instead)."),
        click.option("--preset", type=click.Choice(["ecso-paper", "vlsbench"]), default=None,
                     help="The published settings of a paper's table: scenarios, token limits, temperature, the system "
                          "prompt of every ECSO step, judge prompts and judge model name (for openai:URL). Recorded "
                          "in run.json with every deviation from the paper."),
        click.option("--regenerate-with-image/--regenerate-without-image", "regenerate_with_image", default=None,
                     help="ECSO's step 4 with the image (as ECSO's released MME script; the default of --preset "
                          "ecso-paper on mme) or without it (eyes closed, as the method describes; the default "
                          "otherwise). The report lists it when it differs from the paper's."),
        click.option("--force", is_flag=True,
                     help="Continue a run folder made with another model/prompt version/decoding settings."),
        click.option("--retry-errors", is_flag=True, help="Generate again the samples that failed last time."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for o in reversed(opts):
        f = o(f)
    return backend_options(f)


def build_config(bench: str, data: Optional[str], out: str, defenses: tuple[str, ...], leakage: bool,
                 kw: dict):
    """EvalConfig from the CLI options (shared by eval and data-engine)."""
    from ecso.eval.runner import EvalConfig, JudgeSpec
    from ecso.runtime import EcsoOptions

    if not data:
        raise click.UsageError("--data DIR is required: the downloaded benchmark folder")
    preset = _apply_preset(kw.pop("preset"), bench, kw)
    judge = kw.pop("judge") or ("llm" if kw["judge_model"] else "rule")
    judge_model = kw.pop("judge_model") or (preset.judge.model if preset and judge.startswith("openai:") else None)
    spec = JudgeSpec.parse(judge, judge_model, max_tokens=kw.pop("judge_max_tokens"),
                           n_ctx=kw.pop("judge_ctx"), prompt_set=kw.pop("judge_prompts"),
                           send_images=not kw.pop("judge_text_only"), mmproj=kw.pop("judge_mmproj"))
    max_tokens = kw.pop("max_tokens")
    options = EcsoOptions(judge=kw.pop("self_judge"), decision_rule=kw.pop("decision_rule"),
                          logit_threshold=kw.pop("threshold"), max_tokens=max_tokens,
                          caption_max_tokens=preset.caption_max_tokens if preset else max_tokens,
                          judge_max_tokens=preset.judge_max_tokens if preset else 16,
                          temperature=kw.pop("temperature"), top_p=kw.pop("top_p"), seed=kw.pop("seed"),
                          system_prompt=preset.system_prompt if preset else None)
    with_image = kw.pop("regenerate_with_image")
    with_image = (preset.regenerate_with_image if preset else False) if with_image is None else with_image
    backend = _backend_config(kw)
    if backend is not None and with_image:
        raise click.UsageError("step 4 with the image (--regenerate-with-image, the default of --preset ecso-paper "
                               "on mme) needs the in-process engine; add --regenerate-without-image to use --backend")
    engine = dataclasses.replace(engine_config(**kw), parallel=1 if backend else kw["parallel"])
    kw.pop("parallel")
    return EvalConfig(backend=backend, benchmark=bench, data=data, out=out, engine=engine, options=options,
                      defenses=defenses, categories=_split(kw.pop("categories")), modes=tuple(kw.pop("modes")),
                      limit=kw.pop("limit"), images=kw.pop("images"), judge=spec, leakage=leakage,
                      query_suffix=preset.query_suffix if preset else "", regenerate_with_image=with_image,
                      preset=preset.record() if preset else None,
                      force=kw.pop("force"), retry_errors=kw.pop("retry_errors"), progress=not kw.pop("no_progress"))


def _backend_config(kw: dict):
    """--backend URL --backend-model NAME: generation runs on that server, --parallel requests in flight."""
    return remote_config(kw.pop("backend"), kw.pop("backend_model"), kw.pop("backend_timeout"),
                         kw.pop("backend_retries"), parallel=kw["parallel"])


def _apply_preset(name: Optional[str], bench: str, kw: dict):
    """Puts the preset's settings into kw; an option the user also set by hand is a conflict (one-line error)."""
    if not name:
        return None
    from ecso.eval.presets import get_preset

    preset = get_preset(name, bench)
    ctx = click.get_current_context(silent=True)
    for option, (attr, flag) in PRESET_OPTIONS.items():
        value = preset
        for part in attr.split("."):
            value = getattr(value, part)
        if option in ("categories", "modes"):
            if not value:
                continue
            given_value = _split(kw[option]) if option == "categories" else tuple(kw[option])
        else:
            given_value = kw[option]
        by_hand = ctx is not None and ctx.get_parameter_source(option) == click.core.ParameterSource.COMMANDLINE
        if by_hand and given_value != value:
            raise click.UsageError(f"{flag} conflicts with --preset {name} (which sets {value!r}); drop one of them")
        kw[option] = value
    if preset.judge_reply_max_tokens and kw.get("judge_max_tokens") is None and \
            str(kw.get("judge") or "").startswith("openai:"):
        kw["judge_max_tokens"] = preset.judge_reply_max_tokens
    return preset


def echo_summary(s) -> None:
    click.echo(f"[eval] {s.benchmark}: {s.n_samples} samples ({s.n_input_errors} unusable: missing image or "
               f"malformed row), {s.generated} answers written, {s.reused} already there, "
               f"{s.generation_errors} generation errors, ECSO flagged {s.ecso_flagged}", err=True)
    if s.judge:
        views = " and ".join({"text": "text alone", "pair": "image + text"}[v] for v in s.leakage_views)
        leak = f"; leakage: {s.leakage_judged} verdicts ({views})" if s.leakage_judged else ""
        click.echo(f"[eval] judge {s.judge}: {s.judged} judged, {s.judge_errors} failed calls, {s.unparsed} "
                   f"unparsable replies{leak}", err=True)
    for n in s.notes:
        click.echo(f"[eval] note: {n}", err=True)
    click.echo(f"[eval] {s.seconds:.1f} s; run folder {s.run_dir}", err=True)
