/* Native tests of the C ABI, run by ctest (also under AddressSanitizer + UBSan by .ci/native-checks). Modes:
 *   bad-inputs NOT_A_GGUF   null pointers, bad sizes and enums, missing / non-GGUF files: error codes, never an abort
 *   run MODEL MMPROJ IMAGE  one request on a real model: events in order, typed getters agree with the JSON, every
 *                           bad request input (invalid UTF-8, bad RGB sizes, enums, history) is an error code
 *   cancel MODEL MMPROJ IMAGE  ecso_cancel from another thread stops a running request with ECSO_ERR_CANCELLED
 *   close-race MODEL MMPROJ IMAGE  ecso_close from another thread just as ecso_run starts: the request is cancelled
 *                           or refused (never runs whole while close waits), and close returns promptly */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ecso.h"

static int failures = 0;
#define CHECK(cond, what)                                                          \
    do {                                                                           \
        if (!(cond)) {                                                             \
            fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, \
                    what, ecso_last_error());                                      \
            failures++;                                                            \
        }                                                                          \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int bad_inputs(const char *not_gguf) {
    ecso_engine *e = (ecso_engine *)0x1;
    ecso_config c;
    CHECK(ecso_abi_version() == ECSO_ABI_VERSION, "the library implements this header's ABI");
    CHECK(ecso_config_init(&c, sizeof c) == ECSO_OK && c.struct_size == sizeof c && c.n_ctx == 4096, "config init");
    CHECK(ecso_config_init(NULL, sizeof c) == ECSO_ERR_INPUT, "config init of null");
    CHECK(ecso_config_init(&c, sizeof c + 64) == ECSO_ERR_INPUT, "a struct newer than the library is refused");
    CHECK(ecso_config_init(&c, 2) == ECSO_ERR_INPUT, "a struct too small to hold its size is refused");
    CHECK(ecso_config_init(&c, sizeof c) == ECSO_OK, "config init again");
    CHECK(strstr(ecso_version(), "abi ") != NULL, "version names the ABI");
    CHECK(ecso_open(NULL, &e) == ECSO_ERR_INPUT && e == NULL, "null config");
    CHECK(ecso_open(&c, NULL) == ECSO_ERR_INPUT, "null out");
    CHECK(ecso_open(&c, &e) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "model"), "null model path");
    c.model = "/nonexistent/model.gguf";
    CHECK(ecso_open(&c, &e) == ECSO_ERR_MODEL && strstr(ecso_last_error(), "not found"), "missing model");
    c.model = not_gguf;
    CHECK(ecso_open(&c, &e) == ECSO_ERR_MODEL && strstr(ecso_last_error(), "not a GGUF"), "non-GGUF model");
    c.chat_format = 99;
    CHECK(ecso_open(&c, &e) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "chat_format"), "unknown chat format");
    c.chat_format = ECSO_CHAT_FORMAT_AUTO;
    c.cpu_repack = -1;
    CHECK(ecso_open(&c, &e) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "cpu_repack"), "unknown cpu repack");
    c.cpu_repack = ECSO_CPU_REPACK_AUTO;
    c.struct_size = 0;
    CHECK(ecso_open(&c, &e) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "struct_size"), "uninitialised config");
    c.struct_size = sizeof c + 8;
    CHECK(ecso_open(&c, &e) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "upgrade"), "config from a newer header");
    CHECK(!strcmp(ecso_judge_name(ECSO_JUDGE_APPEND_LOGIT), "append-logit") && ecso_judge_name(-1) == NULL &&
              ecso_judge_name(ECSO_JUDGE_ALWAYS_UNSAFE + 1) == NULL, "judge names from the generated table");
    CHECK(ecso_judge_from_name("logit") == ECSO_JUDGE_LOGIT && ecso_judge_from_name("oracle") == -1 &&
              ecso_judge_from_name(NULL) == -1, "judge from name");
    CHECK(!strcmp(ecso_decision_rule_name(ECSO_RULE_CONTAINS), "contains") &&
              ecso_decision_rule_from_name("exact") == ECSO_RULE_EXACT, "decision rule names");
    ecso_result *r = (ecso_result *)0x1;
    CHECK(ecso_run(NULL, NULL, "q", NULL, NULL, NULL, &r) == ECSO_ERR_INPUT && r == NULL, "null engine");
    CHECK(ecso_cancel(NULL) == ECSO_ERR_INPUT, "cancel null");
    CHECK(ecso_close(NULL) == ECSO_ERR_INPUT, "close null");
    CHECK(ecso_clear_cache(NULL) == ECSO_ERR_INPUT, "clear null");
    ecso_free(NULL);
    double score = 7;
    CHECK(strcmp(ecso_result_answer(NULL), "") == 0 && ecso_result_unsafe(NULL) == 0 &&
              ecso_result_caption(NULL) == NULL && ecso_result_judge_score(NULL, &score) == 0 && score == 7 &&
              ecso_result_n_steps(NULL) == 0 && ecso_result_step_name(NULL, 0) == NULL &&
              ecso_result_step_reused_positions(NULL, 0) == -1, "null result accessors");
    ecso_result_free(NULL);
    return failures;
}

