/* libecso: ECSO (Eyes Closed, Safety On) for multimodal LLMs, native, behind a plain C ABI.
 *
 * The same four steps as the Python runtime (answer with the image; the model judges its answer; if unsafe, a
 * query-aware caption; the answer again from query + caption without the image), the same prompts (compiled from
 * runtime/ecso_prompts.json), the model's own chat template rendered by llama.cpp's Jinja engine, the same KV prefix
 * reuse and the same token ids per step (conformance-tested against the Python engine).
 *
 * Text: every string passed in or returned is UTF-8 and NUL-terminated. A query or history turn that is not valid
 * UTF-8 is refused with ECSO_ERR_INPUT. File paths are passed to the OS as they are.
 *
 * Errors: every function that can fail returns an ecso_status; ecso_last_error() gives a one-line message that says
 * what to do. Null pointers, bad files, bad sizes, a closed engine or a context overflow return an error, never abort.
 *
 * ABI versioning (how an app built against this header keeps working with a newer libecso):
 *   - ECSO_ABI_VERSION is the ABI this header describes; ecso_abi_version() is the one the loaded library implements.
 *     The shared library's SOVERSION is the same number. An app checks at start-up that they are equal.
 *   - Structs the app fills (ecso_config, ecso_options, ecso_image) start with `struct_size`. Fill them with
 *     ecso_config_init(&c, sizeof c) (resp. ecso_options_init / ecso_image_init): this writes the defaults and the
 *     size the app was compiled with. A newer library reads only that many bytes and keeps its defaults for fields
 *     added later, so new fields go at the end, and a minor release only ever appends. A struct larger than the
 *     library knows (an app built against a newer header) is refused with ECSO_ERR_INPUT, never read past its end.
 *   - ecso_turn is an array element, so it is frozen: new per-turn data would come as a new struct and field.
 *   - Structs the library fills (ecso_event) also start with `struct_size`: read a field only when
 *     struct_size > offsetof(ecso_event, field).
 *   - Enum values never change meaning; new values are appended. Choices are enums (the judge and decision-rule
 *     enums are generated from runtime/ecso_prompts.json into ecso_choices.h, next to this header).
 *   - Removing or changing anything above is a new ABI version (and SOVERSION).
 *
 * Lifetimes of returned pointers:
 *   - ecso_version(), ecso_judge_name(), ecso_decision_rule_name(): static, valid for the life of the process.
 *   - ecso_last_error(): valid until the next libecso call on the same thread.
 *   - ecso_engine_json(): valid until ecso_free of that engine.
 *   - ecso_result_*() strings: valid until ecso_result_free of that result.
 *   - ecso_event fields: valid only during the callback.
 *
 * Thread safety:
 *   - one ecso_engine runs one request at a time; ecso_run from several threads on the same engine is serialised
 *     (the calls queue on the engine's mutex). For parallel throughput open several engines.
 *   - ecso_cancel may be called from any thread at any time: the running request stops at its next token, decode
 *     batch or image chunk and returns ECSO_ERR_CANCELLED. With nothing running it does nothing.
 *   - ecso_close may be called from any thread: it cancels the running request (also one that is just starting),
 *     waits for it, frees the model. The handle stays valid (every call then returns ECSO_ERR_CLOSED) until ecso_free.
 *   - the event callback runs on the thread that called ecso_run; it must not call ecso_run on the same engine.
 *   - ecso_last_error() is per thread.
 *
 * Untrusted images: encoded bytes are decoded by llama.cpp's mtmd helper (stb_image), once the size their header
 * declares is within the limits (1..16384 px per side, at most 40 MP). An app that receives images from untrusted
 * sources should decode them itself with a hardened decoder and pass raw RGB (ECSO_IMAGE_RGB).
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

#define ECSO_ABI_VERSION 2

#include "ecso_choices.h" /* generated: ecso_judge, ecso_decision_rule */

typedef enum ecso_status {
    ECSO_OK = 0,
    ECSO_ERR_INPUT = 1,            /* bad argument: null pointer, empty or invalid UTF-8 query, bad enum or size */
    ECSO_ERR_IMAGE = 2,            /* image missing, unreadable or not an image */
    ECSO_ERR_MODEL = 3,            /* model / mmproj missing, not GGUF, truncated, mismatched; template not renderable */
    ECSO_ERR_CONTEXT_OVERFLOW = 4, /* prompt + requested tokens do not fit the context */
    ECSO_ERR_ENGINE = 5,           /* llama.cpp failed while decoding (the KV cache was reset) */
    ECSO_ERR_CLOSED = 6,           /* the engine was closed */
    ECSO_ERR_CANCELLED = 7,        /* ecso_cancel stopped the request */
} ecso_status;

