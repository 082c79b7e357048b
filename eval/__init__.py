"""ecso.eval: offline evaluation of ECSO (and the undefended model): safety on MM-SafetyBench, VLSafe and VLSBench,
visual safety information leakage (text-alone and pair harm rates, leak share), and utility on MME and benign sets.

    from ecso.eval import EvalConfig, JudgeSpec, run_eval, write_report
    summary = run_eval(EvalConfig("vlsbench", "data/vlsbench", "runs/vls", engine=EngineConfig(model=...)))
    print(write_report("runs/vls").markdown)

Modules: samples (Sample) and benchmarks (loaders -> Samples), mme (MME's loader and calculation.py scoring),
utility (ECSO on benign inputs), judge_prompts (verbatim judge prompts), verdicts (Judgment, parse rules), rule_judge,
prompt_judge, openai_judge and judges (local GGUF, guard), guard (Llama Guard 3's format), store (crash-safe run
folder), run_config + generation + runner (resumable generate -> judge -> leakage), presets and paper_settings (the
papers' published settings, deviations generated from them), paper_judge (is it the paper's judge?), report +
report_render (tables, JSON, PNG, the side-by-side summary), leakage (text-alone and pair harm, leak share),
data_engine (SFT records from ECSO's safe answers), speed (`ecso bench`).
"""

import importlib

# name -> module; loaded on first use, so `import ecso.eval.speed` (or any sibling) does not import all of these
_EXPORTS = {"BENCHMARKS": "benchmarks", "Sample": "benchmarks", "load_benchmark": "benchmarks",
            "Judgment": "judges", "JudgeInput": "judges", "RuleJudge": "judges", "LocalLLMJudge": "judges",
            "OpenAIJudge": "judges", "GuardJudge": "judges", "EvalConfig": "runner", "EvalSummary": "runner",
            "JudgeSpec": "runner", "run_eval": "runner", "build_report": "report", "write_report": "report",
            "write_summary": "report", "export_sft": "data_engine", "get_preset": "presets"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ecso.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ecso.eval' has no attribute {name!r}")