typedef struct {
    int starts, tokens, ends, evals, images, bad_size;
    char order[256];
} counts;

static void count_events(const ecso_event *ev, void *user) {
    counts *c = (counts *)user;
    if (ev->struct_size < sizeof(ecso_event)) c->bad_size++;
    if (ev->kind == ECSO_EVENT_STEP_START) {
        c->starts++;
        strncat(c->order, ev->step, sizeof c->order - strlen(c->order) - 2);
        strcat(c->order, " ");
    }
    if (ev->kind == ECSO_EVENT_TOKEN) c->tokens++;
    if (ev->kind == ECSO_EVENT_STEP_END) c->ends++;
    if (ev->kind == ECSO_EVENT_EVAL_TEXT || ev->kind == ECSO_EVENT_EVAL_IMAGE) c->evals++;
    if (ev->kind == ECSO_EVENT_EVAL_IMAGE) c->images++;
}

static ecso_engine *open_model(const char *model, const char *mmproj) {
    ecso_config c;
    ecso_config_init(&c, sizeof c);
    c.model = model;
    c.mmproj = mmproj;
    c.n_ctx = 2048;
    ecso_engine *e = NULL;
    if (ecso_open(&c, &e) != ECSO_OK) fprintf(stderr, "open failed: %s\n", ecso_last_error());
    return e;
}

