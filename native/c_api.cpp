// The C ABI (include/ecso.h): argument checks, error codes and messages, the engine mutex, cancel, events.
// No exception crosses this boundary: every entry point catches and turns it into a status + ecso_last_error().
#include <atomic>
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

std::string str_or(const char *s, const char *fallback) { return s ? s : fallback; }

ecso::Options to_options(const ecso_options &o) {
    ecso::Options out;
    out.judge = str_or(o.judge, "paper");
    out.decision_rule = str_or(o.decision_rule, "exact");
    out.logit_threshold = o.logit_threshold;
    out.max_tokens = o.max_tokens, out.judge_max_tokens = o.judge_max_tokens;
    out.judge_early_stop = o.judge_early_stop != 0, out.caption_max_tokens = o.caption_max_tokens;
    out.temperature = o.temperature, out.top_p = o.top_p, out.seed = o.seed;
    out.reuse = o.reuse != 0, out.defense = o.defense != 0;
    out.guard_every = o.guard_every, out.guard_threshold = o.guard_threshold;
    return out;
}

}  // namespace

extern "C" {

const char *ecso_version(void) {
    static const std::string v = std::string(ECSO_VERSION_STRING) + " (prompts " + ecso::data::prompt_version +
                                 ", abi " + std::to_string(ECSO_ABI_VERSION) + ")";
    return v.c_str();
}

const char *ecso_last_error(void) { return g_last_error.c_str(); }

ecso_config ecso_config_default(void) {
    ecso_config c;
    std::memset(&c, 0, sizeof c);
    c.n_ctx = 4096, c.n_batch = 512, c.n_threads = 0, c.n_gpu_layers = -1, c.mmproj_gpu = 1, c.flash_attn = -1;
    c.kv_f32 = 0, c.chat_format = "auto", c.cpu_repack = "auto", c.image_cache_entries = 16;
    c.max_query_chars = 100000, c.verbose = 0;
    return c;
}

ecso_options ecso_options_default(void) {
    ecso_options o;
    std::memset(&o, 0, sizeof o);
    o.judge = "paper", o.decision_rule = "exact", o.logit_threshold = 0.5f, o.max_tokens = 512;
    o.judge_max_tokens = 16, o.judge_early_stop = 1, o.caption_max_tokens = 512, o.temperature = 0.0f;
    o.top_p = 1.0f, o.seed = 0, o.reuse = 1, o.defense = 1, o.guard_every = 0, o.guard_threshold = 0.5f;
    return o;
}

ecso_status ecso_open(const ecso_config *config, ecso_engine **out) {
    return guarded([&]() -> ecso_status {
        if (!out) return fail(ECSO_ERR_INPUT, "ecso_open: out is a null pointer");
        *out = nullptr;
        if (!config) return fail(ECSO_ERR_INPUT, "ecso_open: config is a null pointer; start from ecso_config_default()");
        if (!config->model) return fail(ECSO_ERR_INPUT, "ecso_open: config.model is a null pointer; give the LLM GGUF path");
        ecso::EngineConfig c;
        c.model = config->model;
        c.mmproj = str_or(config->mmproj, "");
        c.n_ctx = config->n_ctx, c.n_batch = config->n_batch, c.n_threads = config->n_threads;
        c.n_gpu_layers = config->n_gpu_layers, c.mmproj_gpu = config->mmproj_gpu != 0;
        c.flash_attn = config->flash_attn, c.kv_f32 = config->kv_f32 != 0;
        c.chat_format = str_or(config->chat_format, "auto"), c.cpu_repack = str_or(config->cpu_repack, "auto");
        c.image_cache_entries = config->image_cache_entries, c.max_query_chars = config->max_query_chars;
        c.verbose = config->verbose != 0;
        if (c.chat_format != "auto" && c.chat_format != "llava-1.5" && c.chat_format != "gguf")
            return fail(ECSO_ERR_INPUT, "unknown chat format '" + c.chat_format + "'; use auto, llava-1.5 or gguf");
        auto h = std::make_unique<ecso_engine>();
        h->engine = std::make_unique<ecso::Engine>(c);
        h->engine_json = h->engine->describe_json();
        *out = h.release();
        return ECSO_OK;
    });
}

ecso_status ecso_run(ecso_engine *engine, const ecso_image *image, const char *query, const ecso_options *options,
                     ecso_event_fn on_event, void *user_data, ecso_result **out) {
    return guarded([&]() -> ecso_status {
        if (out) *out = nullptr;
        if (!engine) return fail(ECSO_ERR_INPUT, "ecso_run: engine is a null pointer; open one with ecso_open");
        if (!out) return fail(ECSO_ERR_INPUT, "ecso_run: out is a null pointer");
        if (!query) return fail(ECSO_ERR_INPUT, "ecso_run: query is a null pointer");
        if (image && !image->path && !image->data)
            return fail(ECSO_ERR_INPUT, "ecso_run: the image has neither a path nor data; pass NULL for no image");
        ecso_options defaults = ecso_options_default();
        ecso::Options opts = to_options(options ? *options : defaults);
        std::lock_guard<std::mutex> lock(engine->mutex);
        if (engine->closed || !engine->engine) return fail(ECSO_ERR_CLOSED, "the engine is closed; open a new one");
        engine->cancel = false;
        ecso::Engine &e = *engine->engine;
        std::string step;
        ecso::EmitFn emit = [&](const char *kind, const std::string &s, const std::string &text) {
            step = s;
            if (!on_event) return;
            ecso_event ev{};
            ev.kind = !std::strcmp(kind, "step_start") ? ECSO_EVENT_STEP_START
                      : !std::strcmp(kind, "token")    ? ECSO_EVENT_TOKEN
                      : !std::strcmp(kind, "step_end") ? ECSO_EVENT_STEP_END
                                                       : ECSO_EVENT_RETRACT;
            ev.step = step.c_str();
            ev.text = text.c_str();
            on_event(&ev, user_data);
        };
        if (on_event)
            e.observer = [&](bool img, const std::vector<int32_t> &tokens, int32_t pos, int32_t n_pos) {
                ecso_event ev{};
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
        if (image) {
            if (image->rgb_width > 0 || image->rgb_height > 0) {
                if (!image->data) return fail(ECSO_ERR_IMAGE, "raw RGB image without data");
                if ((size_t)image->rgb_width * (size_t)std::max(image->rgb_height, 0) * 3 != image->size)
                    return fail(ECSO_ERR_IMAGE, "raw RGB image: size must be width * height * 3 bytes");
                img = std::make_unique<ecso::Image>(e.load_image_rgb(image->data, image->rgb_width, image->rgb_height));
            } else if (image->path) {
                img = std::make_unique<ecso::Image>(e.load_image_file(image->path));
            } else {
                img = std::make_unique<ecso::Image>(e.load_image_bytes(image->data, image->size, "<bytes>"));
            }
        }
        auto r = std::make_unique<ecso_result>();
        r->result = ecso::run_ecso(e, img.get(), query, opts, emit);
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
        engine->closed = true;
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

const char *ecso_result_json(const ecso_result *r) { return r ? r->json.c_str() : ""; }
const char *ecso_result_answer(const ecso_result *r) { return r ? r->result.answer.c_str() : ""; }
int32_t ecso_result_unsafe(const ecso_result *r) { return r && r->result.unsafe ? 1 : 0; }
void ecso_result_free(ecso_result *r) { delete r; }

}  // extern "C"
