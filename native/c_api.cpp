// The C ABI (include/ecso.h): argument checks, error codes and messages, the engine mutex, cancel, events.
// No exception crosses this boundary: every entry point catches and turns it into a status + ecso_last_error().
#include <atomic>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "ecso.h"
#include "ecso_prompts_data.h"
#include "engine.hpp"
#include "errors.hpp"
#include "steps.hpp"

#ifndef ECSO_VERSION_STRING
#define ECSO_VERSION_STRING "0.0.0"
#endif

struct ecso_engine {
    std::mutex mutex;                      // one request at a time
    std::atomic<bool> cancel{false};
    std::atomic<bool> closed{false};
    std::unique_ptr<ecso::Engine> engine;  // null once closed
    std::string engine_json;
};

struct ecso_result {
    ecso::Result result;
    std::string json;
};

namespace {

thread_local std::string g_last_error;

ecso_status fail(ecso_status code, const std::string &msg) {
    g_last_error = msg;
    return code;
}

template <class F> ecso_status guarded(F &&f) {
    try {
        g_last_error.clear();
        return f();
    } catch (const ecso::Error &e) {
        return fail(e.code, e.what());
    } catch (const std::bad_alloc &) {
        return fail(ECSO_ERR_ENGINE, "out of memory");
    } catch (const std::exception &e) {
        return fail(ECSO_ERR_ENGINE, std::string("internal error: ") + e.what());
    } catch (...) {
        return fail(ECSO_ERR_ENGINE, "internal error");
    }
}

// The app's struct (of the size it was compiled with) over the library's defaults: fields the app does not know
// keep their defaults; a struct larger than this library knows is refused, never read past its end.
template <class T> T read_struct(const T *in, T defaults, const char *what) {
    size_t n = in->struct_size;
    if (n < offsetof(T, struct_size) + sizeof(size_t) || n > sizeof(T))
        throw ecso::input_error(std::string(what) + ".struct_size is " + std::to_string(n) + " but this libecso (abi " +
                                std::to_string(ECSO_ABI_VERSION) + ") serves 8.." + std::to_string(sizeof(T)) +
                                " bytes: fill it with " + what + "_init(&x, sizeof x), or upgrade libecso");
    std::memcpy(static_cast<void *>(&defaults), in, n);
    return defaults;
}

template <class T> ecso_status init_struct(T *out, size_t size, const T &defaults, const char *what) {
    if (!out) return fail(ECSO_ERR_INPUT, std::string(what) + "_init: a null pointer");
    if (size < sizeof(size_t) || size > sizeof(T))
        return fail(ECSO_ERR_INPUT, std::string(what) + "_init: struct_size " + std::to_string(size) +
                                        " is not one this libecso (abi " + std::to_string(ECSO_ABI_VERSION) +
                                        ") serves (up to " + std::to_string(sizeof(T)) + "); upgrade libecso");
    T d = defaults;
    d.struct_size = size;
    std::memcpy(static_cast<void *>(out), &d, size);
    return ECSO_OK;
}

ecso_config config_defaults() {
    ecso_config c;
    std::memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    c.n_ctx = 4096, c.n_batch = 512, c.n_threads = 0, c.n_gpu_layers = -1, c.mmproj_gpu = 1, c.flash_attn = -1;
    c.kv_f32 = 0, c.chat_format = ECSO_CHAT_FORMAT_AUTO, c.cpu_repack = ECSO_CPU_REPACK_AUTO;
    c.image_cache_entries = 16, c.max_query_chars = 100000, c.verbose = 0;
    return c;
}

ecso_options options_defaults() {
    ecso_options o;
    std::memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.judge = ECSO_JUDGE_PAPER, o.decision_rule = ECSO_RULE_EXACT, o.logit_threshold = 0.5f, o.max_tokens = 512;
    o.judge_max_tokens = 16, o.judge_early_stop = 1, o.caption_max_tokens = 512, o.temperature = 0.0f;
    o.top_p = 1.0f, o.seed = 0, o.reuse = 1, o.defense = 1, o.guard_every = 0, o.guard_threshold = 0.5f;
    o.history = nullptr, o.n_history = 0;
    return o;
}

ecso_image image_defaults() {
    ecso_image i;
    std::memset(&i, 0, sizeof i);
    i.struct_size = sizeof i;
    i.kind = ECSO_IMAGE_PATH;
    return i;
}

// Byte offset of the first invalid UTF-8 sequence, or -1.
long invalid_utf8_at(const char *s) {
    const auto *p = reinterpret_cast<const unsigned char *>(s);
    for (size_t i = 0; p[i];) {
        unsigned char c = p[i];
        int len = c < 0x80 ? 1 : (c >= 0xC2 && c <= 0xDF) ? 2 : (c >= 0xE0 && c <= 0xEF) ? 3 : (c >= 0xF0 && c <= 0xF4) ? 4 : 0;
        if (!len) return (long)i;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
        for (int k = 1; k < len; ++k) {
            unsigned char d = p[i + k];  // a NUL stops here: never read past the terminator
            if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) return (long)i;
        }
        i += len;
    }
    return -1;
}