static int run(const char *model, const char *mmproj, const char *image_path) {
    ecso_engine *e = open_model(model, mmproj);
    CHECK(e != NULL, "open the model");
    if (!e) return failures;
    ecso_options o;
    ecso_options_init(&o, sizeof o);
    o.max_tokens = 16;
    o.caption_max_tokens = 16;
    o.judge = ECSO_JUDGE_ALWAYS_UNSAFE; /* all four steps */
    ecso_image img;
    ecso_image_init(&img, sizeof img);
    img.kind = ECSO_IMAGE_PATH;
    img.path = image_path;
    counts c = {0};
    ecso_result *r = NULL;
    CHECK(ecso_run(e, &img, "What is in this picture?", &o, count_events, &c, &r) == ECSO_OK, "run");
    CHECK(r && strstr(ecso_result_json(r), "\"steps\":[") != NULL, "result JSON has the steps");
    CHECK(strcmp(c.order, "answer judge caption regenerate ") == 0 && c.starts == c.ends && c.evals >= 3,
          "events in order");
    CHECK(c.images >= 1 && c.bad_size == 0, "image evaluations reported, events carry their size");
    CHECK(ecso_result_unsafe(r) == 1 && ecso_result_caption(r) != NULL && ecso_result_image_encodes(r) == 1,
          "typed getters: verdict, caption, one image encode");
    CHECK(ecso_result_n_steps(r) == 4 && !strcmp(ecso_result_step_name(r, 3), "regenerate") &&
              ecso_result_step_name(r, 4) == NULL && ecso_result_step_seconds(r, 0) > 0 &&
              ecso_result_step_evaluated_positions(r, 0) > 0 && ecso_result_step_reused_positions(r, 3) > 0 &&
              ecso_result_seconds(r) > 0, "typed per-step getters");
    ecso_result_free(r);

    ecso_turn history[2] = {{ECSO_ROLE_USER, "Hello there."}, {ECSO_ROLE_ASSISTANT, "Hi! How can I help?"}};
    o.history = history;
    o.n_history = 2;
    o.judge = ECSO_JUDGE_LOGIT;
    double score = -1;
    CHECK(ecso_run(e, &img, "And this picture?", &o, NULL, NULL, &r) == ECSO_OK, "a conversation");
    CHECK(ecso_result_judge_score(r, &score) == 1 && score >= 0 && score <= 1, "judge score getter");
    ecso_result_free(r);
    history[1].role = 7;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "role"),
          "a turn with an unknown role");
    history[1].role = ECSO_ROLE_ASSISTANT;
    history[1].content = NULL;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "a turn without content");
    history[1].content = "bad \xff byte";
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "UTF-8"),
          "a turn that is not UTF-8");
    o.history = NULL;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "n_history without history");
    o.n_history = 0;

    CHECK(ecso_run(e, &img, "   ", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "empty query");
    CHECK(ecso_run(e, &img, "caf\xc3", &o, NULL, NULL, &r) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "UTF-8"),
          "truncated UTF-8 query");
    CHECK(ecso_run(e, &img, "\xed\xa0\x80 surrogate", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "surrogate in query");
    CHECK(ecso_run(e, &img, "\xc0\xaf overlong", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "overlong UTF-8 in query");
    img.path = "/nonexistent.png";
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_IMAGE, "missing image");
    img.path = NULL;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "path image without a path");
    unsigned char pixels[12] = {0};
    img.kind = ECSO_IMAGE_RGB;
    img.data = pixels;
    img.size = sizeof pixels;
    img.rgb_width = 2, img.rgb_height = 3;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_IMAGE, "RGB size mismatch");
    img.rgb_width = -2, img.rgb_height = -2;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_IMAGE, "negative RGB size");
    img.rgb_width = 65536, img.rgb_height = 65536, img.size = 0;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_IMAGE, "RGB size overflowing 32 bits");
    img.kind = ECSO_IMAGE_ENCODED;
    img.size = sizeof pixels;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_IMAGE, "bytes that are not an image");
    img.size = 0;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_IMAGE, "empty encoded image");
    img.kind = 42;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "unknown image kind");
    img.kind = ECSO_IMAGE_PATH;
    img.path = image_path;
    img.struct_size = 1000;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "image struct from a newer header");
    img.struct_size = sizeof img;
    o.max_tokens = 1 << 20;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_CONTEXT_OVERFLOW, "context overflow");
    o.max_tokens = 8;
    o.judge = 99;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "unknown judge");
    o.judge = ECSO_JUDGE_PAPER;
    o.decision_rule = -3;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "unknown decision rule");
    o.decision_rule = ECSO_RULE_EXACT;
    o.top_p = 0;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "top_p out of range");
    o.top_p = 1;
    CHECK(ecso_close(e) == ECSO_OK && ecso_close(e) == ECSO_OK, "close twice");
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_CLOSED && r == NULL, "closed engine");
    CHECK(ecso_clear_cache(e) == ECSO_ERR_CLOSED, "clear a closed engine");
    ecso_free(e);
    return failures;
}

typedef struct {
    ecso_engine *engine;
    volatile int tokens;
} cancel_ctx;

static void cancel_after_tokens(const ecso_event *ev, void *user) {
    cancel_ctx *c = (cancel_ctx *)user;
    if (ev->kind == ECSO_EVENT_TOKEN) c->tokens++;
}