typedef enum ecso_chat_format {
    ECSO_CHAT_FORMAT_AUTO = 0,    /* the GGUF's chat template when it has one, else llava-1.5 */
    ECSO_CHAT_FORMAT_LLAVA15 = 1, /* vicuna_v1, as LLaVA-1.5's eval scripts */
    ECSO_CHAT_FORMAT_GGUF = 2,    /* the GGUF's chat template (any Jinja template; an error if it has none) */
} ecso_chat_format;

typedef enum ecso_cpu_repack {
    ECSO_CPU_REPACK_AUTO = 0, /* off when llama.cpp reports AMX (ggml-org/llama.cpp#20824), else on */
    ECSO_CPU_REPACK_ON = 1,
    ECSO_CPU_REPACK_OFF = 2,
} ecso_cpu_repack;

typedef enum ecso_image_kind {
    ECSO_IMAGE_PATH = 0,    /* path: an image file */
    ECSO_IMAGE_ENCODED = 1, /* data/size: encoded file bytes (PNG/JPEG/BMP/GIF..., decoded by stb_image) */
    ECSO_IMAGE_RGB = 2,     /* data/size: raw RGB, rgb_width * rgb_height * 3 bytes, decoded by the app */
} ecso_image_kind;

typedef enum ecso_role {
    ECSO_ROLE_SYSTEM = 0,
    ECSO_ROLE_USER = 1,
    ECSO_ROLE_ASSISTANT = 2,
} ecso_role;

typedef struct ecso_engine ecso_engine;
typedef struct ecso_result ecso_result;

/* How to load a model. Fill with ecso_config_init(&c, sizeof c). Strings are copied; free them after ecso_open. */
typedef struct ecso_config {
    size_t struct_size;      /* sizeof(ecso_config) the app was built with (set by ecso_config_init) */
    const char *model;       /* LLM GGUF (required) */
    const char *mmproj;      /* vision projector GGUF, or NULL for text only */
    int32_t n_ctx;           /* context tokens (default 4096) */
    int32_t n_batch;         /* decode batch (default 512) */
    int32_t n_threads;       /* 0: all cores */
    int32_t n_gpu_layers;    /* -1: all layers when llama.cpp has a GPU backend, else 0 */
    int32_t mmproj_gpu;      /* 1: vision encoder on the GPU too (when there is one) */
    int32_t flash_attn;      /* -1 (default) and 0: off (bit-exact reuse); 1: on */
    int32_t kv_f32;          /* 1: f32 KV cache instead of f16 */
    int32_t chat_format;     /* ecso_chat_format (default AUTO) */
    int32_t cpu_repack;      /* ecso_cpu_repack (default AUTO) */
    int32_t image_cache_entries; /* encoded images kept (default 16) */
    int32_t max_query_chars;     /* default 100000 */
    int32_t verbose;             /* 1: llama.cpp logs to stderr */
} ecso_config;

/* One earlier turn of a conversation. Frozen (an array element): never gains fields. */
typedef struct ecso_turn {
    int32_t role;        /* ecso_role */
    const char *content; /* UTF-8 */
} ecso_turn;

/* Per-request options; ecso_options_init gives the paper's method, greedy, with KV reuse. */
typedef struct ecso_options {
    size_t struct_size;        /* sizeof(ecso_options) the app was built with (set by ecso_options_init) */
    int32_t judge;             /* ecso_judge (default ECSO_JUDGE_PAPER) */
    int32_t decision_rule;     /* ecso_decision_rule: EXACT (reply is yes / yes.) | CONTAINS */
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
    const ecso_turn *history;  /* earlier turns, sent before the query in step 1 and the appended judges (NULL: none) */
    int32_t n_history;
} ecso_options;

/* An image. Fill with ecso_image_init(&img, sizeof img), then set kind and its fields. */
typedef struct ecso_image {
    size_t struct_size;
    int32_t kind;          /* ecso_image_kind */
    const char *path;      /* ECSO_IMAGE_PATH */
    const uint8_t *data;   /* ECSO_IMAGE_ENCODED / ECSO_IMAGE_RGB */
    size_t size;           /* bytes at data */
    int32_t rgb_width;     /* ECSO_IMAGE_RGB */
    int32_t rgb_height;
} ecso_image;

