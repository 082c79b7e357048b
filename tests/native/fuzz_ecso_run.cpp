// libFuzzer target over ecso_run's inputs: encoded image bytes, raw RGB sizes, queries (any bytes, invalid UTF-8
// included), history turns and every option value (enums out of range, negative token counts, NaN floats).
//
// Built by .ci/native-checks with clang, -fsanitize=fuzzer,address,undefined. mtmd's image-decoding helper
// (tools/mtmd/mtmd-helper.cpp, which holds stb_image) is compiled into this executable from the pinned llama.cpp
// source: its mtmd_helper_* definitions take precedence over the installed libmtmd's, so encoded bytes go through an
// instrumented stb_image, where AddressSanitizer sees every out-of-bounds read and libFuzzer gets coverage.
//
// Environment: ECSO_FUZZ_MODEL, ECSO_FUZZ_MMPROJ (a small model pair: the tiny LLaVA keeps each run to milliseconds),
// ECSO_FUZZ_IMAGE (an image file for the path kind).
// Input layout (.ci/native-checks writes seeds in it): a 32-byte header of option values (see Reader below), the
// query (a length byte, then bytes), history turns (role byte, length byte, bytes), then the image bytes (encoded
// file or raw RGB). Short inputs read as zeros.
// The invariants it checks (abort on violation): the status is a known ecso_status; a result exists exactly on
// success; every string a result or event hands out is readable up to its NUL; event kinds are known ones.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ecso.h"

namespace {

ecso_engine *g_engine = nullptr;
std::string g_image;

void require(bool ok, const char *what) {
    if (!ok) {
        std::fprintf(stderr, "fuzz invariant violated: %s (last error: %s)\n", what, ecso_last_error());
        std::abort();
    }
}

volatile size_t g_sink = 0;  // keeps the reads below from being optimised away

void touch(const char *s) {
    if (s) g_sink += std::strlen(s);
}

void on_event(const ecso_event *ev, void *) {
    require(ev && ev->struct_size >= sizeof(ecso_event), "event size");
    require(ev->kind >= ECSO_EVENT_STEP_START && ev->kind <= ECSO_EVENT_EVAL_IMAGE, "known event kind");
    touch(ev->step), touch(ev->text);
    for (int32_t i = 0; ev->tokens && i < ev->n_tokens; ++i) g_sink += (size_t)ev->tokens[i];
}

struct Reader {
    const uint8_t *p;
    size_t n, at = 0;
    uint8_t byte() { return at < n ? p[at++] : 0; }
    int32_t choice(int32_t lo, int32_t hi) { return lo + (int32_t)(byte() % (uint8_t)(hi - lo + 1)); }
    uint32_t u32() {
        uint32_t v = 0;
        for (int i = 0; i < 4; ++i) v |= (uint32_t)byte() << (8 * i);
        return v;
    }
    float f32() {  // raw bits: NaN, infinities and denormals included
        uint32_t v = u32();
        float f;
        std::memcpy(&f, &v, sizeof f);
        return f;
    }
    std::string text() {
        size_t len = byte();
        std::string s;
        while (len-- && at < n) s += (char)p[at++];
        return s;
    }
};
}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    const char *model = std::getenv("ECSO_FUZZ_MODEL"), *mmproj = std::getenv("ECSO_FUZZ_MMPROJ");
    const char *image = std::getenv("ECSO_FUZZ_IMAGE");
    if (!model || !mmproj || !image) {
        std::fprintf(stderr, "set ECSO_FUZZ_MODEL, ECSO_FUZZ_MMPROJ and ECSO_FUZZ_IMAGE\n");
        std::exit(2);
    }
    g_image = image;
    ecso_config c;
    ecso_config_init(&c, sizeof c);
    c.model = model, c.mmproj = mmproj, c.n_ctx = 1024, c.n_threads = 1, c.image_cache_entries = 4;
    if (ecso_open(&c, &g_engine) != ECSO_OK) {
        std::fprintf(stderr, "ecso_open failed: %s\n", ecso_last_error());
        std::exit(2);
    }
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Reader in{data, size};
    ecso_options o;
    ecso_options_init(&o, sizeof o);
    o.judge = in.choice(-1, ECSO_JUDGE_ALWAYS_UNSAFE + 1);             // header byte 0
    o.decision_rule = in.choice(-1, ECSO_RULE_CONTAINS + 1);           // 1
    o.max_tokens = in.choice(-1, 3);                                   // 2
    o.judge_max_tokens = in.choice(-1, 3);                             // 3
    o.caption_max_tokens = in.choice(-1, 3);                           // 4
    uint8_t flags = in.byte();                                         // 5
    o.judge_early_stop = flags & 1, o.reuse = (flags >> 1) & 1, o.defense = (flags >> 2) & 1;
    o.guard_every = in.choice(-1, 3);                                  // 6
    int kind = in.choice(-1, 3);                                       // 7: -1 no image, 3 not an ecso_image_kind
    int n_turns = in.choice(0, 3);                                     // 8
    o.seed = in.u32();                                                 // 9..12
    int32_t rgb_w = in.choice(-2, 61), rgb_h = in.choice(-2, 61);      // 13, 14
    bool real_path = in.byte() & 1;                                    // 15
    o.logit_threshold = in.f32(), o.temperature = in.f32();            // 16..23
    o.top_p = in.f32(), o.guard_threshold = in.f32();                  // 24..31
    std::string query = in.text();
    std::vector<std::string> contents(n_turns);
    std::vector<ecso_turn> turns(n_turns);
    for (int i = 0; i < n_turns; ++i) {
        turns[i].role = in.choice(-1, 3);
        contents[i] = in.text();
        turns[i].content = contents[i].c_str();
    }
    o.history = turns.empty() ? nullptr : turns.data();
    o.n_history = (int32_t)turns.size();
    std::vector<uint8_t> bytes(data + std::min(in.at, size), data + size);

    ecso_image img;
    ecso_image_init(&img, sizeof img);
    img.kind = kind;
    if (kind == ECSO_IMAGE_PATH) img.path = real_path ? g_image.c_str() : "/nonexistent/image.png";
    img.data = bytes.empty() ? nullptr : bytes.data();
    img.size = bytes.size();
    if (kind == ECSO_IMAGE_RGB) {
        img.rgb_width = rgb_w, img.rgb_height = rgb_h;
        // the app never lies about its own buffer: size is at most the bytes it holds
        size_t want = rgb_w > 0 && rgb_h > 0 ? (size_t)rgb_w * rgb_h * 3 : 0;
        if (want && want <= bytes.size()) img.size = want;
    }

    ecso_result *r = nullptr;
    ecso_status rc = ecso_run(g_engine, kind < 0 ? nullptr : &img, query.c_str(), &o, on_event, nullptr, &r);
    require(rc >= ECSO_OK && rc <= ECSO_ERR_CANCELLED, "a known status");
    require((rc == ECSO_OK) == (r != nullptr), "a result exactly on success");
    touch(ecso_last_error());
    if (r) {
        touch(ecso_result_answer(r)), touch(ecso_result_initial_answer(r)), touch(ecso_result_judge_reply(r));
        touch(ecso_result_caption(r)), touch(ecso_result_json(r));
        double score = 0;
        if (ecso_result_judge_score(r, &score)) require(score >= 0 && score <= 1, "a probability");
        for (int32_t i = 0; i < ecso_result_n_steps(r); ++i) touch(ecso_result_step_name(r, i));
        require(ecso_result_step_name(r, ecso_result_n_steps(r)) == nullptr, "no step past the end");
        ecso_result_free(r);
    }
    return 0;
}