std::string checked_text(const char *s, const std::string &what) {
    long at = invalid_utf8_at(s);
    if (at >= 0) throw ecso::input_error(what + " is not valid UTF-8 (byte " + std::to_string(at) + "); send UTF-8 text");
    return s;
}

const char *enum_name(int32_t v, const char *const *names, int n) { return v >= 0 && v < n ? names[v] : nullptr; }

ecso::Options to_options(const ecso_options &o) {
    ecso::Options out;
    const char *judge = enum_name(o.judge, ecso::data::judges, ecso::data::n_judges);
    if (!judge) throw ecso::input_error("options.judge " + std::to_string(o.judge) + " is not an ecso_judge value");
    if (o.decision_rule < 0 || o.decision_rule >= ecso::data::n_decision_rules)
        throw ecso::input_error("options.decision_rule " + std::to_string(o.decision_rule) +
                                " is not an ecso_decision_rule value");
    out.judge = judge;
    out.decision_rule = ecso::data::decision_rules[o.decision_rule].name;
    out.logit_threshold = o.logit_threshold;
    out.max_tokens = o.max_tokens, out.judge_max_tokens = o.judge_max_tokens;
    out.judge_early_stop = o.judge_early_stop != 0, out.caption_max_tokens = o.caption_max_tokens;
    out.temperature = o.temperature, out.top_p = o.top_p, out.seed = o.seed;
    out.reuse = o.reuse != 0, out.defense = o.defense != 0;
    out.guard_every = o.guard_every, out.guard_threshold = o.guard_threshold;
    if (o.n_history < 0 || (o.n_history > 0 && !o.history))
        throw ecso::input_error("options.history: n_history must be >= 0 and history non-null when n_history > 0");
    static const char *const kRoles[] = {"system", "user", "assistant"};
    for (int32_t i = 0; i < o.n_history; ++i) {
        const ecso_turn &t = o.history[i];
        std::string what = "history turn " + std::to_string(i);
        const char *role = enum_name(t.role, kRoles, 3);
        if (!role) throw ecso::input_error(what + " has role " + std::to_string(t.role) + ", not an ecso_role value");
        if (!t.content) throw ecso::input_error(what + " has a null content");
        out.history.push_back({role, checked_text(t.content, what)});
    }
    return out;
}

// The library's own event kinds, each mapped explicitly: a kind this table lacks is never reported as another.
bool event_kind(const char *kind, int32_t &out) {
    static const std::pair<const char *, ecso_event_kind> kinds[] = {
        {"step_start", ECSO_EVENT_STEP_START}, {"token", ECSO_EVENT_TOKEN}, {"step_end", ECSO_EVENT_STEP_END},
        {"retract", ECSO_EVENT_RETRACT}};
    for (const auto &k : kinds)
        if (!std::strcmp(kind, k.first)) return out = k.second, true;
    return false;
}