typedef enum ecso_event_kind {
    ECSO_EVENT_STEP_START = 0, /* step: answer | judge | guard | caption | regenerate */
    ECSO_EVENT_TOKEN = 1,      /* text: a piece of answer text (steps answer and regenerate) */
    ECSO_EVENT_STEP_END = 2,   /* text: the step's output */
    ECSO_EVENT_RETRACT = 3,    /* the guard retracted the streamed answer */
    ECSO_EVENT_EVAL_TEXT = 4,  /* tokens/n_tokens evaluated at position pos (one llama_decode call or batch run) */
    ECSO_EVENT_EVAL_IMAGE = 5, /* an image block of n_pos positions evaluated at position pos */
} ecso_event_kind;

/* Filled by the library; new fields are appended (check struct_size before reading one). */
typedef struct ecso_event {
    size_t struct_size;
    int32_t kind;          /* ecso_event_kind */
    const char *step;      /* current step name */
    const char *text;      /* UTF-8, NUL-terminated; "" when none */
    const int32_t *tokens; /* EVAL_TEXT only */
    int32_t n_tokens;
    int32_t pos;           /* EVAL_TEXT / EVAL_IMAGE: first position */
    int32_t n_pos;         /* EVAL_IMAGE: positions of the image block */
} ecso_event;

/* Called synchronously on the ecso_run thread; pointers are valid only during the call. */
typedef void (*ecso_event_fn)(const ecso_event *event, void *user_data);

ECSO_API int32_t ecso_abi_version(void);    /* ECSO_ABI_VERSION of the loaded library */
ECSO_API const char *ecso_version(void);    /* e.g. "0.2.0 (prompts ecso-paper-2024.1, abi 2)" */
ECSO_API const char *ecso_last_error(void); /* message of this thread's last failed call ("" if none) */

/* Names of the generated enums ("paper", "append-logit", "exact", ...); NULL for an unknown value. The *_from_name
 * functions return -1 for an unknown name (for apps that take the choice as text, like ecso-native). */
ECSO_API const char *ecso_judge_name(int32_t judge);
ECSO_API int32_t ecso_judge_from_name(const char *name);
ECSO_API const char *ecso_decision_rule_name(int32_t rule);
ECSO_API int32_t ecso_decision_rule_from_name(const char *name);

/* Write the defaults and struct_size; ECSO_ERR_INPUT for a null pointer or a struct_size this library cannot serve. */
ECSO_API ecso_status ecso_config_init(ecso_config *config, size_t struct_size);
ECSO_API ecso_status ecso_options_init(ecso_options *options, size_t struct_size);
ECSO_API ecso_status ecso_image_init(ecso_image *image, size_t struct_size);

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

/* The engine's facts (model, chat format, cpu repack choice, ...) as JSON; valid until ecso_free. */
ECSO_API const char *ecso_engine_json(ecso_engine *engine);

/* Results. A NULL result gives "" / 0 / NULL; strings live until ecso_result_free. */
ECSO_API const char *ecso_result_answer(const ecso_result *result);         /* what to show the user */
ECSO_API int32_t ecso_result_unsafe(const ecso_result *result);             /* 1: the judge flagged the first answer */
ECSO_API const char *ecso_result_initial_answer(const ecso_result *result); /* step 1's answer */
ECSO_API const char *ecso_result_judge_reply(const ecso_result *result);    /* "" without a judge step */
/* 1 and *score = P(yes) when the judge gave a score (logit judges, the guard); 0 otherwise. */
ECSO_API int32_t ecso_result_judge_score(const ecso_result *result, double *score);
ECSO_API const char *ecso_result_caption(const ecso_result *result);        /* NULL when no caption step ran */
ECSO_API int32_t ecso_result_retracted(const ecso_result *result);          /* 1: the guard retracted the answer */
ECSO_API int32_t ecso_result_image_encodes(const ecso_result *result);      /* vision encoder runs in this request */
ECSO_API double ecso_result_seconds(const ecso_result *result);
ECSO_API int32_t ecso_result_n_steps(const ecso_result *result);
/* Per step i in [0, n_steps): NULL / 0 / -1 when i is out of range. */
ECSO_API const char *ecso_result_step_name(const ecso_result *result, int32_t i);
ECSO_API double ecso_result_step_seconds(const ecso_result *result, int32_t i);
ECSO_API int32_t ecso_result_step_reused_positions(const ecso_result *result, int32_t i);
ECSO_API int32_t ecso_result_step_evaluated_positions(const ecso_result *result, int32_t i);
ECSO_API int32_t ecso_result_step_generated_tokens(const ecso_result *result, int32_t i);
ECSO_API const char *ecso_result_json(const ecso_result *result);           /* the full trace, as Result.to_dict() */
ECSO_API void ecso_result_free(ecso_result *result);

#ifdef __cplusplus
}
#endif

#endif /* ECSO_H */
