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
    /* the library this program loaded must implement the ABI it was compiled against */
    if (ecso_abi_version() != ECSO_ABI_VERSION) {
        fprintf(stderr, "error: libecso implements ABI %d, this program was built for ABI %d\n", (int)ecso_abi_version(),
                ECSO_ABI_VERSION);
        return 1;
    }
    ecso_config config;
    ecso_config_init(&config, sizeof config); /* defaults + the struct size this program was compiled with */
    config.model = argv[1];
    config.mmproj = argv[2];
    config.n_ctx = 2048;
    ecso_engine *engine = NULL;
    if (ecso_open(&config, &engine) != ECSO_OK) {
        fprintf(stderr, "error: %s\n", ecso_last_error());
        return 1;
    }
    ecso_options options;
    ecso_options_init(&options, sizeof options);
    options.max_tokens = 64;
    options.judge = ECSO_JUDGE_PAPER;
    ecso_image image;
    ecso_image_init(&image, sizeof image);
    image.kind = ECSO_IMAGE_PATH;
    image.path = argv[3];
    ecso_result *result = NULL;
    ecso_status rc = ecso_run(engine, &image, argv[4], &options, on_event, NULL, &result);
    if (rc == ECSO_OK) {
        printf("\n\nunsafe: %d\nanswer: %s\n", ecso_result_unsafe(result), ecso_result_answer(result));
        for (int32_t i = 0; i < ecso_result_n_steps(result); ++i)
            printf("step %s: %.3f s, %d positions reused, %d evaluated\n", ecso_result_step_name(result, i),
                   ecso_result_step_seconds(result, i), (int)ecso_result_step_reused_positions(result, i),
                   (int)ecso_result_step_evaluated_positions(result, i));
        ecso_result_free(result);
    } else {
        fprintf(stderr, "error %d: %s\n", (int)rc, ecso_last_error());
    }
    ecso_free(engine);
    return rc == ECSO_OK ? 0 : 1;
}
