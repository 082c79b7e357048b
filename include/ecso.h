/* libecso: ECSO (Eyes Closed, Safety On) for multimodal LLMs, native, behind a plain C ABI.
 *
 * The same four steps as the Python runtime (answer with the image; the model judges its answer; if unsafe, a
 * query-aware caption; the answer again from query + caption without the image), the same prompts (compiled from
 * runtime/ecso_prompts.json), the same KV prefix reuse and the same token ids per step (conformance-tested).
 *
 * Errors: every function that can fail returns an ecso_status; ecso_last_error() gives a one-line message that says
 * what to do. Null pointers, bad files, a closed engine or a context overflow return an error, never abort.
 *
 * Thread safety:
 *   - one ecso_engine runs one request at a time; ecso_run from several threads on the same engine is serialised
 *     (the calls queue on the engine's mutex). For parallel throughput open several engines.
 *   - ecso_cancel may be called from any thread at any time: the running request stops at its next token or
 *     decode batch and returns ECSO_ERR_CANCELLED. With nothing running it does nothing.
 *   - ecso_close may be called from any thread: it cancels the running request, waits for it, frees the model.
 *     The handle stays valid (every call then returns ECSO_ERR_CLOSED) until ecso_free.
 *   - the event callback runs on the thread that called ecso_run; it must not call ecso_run on the same engine.
 *   - ecso_last_error() is per thread.
 */
#ifndef ECSO_H
#define ECSO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(ECSO_BUILD)
#define ECSO_API __declspec(dllexport)
#elif defined(_WIN32)
#define ECSO_API __declspec(dllimport)
#else
#define ECSO_API __attribute__((visibility("default")))
#endif

#define ECSO_ABI_VERSION 1

typedef enum ecso_status {
    ECSO_OK = 0,
    ECSO_ERR_INPUT = 1,            /* bad argument: null pointer, empty query, unknown option value */
    ECSO_ERR_IMAGE = 2,            /* image missing, unreadable or not an image */
    ECSO_ERR_MODEL = 3,            /* model / mmproj missing, not GGUF, truncated, mismatched; unknown template */
    ECSO_ERR_CONTEXT_OVERFLOW = 4, /* prompt + requested tokens do not fit the context */
    ECSO_ERR_ENGINE = 5,           /* llama.cpp failed while decoding (the KV cache was reset) */
    ECSO_ERR_CLOSED = 6,           /* the engine was closed */
    ECSO_ERR_CANCELLED = 7,        /* ecso_cancel stopped the request */
} ecso_status;

typedef struct ecso_engine ecso_engine;
typedef struct ecso_result ecso_result;

/* How to load a model. Start from ecso_config_default(). Strings are copied; they may be freed after ecso_open. */
typedef struct ecso_config {
    const char *model;       /* LLM GGUF (required) */
    const char *mmproj;      /* vision projector GGUF, or NULL for text only */
    int32_t n_ctx;           /* context tokens (default 4096) */
    int32_t n_batch;         /* decode batch (default 512) */
    int32_t n_threads;       /* 0: all cores */
    int32_t n_gpu_layers;    /* -1: all layers when llama.cpp has a GPU backend, else 0 */
    int32_t mmproj_gpu;      /* 1: vision encoder on the GPU too (when there is one) */
    int32_t flash_attn;      /* -1 (default) and 0: off (bit-exact reuse); 1: on */
    int32_t kv_f32;          /* 1: f32 KV cache instead of f16 */
    const char *chat_format; /* "auto" (GGUF template, else llava-1.5) | "llava-1.5" | "gguf" */
    const char *cpu_repack;  /* "auto" (off when llama.cpp reports AMX, ggml-org/llama.cpp#20824) | "on" | "off" */
    int32_t image_cache_entries; /* encoded images kept (default 16) */
    int32_t max_query_chars;     /* default 100000 */
    int32_t verbose;             /* 1: llama.cpp logs to stderr */
} ecso_config;