static void *canceller(void *arg) {
    cancel_ctx *c = (cancel_ctx *)arg;
    while (c->tokens < 3) usleep(1000);
    ecso_cancel(c->engine);
    return NULL;
}

static int cancel(const char *model, const char *mmproj, const char *image_path) {
    ecso_engine *e = open_model(model, mmproj);
    CHECK(e != NULL, "open the model");
    if (!e) return failures;
    ecso_options o;
    ecso_options_init(&o, sizeof o);
    o.max_tokens = 400;
    ecso_image img;
    ecso_image_init(&img, sizeof img);
    img.path = image_path;
    cancel_ctx c = {e, 0};
    pthread_t t;
    pthread_create(&t, NULL, canceller, &c);
    ecso_result *r = NULL;
    ecso_status rc = ecso_run(e, &img, "Tell a very long story about this picture.", &o, cancel_after_tokens, &c, &r);
    pthread_join(t, NULL);
    CHECK(rc == ECSO_ERR_CANCELLED && r == NULL, "cancelled from another thread");
    CHECK(c.tokens < 400, "stopped early");
    o.max_tokens = 4;
    CHECK(ecso_run(e, &img, "And now?", &o, NULL, NULL, &r) == ECSO_OK, "the engine serves the next request");
    ecso_result_free(r);
    ecso_free(e);
    return failures;
}

typedef struct {
    ecso_engine *engine;
    volatile int go;
    double close_seconds;
} close_ctx;

static void *closer(void *arg) {
    close_ctx *c = (close_ctx *)arg;
    while (!c->go) { /* spin: close as close as possible to the moment ecso_run starts */
    }
    double t0 = now_s();
    ecso_close(c->engine);
    c->close_seconds = now_s() - t0;
    return NULL;
}

static int close_race(const char *model, const char *mmproj, const char *image_path) {
    for (int round = 0; round < 6; ++round) {
        ecso_engine *e = open_model(model, mmproj);
        CHECK(e != NULL, "open the model");
        if (!e) return failures;
        ecso_options o;
        ecso_options_init(&o, sizeof o);
        o.max_tokens = 1500; /* whole, this request takes many seconds: a lost cancel shows as a slow close */
        o.defense = 0;
        ecso_image img;
        ecso_image_init(&img, sizeof img);
        img.path = image_path;
        close_ctx c = {e, 0, 0};
        pthread_t t;
        pthread_create(&t, NULL, closer, &c);
        if (round % 2) usleep(200 * round); /* vary the moment: before, at and just after the lock */
        c.go = 1;
        ecso_result *r = NULL;
        ecso_status rc = ecso_run(e, &img, "Tell a very long story about this picture.", &o, NULL, NULL, &r);
        pthread_join(t, NULL);
        CHECK(rc == ECSO_ERR_CLOSED || rc == ECSO_ERR_CANCELLED, "a request racing a close is refused or cancelled");
        CHECK(r == NULL, "no result from a closed engine");
        CHECK(c.close_seconds < 5.0, "close returns promptly (the cancel was not lost)");
        CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_CLOSED, "closed afterwards");
        ecso_free(e);
    }
    return failures;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "bad-inputs")) return bad_inputs(argv[2]) ? 1 : 0;
    if (argc >= 5 && !strcmp(argv[1], "run")) return run(argv[2], argv[3], argv[4]) ? 1 : 0;
    if (argc >= 5 && !strcmp(argv[1], "cancel")) return cancel(argv[2], argv[3], argv[4]) ? 1 : 0;
    if (argc >= 5 && !strcmp(argv[1], "close-race")) return close_race(argv[2], argv[3], argv[4]) ? 1 : 0;
    fprintf(stderr, "usage: %s bad-inputs FILE | run|cancel|close-race MODEL MMPROJ IMAGE\n", argv[0]);
    return 2;
}
