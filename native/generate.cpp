// Engine: sampling and generation (one decode per accepted token), and the engine's facts as JSON.
#include <memory>

#include "clock.hpp"
#include "engine.hpp"
#include "json.hpp"
#include "llama.h"

namespace ecso {

// ------------------------------------------------------------------------------------------------------ sampling
namespace {

}  // namespace

Sampler::Sampler(const Sampling &s) {
    ptr = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (s.temperature <= 0) {
        llama_sampler_chain_add(ptr, llama_sampler_init_greedy());
    } else {
        if (s.top_p < 1.0f) llama_sampler_chain_add(ptr, llama_sampler_init_top_p(s.top_p, 1));
        llama_sampler_chain_add(ptr, llama_sampler_init_temp(s.temperature));
        llama_sampler_chain_add(ptr, llama_sampler_init_dist(s.seed));
    }
}

Sampler::~Sampler() {
    if (ptr) llama_sampler_free(ptr);
}

namespace {

// Bytes at the end of `s` that start a UTF-8 sequence not yet complete (held back while streaming).
size_t incomplete_tail(const std::string &s) {
    for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
        unsigned char c = s[s.size() - back];
        if ((c & 0xC0) == 0x80) continue;
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > back ? back : 0;
    }
    return 0;
}

}  // namespace

Generation Engine::generate(const Sampling &s, const std::function<void(const std::string &)> &on_text,
                            const std::function<bool(const std::vector<int32_t> &)> &should_stop, int32_t first_token,
                            Sampler *sampler) {
    double t0 = now();
    std::unique_ptr<Sampler> own(sampler ? nullptr : new Sampler(s));
    llama_sampler *chain = (sampler ? sampler : own.get())->ptr;
    Generation g;
    g.finish_reason = "length";
    std::string raw, pending;
    while ((int32_t)g.tokens.size() < s.max_tokens) {
        check_cancel();
        int32_t tok = first_token;
        first_token = -1;
        if (tok < 0) tok = llama_sampler_sample(chain, ctx_, -1);
        if (llama_vocab_is_eog(vocab_, tok) || llama_vocab_is_control(vocab_, tok)) {
            g.finish_reason = "stop";
            break;
        }
        if (kv.n_pos() >= n_ctx_) break;
        std::string piece = token_bytes(tok);
        raw += piece;
        g.tokens.push_back(tok);
        decode_text({tok}, kv.n_pos());
        kv.append(Piece::text({tok}));
        if (on_text) {
            pending += piece;
            size_t hold = incomplete_tail(pending);
            std::string ready = utf8_sanitize(pending.substr(0, pending.size() - hold));
            pending = pending.substr(pending.size() - hold);
            if (!ready.empty()) on_text(ready);
        }
        if (should_stop && should_stop(g.tokens)) {
            g.finish_reason = "aborted";
            break;
        }
    }
    g.text = utf8_sanitize(raw);
    g.seconds = now() - t0;
    return g;
}

int32_t Engine::sample_next(Sampler &sampler) { return llama_sampler_sample(sampler.ptr, ctx_, -1); }

std::string Engine::describe_json() const {
    Json j;
    j.begin_object()
        .kv("model", config.model)
        .kv("model_fingerprint", fingerprint_)
        .key("mmproj");
    if (config.mmproj.empty()) j.null(); else j.value(config.mmproj);
    j.kv("engine", std::string("native"))
        .kv("chat_format", chat_format_.name)
        .kv("n_ctx", n_ctx_)
        .kv("n_embd", n_embd_)
        .kv("gpu_backend", gpu_backend_)
        .kv("n_gpu_layers", n_gpu_layers_)
        .kv("mmproj_gpu", config.mmproj_gpu && gpu_backend_)
        .kv("n_threads", n_threads_)
        .kv("flash_attn", flash_attn_)
        .kv("kv_type", std::string(config.kv_f32 ? "f32" : "f16"))
        .kv("cpu_repack", repack_.setting)
        .kv("cpu_repack_enabled", repack_.enabled)
        .kv("cpu_repack_reason", repack_.reason)
        .kv("kv_prefix_reuse", std::string(kv_rollback_ ? "rollback" : "append-only (recurrent state: recompute)"))
        .end_object();
    return j.str();
}

}  // namespace ecso