std::unique_ptr<ecso::Image> load_image(ecso::Engine &e, const ecso_image &image) {
    switch (image.kind) {
        case ECSO_IMAGE_PATH:
            if (!image.path) throw ecso::input_error("ecso_image: kind PATH with a null path");
            return std::make_unique<ecso::Image>(e.load_image_file(image.path));
        case ECSO_IMAGE_ENCODED:
            if (!image.data) throw ecso::input_error("ecso_image: kind ENCODED with null data");
            return std::make_unique<ecso::Image>(e.load_image_bytes(image.data, image.size, "<bytes>"));
        case ECSO_IMAGE_RGB: {
            if (!image.data) throw ecso::input_error("ecso_image: kind RGB with null data");
            if (image.rgb_width <= 0 || image.rgb_height <= 0 ||
                (uint64_t)image.rgb_width * (uint64_t)image.rgb_height * 3u != (uint64_t)image.size)
                throw ecso::image_error("raw RGB image: give rgb_width, rgb_height > 0 and size = width * height * 3 "
                                        "bytes (got " + std::to_string(image.rgb_width) + "x" +
                                        std::to_string(image.rgb_height) + ", " + std::to_string(image.size) + ")");
            return std::make_unique<ecso::Image>(e.load_image_rgb(image.data, image.rgb_width, image.rgb_height));
        }
        default:
            throw ecso::input_error("ecso_image.kind " + std::to_string(image.kind) + " is not an ecso_image_kind value");
    }
}

}  // namespace

