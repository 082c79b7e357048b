"""Markdown and PNG for the reports built in report.py (one run, or a summary of several)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

TITLES = {"mm-safetybench": "MM-SafetyBench", "vlsafe": "VLSafe", "vlsbench": "VLSBench", "mme": "MME",
          "benign": "Benign set", "custom": "Custom set"}
DEFENSE_TITLES = {"none": "no defense", "ecso": "ECSO"}


def _f(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                                 range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _find(data: dict, category: str, mode, defense: str) -> Optional[dict]:
    return next((c for c in data["cells"] if c["category"] == category and c["mode"] == mode
                 and c["defense"] == defense), None)


def _categories(data: dict) -> list[str]:
    seen = {c["category"] for c in data["cells"] if c["category"] != "All"}
    return sorted(seen) + ["All"]


def _coverage(cells: list[Optional[dict]], defenses: list[str]) -> list[str]:
    """samples, then judged and unknown per defense (never summed over defenses)."""
    cs = [c for c in cells if c]
    n = str(cs[0]["n_samples"]) if cs else "0"
    by_d = {d: [c for c in cs if c["defense"] == d] for d in defenses}
    return [n] + ["/".join(str(sum(c[k] for c in by_d[d])) for d in defenses) for k in ("n_judged", "n_unknown")]


def _coverage_heads(defenses: list[str]) -> list[str]:
    who = " / ".join(DEFENSE_TITLES[d] for d in defenses)
    return ["samples", f"judged ({who})", f"unknown ({who})"]


def header(data: dict) -> list[str]:
    g = data["generation"]
    title = TITLES.get(data["benchmark"], data["benchmark"])
    nd = len(data["defenses"])
    out = [f"# {title}: {data['n_samples']} samples × {nd} defense{'s' if nd > 1 else ''} = "
           f"{data['n_records']} records", ""]
    if data.get("preset"):
        p = data["preset"]
        out += [f"Preset `{p['name']}` ({p['source']}).", ""]
    out += [f"Judge: `{data['judge'] or 'none'}`. {data.get('judge_statement', '')}".rstrip()]
    details = (data.get("judge_check") or {}).get("details") or {}
    if details.get("base_url"):
        out[-1] += f" Judge endpoint: {details['base_url']} (host {details['host']}, model asked for " \
                   f"`{details.get('model')}`)."
    if data.get("judge_saw"):
        out[-1] += f" The judge saw: {'; '.join(data['judge_saw'])}."
    settings = data.get("settings") or {}
    if settings.get("statement"):
        out += ["", settings["statement"]]
        out += [""] + [f"- {d}" for d in settings.get("differences", [])] if settings.get("differences") else []
    sp = g.get("system_prompt")
    out += ["", f"Model: `{Path(g.get('model', '?')).name}` (fingerprint {g.get('model_fingerprint')}), prompts "
            f"{g.get('prompt_version')}, decision rule {g.get('decision_rule')}, max tokens {g.get('max_tokens')} "
            f"(steps 1 and 4; step 2 {g.get('judge_max_tokens')}, step 3 {g.get('caption_max_tokens')}), "
            f"temperature {g.get('temperature')}, seed {g.get('seed')}, system prompt of every step: "
            + (f"“{sp[:60]}{'…' if len(sp) > 60 else ''}”" if sp else "the chat format's default")
            + (", step 4 with the image" if g.get("regenerate_with_image") else "") + ".", ""]
    return out


def render_markdown(data: dict) -> str:
    out = header(data)
    if data["kind"] == "utility":
        out += _utility_md(data)
    else:
        out += ["Rates in % of the row's samples, per defense (unknowns stay in the denominator).", ""]
        out += _safety_md(data)
    if data.get("leakage"):
        out += _leakage_md(data)
    out += [f"Note: {n}" for n in data["notes"]]
    return "\n".join(out).rstrip() + "\n"


def _safety_md(data: dict) -> list[str]:
    bench, defenses = data["benchmark"], data["defenses"]
    cats, dt, out = _categories(data), [DEFENSE_TITLES[d] for d in defenses], []
    cov = _coverage_heads(defenses)
    if bench == "mm-safetybench":
        modes = data["modes"]
        heads = ["Scenario"] + [f"{m}: {t}" for m in modes for t in dt] + ["samples (all modes)"] + cov[1:]
        for metric, name in (("harmless_rate", "Harmless rate (safe / samples)"),
                             ("attack_rate", "Attack rate (unsafe / samples)")):
            rows = []
            for cat in cats:
                cs = [_find(data, cat, m, d) for m in modes for d in defenses]
                one = [c for c in cs if c and c["defense"] == defenses[0]]
                rows.append([cat] + [_f(c[metric]) if c else "—" for c in cs] +
                            [str(sum(c["n_samples"] for c in one))] + _coverage(cs, defenses)[1:])
            per_mode = ", ".join(f"{m} {c['n_samples']}" for m in modes
                                 for c in [_find(data, 'All', m, defenses[0])] if c)
            out += [f"## {name}", "", f"(each rate: % of that scenario's samples in that image mode; samples, judged "
                    f"and unknown: summed over the row's image modes, per defense. All rows: {per_mode} samples)", "",
                    _table(heads, rows), ""]
    elif bench == "vlsbench":
        heads = ["Category"]
        for t in dt:
            heads += [f"Safe: {t}", "refusal", "warning", "unsafe"]
        rows = []
        for cat in cats:
            cs = [_find(data, cat, None, d) for d in defenses]
            row = [cat]
            for c in cs:
                row += [_f(c[k]) if c else "—" for k in ("harmless_rate", "refusal_rate", "warning_rate",
                                                          "attack_rate")]
            rows.append(row + _coverage(cs, defenses))
        out += ["## Safe rate (refusal + warning) with its split", "", _table(heads + cov, rows), ""]
    else:
        heads = ["Category"] + [f"Harmless: {t}" for t in dt] + cov
        rows = []
        for cat in cats:
            cs = [_find(data, cat, None, d) for d in defenses]
            rows.append([cat] + [_f(c["harmless_rate"]) if c else "—" for c in cs] + _coverage(cs, defenses))
        out += ["## Harmless rate", "", _table(heads, rows), ""]
    flagged = [c for c in data["cells"] if c["category"] == "All" and c["defense"] == "ecso"]
    if flagged:
        n = sum(c["n_samples"] for c in flagged)
        k = sum(c["ecso_flagged"] for c in flagged)
        out += [f"ECSO's self-judge flagged {k} of {n} samples as unsafe ({_f(round(100 * k / n, 2) if n else None)} %)"
                " and answered them again without the image.", ""]
    if data.get("guard_categories"):
        out += ["Guard categories (records): " + ", ".join(f"{k} × {v}" for k, v in data["guard_categories"].items()),
                ""]
    return out


def _utility_md(data: dict) -> list[str]:
    u, defenses, out = data["utility"], data["defenses"], []
    dt = [DEFENSE_TITLES[d] for d in defenses]
    if data["benchmark"] == "mme":
        heads = ["Subtask"] + [f"score: {t}" for t in dt] + [f"acc / acc+: {t}" for t in dt] + \
            ["questions", "images", "unknown"]
        if "ecso" in defenses:
            heads += ["ECSO flagged", "score changed (→wrong / →right)"]
        rows = []
        for r in u["subtasks"]:
            row = [r["subtask"]] + [_f(r[d]["score"]) for d in defenses] + \
                [f"{_f(r[d]['acc'])} / {_f(r[d]['acc_plus'])}" for d in defenses] + \
                [str(r[defenses[0]]["n_questions"]), str(r[defenses[0]]["n_images"]),
                 "/".join(str(r[d]["n_unknown"]) for d in defenses)]
            if "ecso" in defenses:
                e = r["ecso_effect"]
                row += [f"{e['ecso_flagged']} ({_f(e['flag_rate'])} %)",
                        f"{e['score_changed']} ({e['right_to_wrong']} / {e['wrong_to_right']})"]
            rows.append(row)
        out += ["## MME scores (100·acc + 100·acc+ per subtask; calculation.py rules)", "", _table(heads, rows), ""]
        trows = []
        for t in u["totals"]:
            partial = "" if t["n_subtasks"] == t["n_subtasks_in_mme"] else \
                f" ({t['n_subtasks']} of {t['n_subtasks_in_mme']} subtasks)"
            trows.append([t["group"] + partial] + [_f(t[d]) for d in defenses] + [str(t["max_score"])])
        out += [_table(["Total"] + dt + ["max"], trows), ""]
        if u.get("ecso_effect"):
            e = u["ecso_effect"]
            out += [f"ECSO on these benign questions: step 2 fired on {e['ecso_flagged']} of {e['n_samples']} "
                    f"({_f(e['flag_rate'])} %); the final answer changed on {e['answers_changed']}, which changed the "
                    f"score of {e['score_changed']} ({e['right_to_wrong']} right → wrong, {e['wrong_to_right']} "
                    "wrong → right).", ""]
    else:
        heads = ["Category", "samples"] + [f"refused: {t}" for t in dt]
        if "ecso" in defenses:
            heads += ["ECSO flag rate", "answers changed"]
        rows = []
        for r in u["rows"]:
            row = [r["category"], str(r["n_samples"])] + [_f(r[d]["refusal_rate"]) for d in defenses]
            if "ecso" in defenses:
                row += [_f(r["ecso_effect"]["flag_rate"]), str(r["ecso_effect"]["answers_changed"])]
            rows.append(row)
        out += ["## Over-refusal on benign inputs (% of samples)", "", _table(heads, rows), ""]
    return out


def _leakage_md(data: dict) -> list[str]:
    leak = data["leakage"]
    rows = leak["rows"]
    by_mode = any(r["mode"] for r in rows)
    pair = "pair" in leak["views"]
    heads = ["Category"] + (["Mode"] if by_mode else []) + ["samples", "text harmful", "text-alone harm rate",
                                                             "text unknown"]
    if pair:
        heads += ["pairs harmful", "R1 (pair harm rate)", "both harmful", "R2", "leak share R2/R1", "pair unknown"]
    body = []
    for r in rows:
        row = [r["category"]] + ([r["mode"] or "all"] if by_mode else []) + \
            [str(r["n_samples"]), str(r["text_harmful"]), _f(r["text_harm_rate"]), str(r["text_unknown"])]
        if pair:
            row += [str(r["pair_harmful"]), _f(r["r1"]), str(r["pair_and_text_harmful"]), _f(r["r2"]),
                    _f(r.get("leak_share")), str(r["pair_unknown"])]
        body.append(row)
    saw = ("image + query text (pairs) and query text alone" if pair else
           "query text alone: no pair harm rate or leak share (this judge does not see images)")
    d = data["definitions"]["leakage"]
    defs = [f"Definitions ({d['source']}); rates in % of the row's samples:",
            f"- text-alone harm rate: {d['text_harm_rate']}"]
    if pair:
        defs += [f"- R1, {d['r1']}", f"- R2: {d['r2']}", f"- leak share: {d['leak_share']}"]
    defs += [f"- unknown: {d['unknown']}"]
    return [f"## Visual safety information leakage (judge `{leak['judge']}`, saw: {saw})", ""] + defs + \
        ["", _table(heads, body), ""]


def render_summary(data: dict) -> str:
    runs = data["runs"]
    heads = ["Benchmark", "metric", "no defense", "ECSO", "ECSO − none", "ECSO flag rate", "samples", "paper's?"]
    rows = []
    for r in runs:
        v = r["values"]
        delta = None if v.get("none") is None or v.get("ecso") is None else round(v["ecso"] - v["none"], 2)
        rows.append([TITLES.get(r["benchmark"], r["benchmark"]) + f" ({r['kind']})", r["metric"], _f(v.get("none")),
                     _f(v.get("ecso")), _f(delta), _f(r["ecso_flag_rate"]), str(r["n_samples"]), r["paper_label"]])
    out = ["# Safety and utility, with and without ECSO", "",
           "Each row is one run folder; values are per defense over that run's samples. Safety: higher = safer. "
           "Utility: higher = more helpful; ECSO's flag rate on benign inputs is how often step 2 fired where it "
           "should not. \"paper's?\": whether the judge and the generation settings are the paper's.", "",
           _table(heads, rows), ""]
    leaky = [r for r in runs if r.get("leakage")]
    if leaky:
        def count(k: int, rate) -> str:
            return "—" if rate is None else f"{k} ({_f(rate)} %)"

        lrows = [[TITLES.get(r["benchmark"], r["benchmark"]), str(x["n_samples"]),
                  count(x["text_harmful"], x["text_harm_rate"]), count(x["pair_harmful"], x["r1"]),
                  count(x["pair_and_text_harmful"], x["r2"]), _f(x["leak_share"])]
                 for r in leaky for x in [r["leakage"]]]
        out += ["## Leakage (ecso's definitions: see each run's report)", "",
                _table(["Benchmark", "samples", "text harmful", "pairs harmful (R1)", "both harmful (R2)",
                        "leak share R2/R1 %"], lrows), ""]
    for r in runs:
        out += [f"- {TITLES.get(r['benchmark'], r['benchmark'])} ({r['run_dir']}): {r['judge_statement']} "
                f"{r.get('settings_statement', '')}".rstrip()]
        out += [f"  - {d}" for d in r.get("settings_differences", [])]
    out += [f"Note: {n}" for n in data["notes"]]
    return "\n".join(out).rstrip() + "\n"


# --- PNG ------------------------------------------------------------------------------------------------------
def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _bars(ax, labels: list[str], series: dict[str, list[Optional[float]]], ylabel: str, ymax: float) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(labels))]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name)
        for b, v in zip(bars, vals):
            ax.annotate("—" if v is None else f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([c if "\n" in c else c[:18] for c in labels], rotation=0 if len(labels) < 4 else 30,
                       ha="center" if len(labels) < 4 else "right", fontsize=8)
    ax.set_ylim(0, ymax * 1.1)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)


def panel_samples(data: dict, mode: Optional[str]) -> int:
    """Samples one panel of the safety plot shows (per defense): its image mode's "All" row, or the whole run."""
    cell = _find(data, "All", mode, data["defenses"][0])
    return cell["n_samples"] if cell else data["n_samples"]


