/* Native tests of the C ABI, run by ctest. Modes:
 *   bad-inputs NOT_A_GGUF   null pointers, missing / non-GGUF files, closed handles: error codes, never an abort
 *   run MODEL MMPROJ IMAGE  one request on a real model: events arrive in order, the result JSON is complete
 *   cancel MODEL MMPROJ IMAGE  ecso_cancel from another thread stops a running request with ECSO_ERR_CANCELLED */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static int bad_inputs(const char *not_gguf) {
    ecso_engine *e = (ecso_engine *)0x1;
    ecso_config c = ecso_config_default();
    CHECK(strstr(ecso_version(), "abi 1") != NULL, "version names the ABI");
    CHECK(ecso_open(NULL, &e) == ECSO_ERR_INPUT && e == NULL, "null config");
    CHECK(ecso_open(&c, NULL) == ECSO_ERR_INPUT, "null out");
    CHECK(ecso_open(&c, &e) == ECSO_ERR_INPUT && strstr(ecso_last_error(), "model"), "null model path");
    c.model = "/nonexistent/model.gguf";
    CHECK(ecso_open(&c, &e) == ECSO_ERR_MODEL && strstr(ecso_last_error(), "not found"), "missing model");
    c.model = not_gguf;
    CHECK(ecso_open(&c, &e) == ECSO_ERR_MODEL && strstr(ecso_last_error(), "not a GGUF"), "non-GGUF model");
    c.chat_format = "jinja2";
    CHECK(ecso_open(&c, &e) == ECSO_ERR_INPUT, "unknown chat format");
    ecso_result *r = (ecso_result *)0x1;
    CHECK(ecso_run(NULL, NULL, "q", NULL, NULL, NULL, &r) == ECSO_ERR_INPUT && r == NULL, "null engine");
    CHECK(ecso_cancel(NULL) == ECSO_ERR_INPUT, "cancel null");
    CHECK(ecso_close(NULL) == ECSO_ERR_INPUT, "close null");
    ecso_free(NULL);
    CHECK(strcmp(ecso_result_answer(NULL), "") == 0 && ecso_result_unsafe(NULL) == 0, "null result accessors");
    ecso_result_free(NULL);
    return failures;
}

typedef struct {
    int starts, tokens, ends, evals;
    char order[256];
} counts;

static void count_events(const ecso_event *ev, void *user) {
    counts *c = (counts *)user;
    if (ev->kind == ECSO_EVENT_STEP_START) {
        c->starts++;
        strncat(c->order, ev->step, sizeof c->order - strlen(c->order) - 2);
        strcat(c->order, " ");
    }
    if (ev->kind == ECSO_EVENT_TOKEN) c->tokens++;
    if (ev->kind == ECSO_EVENT_STEP_END) c->ends++;
    if (ev->kind == ECSO_EVENT_EVAL_TEXT || ev->kind == ECSO_EVENT_EVAL_IMAGE) c->evals++;
}

static ecso_engine *open_model(const char *model, const char *mmproj) {
    ecso_config c = ecso_config_default();
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
    ecso_options o = ecso_options_default();
    o.max_tokens = 16;
    ecso_image img = {0};
    img.path = image_path;
    counts c = {0};
    ecso_result *r = NULL;
    CHECK(ecso_run(e, &img, "What is in this picture?", &o, count_events, &c, &r) == ECSO_OK, "run");
    CHECK(r && strstr(ecso_result_json(r), "\"steps\":[") != NULL, "result JSON has the steps");
    CHECK(strncmp(c.order, "answer judge", 12) == 0 && c.starts == c.ends && c.evals >= 3, "events in order");
    ecso_result_free(r);
    CHECK(ecso_run(e, &img, "   ", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "empty query");
    img.path = "/nonexistent.png";
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_IMAGE, "missing image");
    o.max_tokens = 1 << 20;
    img.path = image_path;
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_CONTEXT_OVERFLOW, "context overflow");
    o.max_tokens = 8;
    o.judge = "oracle";
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_INPUT, "unknown judge");
    CHECK(ecso_close(e) == ECSO_OK && ecso_close(e) == ECSO_OK, "close twice");
    o.judge = "paper";
    CHECK(ecso_run(e, &img, "q", &o, NULL, NULL, &r) == ECSO_ERR_CLOSED && r == NULL, "closed engine");
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
    ecso_options o = ecso_options_default();
    o.max_tokens = 400;
    ecso_image img = {0};
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

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "bad-inputs")) return bad_inputs(argv[2]) ? 1 : 0;
    if (argc >= 5 && !strcmp(argv[1], "run")) return run(argv[2], argv[3], argv[4]) ? 1 : 0;
    if (argc >= 5 && !strcmp(argv[1], "cancel")) return cancel(argv[2], argv[3], argv[4]) ? 1 : 0;
    fprintf(stderr, "usage: %s bad-inputs FILE | run|cancel MODEL MMPROJ IMAGE\n", argv[0]);
    return 2;
}