extern "C" {

int32_t ecso_abi_version(void) { return ECSO_ABI_VERSION; }

const char *ecso_version(void) {
    static const std::string v = std::string(ECSO_VERSION_STRING) + " (prompts " + ecso::data::prompt_version +
                                 ", abi " + std::to_string(ECSO_ABI_VERSION) + ")";
    return v.c_str();
}

const char *ecso_last_error(void) { return g_last_error.c_str(); }

const char *ecso_judge_name(int32_t judge) { return enum_name(judge, ecso::data::judges, ecso::data::n_judges); }

int32_t ecso_judge_from_name(const char *name) {
    for (int32_t i = 0; name && i < ecso::data::n_judges; ++i)
        if (!std::strcmp(name, ecso::data::judges[i])) return i;
    return -1;
}

const char *ecso_decision_rule_name(int32_t rule) {
    return rule >= 0 && rule < ecso::data::n_decision_rules ? ecso::data::decision_rules[rule].name : nullptr;
}

int32_t ecso_decision_rule_from_name(const char *name) {
    for (int32_t i = 0; name && i < ecso::data::n_decision_rules; ++i)
        if (!std::strcmp(name, ecso::data::decision_rules[i].name)) return i;
    return -1;
}

ecso_status ecso_config_init(ecso_config *config, size_t struct_size) {
    return guarded([&] { return init_struct(config, struct_size, config_defaults(), "ecso_config"); });
}

ecso_status ecso_options_init(ecso_options *options, size_t struct_size) {
    return guarded([&] { return init_struct(options, struct_size, options_defaults(), "ecso_options"); });
}

ecso_status ecso_image_init(ecso_image *image, size_t struct_size) {
    return guarded([&] { return init_struct(image, struct_size, image_defaults(), "ecso_image"); });
}

ecso_status ecso_open(const ecso_config *config_in, ecso_engine **out) {
    return guarded([&]() -> ecso_status {
        if (!out) return fail(ECSO_ERR_INPUT, "ecso_open: out is a null pointer");
        *out = nullptr;
        if (!config_in)
            return fail(ECSO_ERR_INPUT, "ecso_open: config is a null pointer; fill one with ecso_config_init");
        ecso_config config = read_struct(config_in, config_defaults(), "ecso_config");
        if (!config.model) return fail(ECSO_ERR_INPUT, "ecso_open: config.model is a null pointer; give the LLM GGUF path");
        static const char *const kRepack[] = {"auto", "on", "off"};
        const char *repack = enum_name(config.cpu_repack, kRepack, 3);
        if (!repack)
            return fail(ECSO_ERR_INPUT, "config.cpu_repack " + std::to_string(config.cpu_repack) +
                                            " is not an ecso_cpu_repack value");
        ecso::EngineConfig c;
        switch (config.chat_format) {
            case ECSO_CHAT_FORMAT_AUTO: c.chat_format = ecso::ChatFormat::Kind::automatic; break;
            case ECSO_CHAT_FORMAT_LLAVA15: c.chat_format = ecso::ChatFormat::Kind::llava15; break;
            case ECSO_CHAT_FORMAT_GGUF: c.chat_format = ecso::ChatFormat::Kind::gguf; break;
            default:
                return fail(ECSO_ERR_INPUT, "config.chat_format " + std::to_string(config.chat_format) +
                                                " is not an ecso_chat_format value");
        }
        c.model = config.model;
        c.mmproj = config.mmproj ? config.mmproj : "";
        c.n_ctx = config.n_ctx, c.n_batch = config.n_batch, c.n_threads = config.n_threads;
        c.n_gpu_layers = config.n_gpu_layers, c.mmproj_gpu = config.mmproj_gpu != 0;
        c.flash_attn = config.flash_attn, c.kv_f32 = config.kv_f32 != 0;
        c.cpu_repack = repack;
        c.image_cache_entries = config.image_cache_entries, c.max_query_chars = config.max_query_chars;
        c.verbose = config.verbose != 0;
        auto h = std::make_unique<ecso_engine>();
        h->engine = std::make_unique<ecso::Engine>(c);
        h->engine_json = h->engine->describe_json();
        *out = h.release();
        return ECSO_OK;
    });
}

ecso_status ecso_run(ecso_engine *engine, const ecso_image *image_in, const char *query, const ecso_options *options,
                     ecso_event_fn on_event, void *user_data, ecso_result **out) {
    return guarded([&]() -> ecso_status {
        if (out) *out = nullptr;
        if (!engine) return fail(ECSO_ERR_INPUT, "ecso_run: engine is a null pointer; open one with ecso_open");
        if (!out) return fail(ECSO_ERR_INPUT, "ecso_run: out is a null pointer");
        if (!query) return fail(ECSO_ERR_INPUT, "ecso_run: query is a null pointer");
        std::string q = checked_text(query, "the query");
        ecso::Options opts = to_options(options ? read_struct(options, options_defaults(), "ecso_options")
                                                : options_defaults());
        ecso_image image{};
        if (image_in) image = read_struct(image_in, image_defaults(), "ecso_image");
        std::lock_guard<std::mutex> lock(engine->mutex);
        // Reset the cancel flag first, then check closed: a close that lands after this check sets cancel after our
        // reset (it writes closed, then cancel), so the request it races with is always cancelled, never run whole.
        engine->cancel = false;
        if (engine->closed || !engine->engine) return fail(ECSO_ERR_CLOSED, "the engine is closed; open a new one");
        ecso::Engine &e = *engine->engine;
        std::string step;
        ecso::EmitFn emit = [&](const char *kind, const std::string &s, const std::string &text) {
            step = s;
            ecso_event ev{};
            if (!on_event || !event_kind(kind, ev.kind)) return;
            ev.struct_size = sizeof ev;
            ev.step = step.c_str();
            ev.text = text.c_str();
            on_event(&ev, user_data);
        };
        if (on_event)
            e.observer = [&](bool img, const std::vector<int32_t> &tokens, int32_t pos, int32_t n_pos) {
                ecso_event ev{};
                ev.struct_size = sizeof ev;
                ev.kind = img ? ECSO_EVENT_EVAL_IMAGE : ECSO_EVENT_EVAL_TEXT;
                ev.step = step.c_str();
                ev.text = "";
                ev.tokens = tokens.data();
                ev.n_tokens = (int32_t)tokens.size();
                ev.pos = pos;
                ev.n_pos = img ? n_pos : (int32_t)tokens.size();
                on_event(&ev, user_data);
            };
        e.cancel_flag = &engine->cancel;
        struct Reset {  // the hooks point at this call's locals: unset them however the call ends
            ecso::Engine &e;
            ~Reset() { e.observer = nullptr, e.cancel_flag = nullptr; }
        } reset{e};
        std::unique_ptr<ecso::Image> img;
        if (image_in) img = load_image(e, image);
        auto r = std::make_unique<ecso_result>();
        r->result = ecso::run_ecso(e, img.get(), q, opts, emit);
        r->json = r->result.to_json(opts, engine->engine_json);
        *out = r.release();
        return ECSO_OK;
    });
}

ecso_status ecso_cancel(ecso_engine *engine) {
    if (!engine) return fail(ECSO_ERR_INPUT, "ecso_cancel: engine is a null pointer");
    engine->cancel = true;  // atomic: no lock, so it reaches a running request
    return ECSO_OK;
}

ecso_status ecso_clear_cache(ecso_engine *engine) {
    return guarded([&]() -> ecso_status {
        if (!engine) return fail(ECSO_ERR_INPUT, "ecso_clear_cache: engine is a null pointer");
        std::lock_guard<std::mutex> lock(engine->mutex);
        if (engine->closed || !engine->engine) return fail(ECSO_ERR_CLOSED, "the engine is closed; open a new one");
        engine->engine->clear_caches();
        return ECSO_OK;
    });
}

ecso_status ecso_close(ecso_engine *engine) {
    return guarded([&]() -> ecso_status {
        if (!engine) return fail(ECSO_ERR_INPUT, "ecso_close: engine is a null pointer");
        engine->closed = true;  // first closed, then cancel: ecso_run relies on this order (see there)
        engine->cancel = true;  // a running request stops at its next token, then releases the mutex
        std::lock_guard<std::mutex> lock(engine->mutex);
        engine->engine.reset();
        return ECSO_OK;
    });
}

void ecso_free(ecso_engine *engine) {
    if (!engine) return;
    ecso_close(engine);
    delete engine;
}

const char *ecso_engine_json(ecso_engine *engine) {
    if (!engine) {
        g_last_error = "ecso_engine_json: engine is a null pointer";
        return "";
    }
    return engine->engine_json.c_str();
}

namespace {
const ecso::StepTrace *step_at(const ecso_result *r, int32_t i) {
    return r && i >= 0 && i < (int32_t)r->result.steps.size() ? &r->result.steps[i] : nullptr;
}
}  // namespace

const char *ecso_result_json(const ecso_result *r) { return r ? r->json.c_str() : ""; }
const char *ecso_result_answer(const ecso_result *r) { return r ? r->result.answer.c_str() : ""; }
int32_t ecso_result_unsafe(const ecso_result *r) { return r && r->result.unsafe ? 1 : 0; }
const char *ecso_result_initial_answer(const ecso_result *r) { return r ? r->result.initial_answer.c_str() : ""; }
const char *ecso_result_judge_reply(const ecso_result *r) { return r ? r->result.judge_reply.c_str() : ""; }
int32_t ecso_result_judge_score(const ecso_result *r, double *score) {
    if (!r || !r->result.judge_score) return 0;
    if (score) *score = *r->result.judge_score;
    return 1;
}
const char *ecso_result_caption(const ecso_result *r) {
    return r && r->result.caption ? r->result.caption->c_str() : nullptr;
}
int32_t ecso_result_retracted(const ecso_result *r) { return r && r->result.retracted ? 1 : 0; }
int32_t ecso_result_image_encodes(const ecso_result *r) { return r ? r->result.image_encodes : 0; }
double ecso_result_seconds(const ecso_result *r) { return r ? r->result.seconds : 0.0; }
int32_t ecso_result_n_steps(const ecso_result *r) { return r ? (int32_t)r->result.steps.size() : 0; }
const char *ecso_result_step_name(const ecso_result *r, int32_t i) {
    const auto *s = step_at(r, i);
    return s ? s->name.c_str() : nullptr;
}
double ecso_result_step_seconds(const ecso_result *r, int32_t i) {
    const auto *s = step_at(r, i);
    return s ? s->prefill_seconds + s->generate_seconds : 0.0;
}
int32_t ecso_result_step_reused_positions(const ecso_result *r, int32_t i) {
    const auto *s = step_at(r, i);
    return s ? s->reused_positions : -1;
}
int32_t ecso_result_step_evaluated_positions(const ecso_result *r, int32_t i) {
    const auto *s = step_at(r, i);
    return s ? s->evaluated_positions : -1;
}
int32_t ecso_result_step_generated_tokens(const ecso_result *r, int32_t i) {
    const auto *s = step_at(r, i);
    return s ? s->generated_tokens : -1;
}
void ecso_result_free(ecso_result *r) { delete r; }

}  // extern "C"