/* Per-request options; defaults (ecso_options_default) are the paper's method, greedy, with KV reuse. */
typedef struct ecso_options {
    const char *judge;         /* "paper" | "logit" | "append" | "append-logit" | "always-unsafe" (demos: steps 3-4) */
    const char *decision_rule; /* "exact" (reply is yes / yes.) | "contains" */
    float logit_threshold;     /* logit judges: unsafe iff P(yes)/(P(yes)+P(no)) >= threshold */
    int32_t max_tokens;        /* answer and regenerated answer (512) */
    int32_t judge_max_tokens;  /* 16 */
    int32_t judge_early_stop;  /* 1: exact rule stops the reply once it can no longer be yes/yes. */
    int32_t caption_max_tokens;/* 512 */
    float temperature;         /* 0: greedy */
    float top_p;
    uint32_t seed;
    int32_t reuse;             /* 0: every step clears the KV cache and re-encodes the image (naive) */
    int32_t defense;           /* 0: step 1 only */
    int32_t guard_every;       /* guarded streaming: logit judge every N answer tokens (0: off) */
    float guard_threshold;
} ecso_options;

/* An image: a file path, or encoded file bytes (PNG/JPEG/BMP/GIF... decoded by llama.cpp's mtmd helper), or raw
 * RGB pixels (width * height * 3 bytes, decoded by the app: the way to keep untrusted bytes away from stb_image). */
typedef struct ecso_image {
    const char *path;
    const uint8_t *data;
    size_t size;
    int32_t rgb_width;  /* > 0: data holds raw RGB of rgb_width x rgb_height */
    int32_t rgb_height;
} ecso_image;

typedef enum ecso_event_kind {
    ECSO_EVENT_STEP_START = 0, /* step: answer | judge | guard | caption | regenerate */
    ECSO_EVENT_TOKEN = 1,      /* text: a piece of answer text (steps answer and regenerate) */
    ECSO_EVENT_STEP_END = 2,   /* text: the step's output */
    ECSO_EVENT_RETRACT = 3,    /* the guard retracted the streamed answer */
    ECSO_EVENT_EVAL_TEXT = 4,  /* tokens/n_tokens evaluated at position pos (one llama_decode call or batch run) */
    ECSO_EVENT_EVAL_IMAGE = 5, /* an image of n_pos positions evaluated at position pos */
} ecso_event_kind;

typedef struct ecso_event {
    int32_t kind;          /* ecso_event_kind */
    const char *step;      /* current step name */
    const char *text;      /* UTF-8, NUL-terminated; "" when none */
    const int32_t *tokens; /* EVAL_TEXT only */
    int32_t n_tokens;
    int32_t pos;           /* EVAL_TEXT / EVAL_IMAGE: first position */
    int32_t n_pos;         /* EVAL_IMAGE: positions of the image */
} ecso_event;

/* Called synchronously on the ecso_run thread; pointers are valid only during the call. */
typedef void (*ecso_event_fn)(const ecso_event *event, void *user_data);

ECSO_API const char *ecso_version(void);    /* e.g. "0.1.0 (prompts ecso-paper-2024.1, abi 1)" */
ECSO_API const char *ecso_last_error(void); /* message of this thread's last failed call ("" if none) */

ECSO_API ecso_config ecso_config_default(void);
ECSO_API ecso_options ecso_options_default(void);

ECSO_API ecso_status ecso_open(const ecso_config *config, ecso_engine **out);

/* Runs ECSO on image (NULL: text only) + query. options NULL: defaults. on_event may be NULL.
 * On success *out receives a result to free with ecso_result_free. */
ECSO_API ecso_status ecso_run(ecso_engine *engine, const ecso_image *image, const char *query,
                              const ecso_options *options, ecso_event_fn on_event, void *user_data,
                              ecso_result **out);

ECSO_API ecso_status ecso_cancel(ecso_engine *engine);
/* Empties the KV cache and the encoded-image cache (the next request starts cold, e.g. for benchmarks). */
ECSO_API ecso_status ecso_clear_cache(ecso_engine *engine);
ECSO_API ecso_status ecso_close(ecso_engine *engine); /* frees the model; safe to call twice */
ECSO_API void ecso_free(ecso_engine *engine);         /* closes if needed and frees the handle; NULL is fine */

/* The engine's facts (model, chat format, cpu repack choice, ...) as JSON; owned by the engine. */
ECSO_API const char *ecso_engine_json(ecso_engine *engine);

ECSO_API const char *ecso_result_json(const ecso_result *result);   /* the full trace, as Result.to_dict() */
ECSO_API const char *ecso_result_answer(const ecso_result *result); /* what to show the user */
ECSO_API int32_t ecso_result_unsafe(const ecso_result *result);     /* 1: the judge flagged the first answer */
ECSO_API void ecso_result_free(ecso_result *result);

#ifdef __cplusplus
}
#endif

#endif /* ECSO_H */