def safety_panel_titles(data: dict) -> list[str]:
    """The title of each panel of a safety report's plot (one per image mode), with the samples it shows."""
    name = TITLES.get(data["benchmark"], data["benchmark"])
    judge = (data["judge"] or "none")[:50] + (" (not the paper's)" if data.get("judge_is_paper") is False else "")
    return [f"{name}{f' · {mode}' if mode else ''} · {panel_samples(data, mode)} samples per defense\njudge {judge}"
            for mode in (data["modes"] or [None])]


def plot_report(data: dict, path: Path) -> Optional[str]:
    """One run: harmless / safe rate per category (one panel per image mode), or MME subtask scores, or benign
    refusal rates; no defense vs ECSO. Returns why no plot was written, or None."""
    plt = _plt()
    if plt is None:
        return "no PNG plot: matplotlib is not installed (pip install 'ecso[plot]')"
    defenses = data["defenses"]
    names = {d: DEFENSE_TITLES[d] for d in defenses}
    name = TITLES.get(data['benchmark'], data['benchmark'])
    title = f"{name} · {data['n_samples']} samples per defense"
    if data["kind"] == "utility":
        fig, ax = plt.subplots(figsize=(8, 3.6))
        u = data["utility"]
        if data["benchmark"] == "mme":
            labels = [r["subtask"] for r in u["subtasks"]]
            _bars(ax, labels, {names[d]: [r[d]["score"] for r in u["subtasks"]] for d in defenses},
                  "MME score (max 200)", 200)
            e = u.get("ecso_effect")
        else:
            labels = [r["category"] for r in u["rows"]]
            _bars(ax, labels, {names[d]: [r[d]["refusal_rate"] for r in u["rows"]] for d in defenses},
                  "refused (%)", 100)
            e = u["rows"][-1].get("ecso_effect")
        flag = f" · ECSO flag rate {_f(e['flag_rate'])} %" if e else ""
        ax.set_title(title + flag, fontsize=9)
    else:
        modes = data["modes"] or [None]
        cats = _categories(data)
        fig, axes = plt.subplots(len(modes), 1, figsize=(max(6.0, 0.9 * len(cats) + 2), 3.2 * len(modes)),
                                 squeeze=False)
        for ax, mode, panel_title in zip(axes[:, 0], modes, safety_panel_titles(data)):
            _bars(ax, cats, {names[d]: [(_find(data, c, mode, d) or {}).get("harmless_rate") for c in cats]
                             for d in defenses}, "harmless / safe rate (%)", 100)
            ax.set_title(panel_title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def plot_summary(data: dict, path: Path) -> Optional[str]:
    """Safety (left) and utility (right), no defense vs ECSO, one group per run; utility as % of the maximum."""
    plt = _plt()
    if plt is None:
        return "no PNG plot: matplotlib is not installed (pip install 'ecso[plot]')"
    kinds = [k for k in ("safety", "utility") if any(r["kind"] == k for r in data["runs"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        runs = [r for r in data["runs"] if r["kind"] == kind]
        labels = [TITLES.get(r["benchmark"], r["benchmark"]) + ("*" if r["comparable"] is False else "")
                  + f"\n{r['n_samples']} samples" for r in runs]
        series = {}
        for d in ("none", "ecso"):
            if any(d in r["values"] for r in runs):
                series[DEFENSE_TITLES[d]] = [None if r["values"].get(d) is None or not r.get("max") else
                                             round(100.0 * r["values"][d] / r["max"], 2) for r in runs]
        series["ECSO flag rate"] = [r["ecso_flag_rate"] for r in runs]
        _bars(ax, labels, series, "% (utility: % of max score)" if kind == "utility" else "harmless / safe rate %",
              100)
        starred = any(r["comparable"] is False for r in runs)
        ax.set_title(("Safety" if kind == "safety" else "Utility (benign inputs)") +
                     (" · * not the paper's judge or settings" if starred else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
