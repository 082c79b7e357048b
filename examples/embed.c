/* Embedding ECSO in a C program: open a model once, run a request, stream the answer as it is generated.
 *   embed MODEL.gguf MMPROJ.gguf IMAGE "question"       (build: cmake --build build; see docs/native.md) */
#include <stdio.h>

#include "ecso.h"

static void on_event(const ecso_event *ev, void *user_data) {
    (void)user_data;
    if (ev->kind == ECSO_EVENT_STEP_START) fprintf(stderr, "[%s]\n", ev->step);
    if (ev->kind == ECSO_EVENT_TOKEN) { fputs(ev->text, stdout); fflush(stdout); }
    if (ev->kind == ECSO_EVENT_RETRACT) fputs("\n[answer retracted]\n", stdout);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf MMPROJ.gguf IMAGE \"question\"\n", argv[0]);
        return 2;
    }
    ecso_config config = ecso_config_default();
    config.model = argv[1];
    config.mmproj = argv[2];
    config.n_ctx = 2048;
    ecso_engine *engine = NULL;
    if (ecso_open(&config, &engine) != ECSO_OK) {
        fprintf(stderr, "error: %s\n", ecso_last_error());
        return 1;
    }
    ecso_options options = ecso_options_default();
    options.max_tokens = 64;
    ecso_image image = {0};
    image.path = argv[3];
    ecso_result *result = NULL;
    ecso_status rc = ecso_run(engine, &image, argv[4], &options, on_event, NULL, &result);
    if (rc == ECSO_OK) {
        printf("\n\nunsafe: %d\nanswer: %s\n", ecso_result_unsafe(result), ecso_result_answer(result));
        ecso_result_free(result);
    } else {
        fprintf(stderr, "error %d: %s\n", (int)rc, ecso_last_error());
    }
    ecso_free(engine);
    return rc == ECSO_OK ? 0 : 1;
}
