"""ecso.eval: offline safety evaluation of ECSO (and the undefended model) on MM-SafetyBench, VLSafe and VLSBench.

    from ecso.eval import EvalConfig, JudgeSpec, run_eval, write_report
    summary = run_eval(EvalConfig("vlsbench", "data/vlsbench", "runs/vls", engine=EngineConfig(model=...)))
    print(write_report("runs/vls").markdown)

Modules: benchmarks (loaders -> Sample), judge_prompts (verbatim judge prompts), judges (rule / local GGUF /
OpenAI-compatible), store (crash-safe run folder), runner (resumable generate -> judge -> leakage), report (tables,
JSON, PNG), leakage (VSIL), data_engine (SFT records from ECSO's safe answers), speed (`ecso bench`).
"""

import importlib

# name -> module; loaded on first use, so `import ecso.eval.speed` (or any sibling) does not import all of these
_EXPORTS = {"BENCHMARKS": "benchmarks", "Sample": "benchmarks", "load_benchmark": "benchmarks",
            "Judgment": "judges", "JudgeInput": "judges", "RuleJudge": "judges", "LocalLLMJudge": "judges",
            "OpenAIJudge": "judges", "EvalConfig": "runner", "EvalSummary": "runner", "JudgeSpec": "runner",
            "run_eval": "runner", "build_report": "report", "write_report": "report", "export_sft": "data_engine"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ecso.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ecso.eval' has no attribute {name!r}")
