// The four ECSO steps, top to bottom (runtime/ecso.py, ported line for line where the numbers depend on it).
#include "steps.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>

#include "clock.hpp"
#include "ecso_prompts_data.h"
#include "errors.hpp"
#include "json.hpp"

namespace ecso {
namespace {

// the judges (names from ecso_prompts.json "judges"): paper, logit, append, append-logit and always-unsafe (the
// paper's judge runs and its reply is recorded, but the verdict is always unsafe: steps 3-4 run, for demos)

bool ends_with(const std::string &s, const std::string &suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// P(yes) / (P(yes) + P(no)) from next-token logits (float64, as the Python engine computes it).
double p_yes(const std::vector<float> &logits, const std::vector<int32_t> &yes, const std::vector<int32_t> &no) {
    double mx = -INFINITY;
    for (float z : logits) mx = std::max(mx, (double)z);
    double py = 0, pn = 0;
    for (int32_t t : yes) py += std::exp((double)logits[t] - mx);
    for (int32_t t : no) pn += std::exp((double)logits[t] - mx);
    return py + pn > 0 ? py / (py + pn) : 0.0;
}

class Request {
public:
    Request(Engine &e, const Image *image, std::string query, const Options &o, const EmitFn &emit)
        : e_(e), image_(image), query_(std::move(query)), o_(o), emit_(emit) {
        for (const auto &m : o.history) history_.push_back({m.role, e.clean_user_text(m.content)});
        if (o.guard_every > 0 && o.defense && !e.kv_rollback())
            throw input_error("guarded streaming branches a judge off the running answer and cuts it back, which this "
                              "model's recurrent state cannot do (recurrent / hybrid LLMs such as LFM2); run without "
                              "guard_every (--guard-every)");
    }

    Result run();

private:
    Sampling sampling(int32_t max_tokens, uint32_t step) const {
        return Sampling{o_.temperature, o_.top_p, o_.seed + step, max_tokens};
    }
    void start(const std::string &name) {
        steps_.emplace_back();
        steps_.back().name = name;
        emit_("step_start", name, "");
    }
    void end(size_t idx, const std::string &text) {
        steps_[idx].text = text;
        emit_("step_end", steps_[idx].name, text);
    }
    void prefill(size_t idx, const Prompt &p, int32_t max_tokens) {
        e_.check_budget(p, max_tokens, "step '" + steps_[idx].name + "'");
        PrefillStats st = e_.prefill(p, o_.reuse);
        StepTrace &t = steps_[idx];
        t.prompt_positions += st.n_prompt, t.reused_positions += st.n_reused, t.evaluated_positions += st.n_evaluated;
        t.image_encodes += st.image_encodes, t.prefill_seconds += st.seconds;
    }
    Generation generate(size_t idx, const Sampling &s, bool stream, int32_t first_token = -1,
                        const std::function<bool(const std::vector<int32_t> &)> &should_stop = {},
                        Sampler *sampler = nullptr) {
        std::function<void(const std::string &)> on_text;
        std::string name = steps_[idx].name;
        if (stream) on_text = [&](const std::string &d) { emit_("token", name, d); };
        Generation g = e_.generate(s, on_text, should_stop, first_token, sampler);
        StepTrace &t = steps_[idx];
        t.generated_tokens += (int32_t)g.tokens.size(), t.generate_seconds += g.seconds, t.finish_reason = g.finish_reason;
        return g;
    }
    std::vector<Message> user(const std::string &text) const { return {Message{"user", text}}; }
    // the conversation so far (history, then the query) and `more`
    std::vector<Message> conversation(std::vector<Message> more = {}) const {
        std::vector<Message> msgs = history_;
        msgs.push_back({"user", query_});
        msgs.insert(msgs.end(), more.begin(), more.end());
        return msgs;
    }
    std::pair<std::vector<int32_t>, std::vector<int32_t>> yes_no() {
        auto yes = e_.single_token_ids(logit_words(true)), no = e_.single_token_ids(logit_words(false));
        if (yes.empty() || no.empty())
            throw input_error("this vocabulary has no single-token yes/no; use judge paper or append");
        return {yes, no};
    }
    // Tokens that close the assistant turn right after the generated tokens and ask `question` in a new user turn.
    std::vector<int32_t> continuation(const std::string &question) {
        auto msgs = conversation({{"assistant", ""}, {"user", question}});
        return e_.tokenize(e_.chat_format().after_assistant(msgs, image_ != nullptr), false);
    }
    // Step 2 (append judges): the conversation with step 1's answer and `question`, tokenized whole as the reference
    // does, batched as the cache holds step 1 (its prompt, then one decode per generated token).
    Prompt appended(const Prompt &p1, const std::vector<int32_t> &answer_tokens, const std::string &answer,
                    const std::string &question) {
        auto msgs = conversation({{"assistant", e_.clean_user_text(answer)}, {"user", question}});
        Prompt p = e_.build_prompt(msgs, image_);
        std::vector<Piece> base = p1.pieces;
        for (int32_t t : answer_tokens) base.push_back(Piece::text({t}));
        p.pieces = aligned_to(p.pieces, base);
        return p;
    }
    std::tuple<bool, std::string, std::optional<double>> judge(const Prompt &p1, const Generation &first,
                                                               const std::string &answer1);
    std::tuple<Generation, bool, std::optional<double>> guarded_answer(size_t idx);
    Result result(const std::string &answer, bool unsafe, const std::string &initial, const std::string &reply,
                  std::optional<double> score, std::optional<std::string> caption, bool retracted);

    Engine &e_;
    const Image *image_;
    std::string query_;
    std::vector<Message> history_;  // neutralised, as the query
    const Options &o_;
    const EmitFn &emit_;
    std::vector<StepTrace> steps_;
    double t_start_ = now();
    bool cache_hit_ = false;
};

Result Request::run() {
    cache_hit_ = image_ && e_.image_cached(*image_);
    // step 1: the answer, with the image
    size_t s1 = steps_.size();
    start("answer");
    Prompt p1 = e_.build_prompt(conversation(), image_);
    prefill(s1, p1, o_.max_tokens);
    Generation first;
    bool retracted = false;
    std::optional<double> guard_score;
    if (o_.guard_every > 0 && o_.defense) std::tie(first, retracted, guard_score) = guarded_answer(s1);
    else first = generate(s1, sampling(o_.max_tokens, 0), true);
    std::string answer1 = strip(first.text);
    end(s1, answer1);
    if (!o_.defense) return result(answer1, false, answer1, "", std::nullopt, std::nullopt, false);

    bool unsafe;
    std::string reply;
    std::optional<double> score;
    if (retracted) {
        emit_("retract", "answer", answer1);
        unsafe = true, reply = "yes", score = guard_score;
    } else {
        std::tie(unsafe, reply, score) = judge(p1, first, answer1);
    }
    if (!unsafe) return result(answer1, false, answer1, reply, score, std::nullopt, false);

    // step 3: query-aware caption, with the image
    std::string caption;
    if (image_) {
        size_t s3 = steps_.size();
        start("caption");
        Prompt p3 = e_.build_prompt(user(cap_prompt(query_)), image_);
        prefill(s3, p3, o_.caption_max_tokens);
        caption = strip(generate(s3, sampling(o_.caption_max_tokens, 2), false).text);
        end(s3, caption);
    }
    // step 4: eyes closed - the answer again from query + caption, no image
    size_t s4 = steps_.size();
    start("regenerate");
    Prompt p4 = e_.build_prompt(user(gen_prompt(e_.clean_user_text(caption), query_)), nullptr);
    prefill(s4, p4, o_.max_tokens);
    std::string final_answer = strip(generate(s4, sampling(o_.max_tokens, 3), true).text);
    end(s4, final_answer);
    return result(final_answer, true, answer1, reply, score, caption, retracted);
}

std::tuple<bool, std::string, std::optional<double>> Request::judge(const Prompt &p1, const Generation &first,
                                                                    const std::string &answer1) {
    size_t idx = steps_.size();
    start("judge");
    bool logit = ends_with(o_.judge, "logit");
    Prompt prompt;
    if (o_.judge == "paper" || o_.judge == "logit" || o_.judge == "always-unsafe") {  // model text neutralised too
        prompt = e_.build_prompt(user(tell_prompt(query_, e_.clean_user_text(tell_response(answer1)))), image_);
    } else {  // append: the question goes after the answer already in the cache
        prompt = appended(p1, first.tokens, answer1, append_judge_prompt());
    }
    prefill(idx, prompt, logit ? 1 : o_.judge_max_tokens);
    bool unsafe;
    std::string reply;
    std::optional<double> score;
    if (logit) {
        auto [yes, no] = yes_no();
        score = p_yes(e_.logits(), yes, no);
        unsafe = *score >= o_.logit_threshold;
        reply = unsafe ? "yes" : "no";
    } else {
        std::function<bool(const std::vector<int32_t> &)> decided;
        if (o_.decision_rule == "exact" && o_.judge_early_stop)
            decided = [&](const std::vector<int32_t> &toks) {
                return !reply_can_still_be_unsafe(e_.detokenize(toks), o_.decision_rule);
            };
        Generation g = generate(idx, sampling(o_.judge_max_tokens, 1), false, -1, decided);
        if (g.finish_reason == "aborted") steps_[idx].finish_reason = "decided";
        reply = strip(g.text);
        unsafe = o_.judge == "always-unsafe" || is_unsafe_reply(reply, o_.decision_rule);
    }
    end(idx, reply);
    return {unsafe, reply, score};
}

std::tuple<Generation, bool, std::optional<double>> Request::guarded_answer(size_t idx) {
    auto [yes, no] = yes_no();
    auto cont = continuation(append_judge_prompt());
    Sampler sampler(sampling(o_.max_tokens, 0));  // one for the whole answer: the guard's pauses do not restart it
    std::vector<int32_t> tokens;
    int32_t first_token = -1;
    std::optional<double> score;
    StepTrace guard;
    guard.name = "guard";
    double seconds = 0;
    std::string finish = "length";
    while ((int32_t)tokens.size() < o_.max_tokens) {
        int32_t n = std::min(o_.guard_every, o_.max_tokens - (int32_t)tokens.size());
        Generation g = generate(idx, sampling(n, 0), true, first_token, {}, &sampler);
        tokens.insert(tokens.end(), g.tokens.begin(), g.tokens.end());
        seconds += g.seconds;
        finish = g.finish_reason;
        if (g.finish_reason != "length" || (int32_t)tokens.size() >= o_.max_tokens) break;
        double t0 = now();
        first_token = e_.sample_next(sampler);
        int32_t mark = e_.kv.n_pos();
        if (mark + (int32_t)cont.size() + 1 > e_.n_ctx()) {
            guard.prefill_seconds += now() - t0;
            continue;  // no room to branch a judge: keep generating unguarded
        }
        e_.append_tokens(cont);
        score = p_yes(e_.logits(), yes, no);
        e_.rollback(mark);
        guard.prefill_seconds += now() - t0;
        guard.evaluated_positions += (int32_t)cont.size();
        guard.generated_tokens += 1;
        if (*score >= o_.guard_threshold) {
            char buf[96];
            std::snprintf(buf, sizeof buf, "unsafe at token %zu (P(yes)=%.3f)", tokens.size(), *score);
            guard.text = buf;
            steps_.push_back(guard);
            return {Generation{tokens, e_.detokenize(tokens), "aborted", seconds}, true, score};
        }
    }
    guard.text = "never fired";
    steps_.push_back(guard);
    return {Generation{tokens, e_.detokenize(tokens), finish, seconds}, false, score};
}

Result Request::result(const std::string &answer, bool unsafe, const std::string &initial, const std::string &reply,
                       std::optional<double> score, std::optional<std::string> caption, bool retracted) {
    Result r;
    r.answer = answer, r.unsafe = unsafe, r.initial_answer = initial, r.judge_reply = reply, r.judge_score = score;
    r.caption = caption, r.retracted = retracted, r.steps = steps_, r.image_cache_hit = cache_hit_;
    r.judge = !o_.defense ? "none" : retracted ? "guard" : o_.judge;
    for (const auto &s : steps_) r.image_encodes += s.image_encodes;
    r.seconds = now() - t_start_;
    return r;
}

}  // namespace

void Options::validate() const {
    bool known = false;
    std::string names;
    for (const char *j : data::judges) known = known || judge == j, names += (names.empty() ? "" : ", ") + std::string(j);
    if (!known) throw input_error("unknown judge '" + judge + "'; use one of " + names);
    for (const auto &m : history)
        if (m.role != "system" && m.role != "user" && m.role != "assistant")
            throw input_error("a history turn has role '" + m.role + "'; use system, user or assistant");
    if (!has_decision_rule(decision_rule))
        throw input_error("unknown decision rule '" + decision_rule + "'; use one of " + decision_rule_names());
    if (std::min({max_tokens, judge_max_tokens, caption_max_tokens}) < 1)
        throw input_error("max token counts must be at least 1");
    if (!(temperature >= 0) || !std::isfinite(temperature) || !(top_p > 0 && top_p <= 1))
        throw input_error("temperature must be finite and >= 0 and top_p in (0, 1]");
    if (std::isnan(logit_threshold) || std::isnan(guard_threshold))
        throw input_error("logit_threshold and guard_threshold must be numbers (not NaN)");
    if (guard_every < 0) throw input_error("guard_every must be >= 0");
}

Result run_ecso(Engine &engine, const Image *image, const std::string &query, const Options &options,
                const EmitFn &emit) {
    options.validate();
    if (strip(query).empty()) throw input_error("the query is empty; give a question about the image");
    size_t n = utf8_length(query);
    if ((int64_t)n > engine.config.max_query_chars)
        throw input_error("the query has " + std::to_string(n) + " characters, over the limit of " +
                          std::to_string(engine.config.max_query_chars));
    return Request(engine, image, engine.clean_user_text(utf8_sanitize(query)), options, emit).run();
}

std::string Result::to_json(const Options &o, const std::string &engine_json) const {
    Json j;
    j.begin_object().kv("answer", answer).kv("unsafe", unsafe).kv("initial_answer", initial_answer).kv("judge", judge)
        .kv("judge_reply", judge_reply).key("judge_score");
    if (judge_score) j.value(*judge_score); else j.null();
    j.key("caption");
    if (caption) j.value(*caption); else j.null();
    j.kv("retracted", retracted).key("steps").begin_array();
    for (const auto &s : steps) {
        j.begin_object().kv("name", s.name).kv("prompt_positions", s.prompt_positions)
            .kv("reused_positions", s.reused_positions).kv("evaluated_positions", s.evaluated_positions)
            .kv("generated_tokens", s.generated_tokens).kv("image_encodes", s.image_encodes)
            .kv("prefill_seconds", s.prefill_seconds).kv("generate_seconds", s.generate_seconds)
            .kv("finish_reason", s.finish_reason).kv("text", s.text).kv("path", s.path)
            .kv("seconds", s.prefill_seconds + s.generate_seconds).end_object();
    }
    j.end_array().kv("image_encodes", image_encodes).kv("image_cache_hit", image_cache_hit).kv("seconds", seconds)
        .kv("prompt_version", prompt_version()).kv("decision_rule", o.decision_rule).key("options").begin_object()
        .kv("judge", o.judge).kv("decision_rule", o.decision_rule).kv("logit_threshold", o.logit_threshold)
        .kv("max_tokens", o.max_tokens).kv("judge_max_tokens", o.judge_max_tokens)
        .kv("judge_early_stop", o.judge_early_stop).kv("caption_max_tokens", o.caption_max_tokens)
        .kv("temperature", (double)o.temperature).kv("top_p", (double)o.top_p).kv("seed", o.seed)
        .kv("reuse", o.reuse).kv("defense", o.defense).kv("guard_every", o.guard_every)
        .kv("guard_threshold", o.guard_threshold).end_object().end_object();
    std::string out = j.str();
    out.pop_back();  // '}' : splice the engine facts in as an object
    return out + ",\"engine\":" + engine_json + "}";
}

}  // namespace ecso
