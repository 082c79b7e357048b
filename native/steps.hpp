// ECSO's four steps on the Engine primitives: the port of runtime/ecso.py (same order, prompts, judges, rules).
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine.hpp"

namespace ecso {

struct Options {
    std::string judge = "paper", decision_rule = "exact";
    double logit_threshold = 0.5;
    int32_t max_tokens = 512, judge_max_tokens = 16;
    bool judge_early_stop = true;
    int32_t caption_max_tokens = 512;
    float temperature = 0.0f, top_p = 1.0f;
    uint32_t seed = 0;
    bool reuse = true, defense = true;
    int32_t guard_every = 0;
    double guard_threshold = 0.5;
    std::vector<Message> history;  // earlier turns: before the query in step 1 and the appended judges

    void validate() const;  // InputError for a bad value, with what to use instead
};

struct StepTrace {
    std::string name;
    int32_t prompt_positions = 0, reused_positions = 0, evaluated_positions = 0, generated_tokens = 0, image_encodes = 0;
    double prefill_seconds = 0, generate_seconds = 0;
    std::string finish_reason, text, path = "llm";
};

struct Result {
    std::string answer, initial_answer, judge, judge_reply;
    bool unsafe = false, retracted = false, image_cache_hit = false;
    std::optional<double> judge_score;
    std::optional<std::string> caption;
    std::vector<StepTrace> steps;
    int32_t image_encodes = 0;
    double seconds = 0;
    std::string to_json(const Options &o, const std::string &engine_json) const;
};

// What the C API forwards as events: step_start / token / step_end / retract (text-only events of runtime/ecso.py).
using EmitFn = std::function<void(const char *kind, const std::string &step, const std::string &text)>;

Result run_ecso(Engine &engine, const Image *image, const std::string &query, const Options &options, const EmitFn &emit);

}  // namespace ecso
