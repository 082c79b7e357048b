// Engine: one llama.cpp model (+ mtmd projector), loaded once; the port of runtime/engine.py.
//
// It owns the native handles and a PrefixCache describing what sequence 0 holds, so each prompt evaluates only what
// differs from the previous one, and an image is encoded once and then served from the embedding cache. Decoding is
// batched exactly as the Python engine batches it, so both evaluate the same token ids with the same numbers.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "kv.hpp"
#include "prompts.hpp"

struct llama_model;
struct llama_context;
struct llama_vocab;
struct mtmd_context;
struct mtmd_input_chunk;
struct llama_sampler;
struct llama_batch;

namespace ecso {

struct EngineConfig {
    std::string model, mmproj;
    int32_t n_ctx = 4096, n_batch = 512, n_threads = 0, n_gpu_layers = -1;
    bool mmproj_gpu = true;
    int32_t flash_attn = -1;  // -1 auto
    bool kv_f32 = false;
    ChatFormat::Kind chat_format = ChatFormat::Kind::automatic;
    std::string cpu_repack = "auto";
    int32_t image_cache_entries = 16, max_query_chars = 100000;
    bool verbose = false;
};

struct Sampling {
    float temperature = 0.0f, top_p = 1.0f;
    uint32_t seed = 0;
    int32_t max_tokens = 512;
};

// A decoded image: RGB pixels and a key for the embedding cache.
struct Image {
    std::vector<uint8_t> rgb;
    uint32_t width = 0, height = 0;
    std::string key;
};

// What mtmd makes of one image, in order: the family's marker tokens (Qwen2-VL <|vision_start|>, Gemma 3
// <start_of_image>, SmolVLM's tile tags) as text, and one image chunk per tile. Kept whole as one KV piece; every
// chunk is encoded once and decoded from its cached embeddings (rows of llama_model_n_embd_inp floats).
struct ImagePart {
    std::vector<int32_t> tokens;        // text part
    mtmd_input_chunk *chunk = nullptr;  // image part (owned copy)
    int32_t n_tokens = 0, n_pos = 0;    // image part: KV cells and positions (mtmd_input_chunk_get_n_pos)
};

struct ImageEntry {
    std::vector<ImagePart> parts;
    int32_t n_tokens = 0, n_pos = 0;       // the whole block: KV cells and positions
    std::vector<std::vector<float>> embd;  // one per image chunk; empty until encoded
    ImageEntry() = default;
    ImageEntry(const ImageEntry &) = delete;
    ImageEntry &operator=(const ImageEntry &) = delete;
    ~ImageEntry();
};

struct Prompt {
    std::vector<Piece> pieces;
    std::map<std::string, std::shared_ptr<ImageEntry>> images;
    int32_t n_pos() const { return n_positions(pieces); }
};

struct PrefillStats {
    int32_t n_prompt = 0, n_reused = 0, n_evaluated = 0, image_encodes = 0;
    double seconds = 0, encode_seconds = 0;
};

struct Generation {
    std::vector<int32_t> tokens;
    std::string text;           // decoded (invalid UTF-8 replaced), not stripped
    std::string finish_reason;  // stop | length | aborted
    double seconds = 0;
};

// Called for every evaluation: ("text", tokens, pos0, 0) or ("image", {}, pos0, n_pos). Must not call the engine.
using Observer = std::function<void(bool image, const std::vector<int32_t> &tokens, int32_t pos, int32_t n_pos)>;

// One llama.cpp sampler chain (greedy, or top-p + temperature + seeded dist), owned.
class Sampler {
public:
    explicit Sampler(const Sampling &s);
    ~Sampler();
    Sampler(const Sampler &) = delete;
    Sampler &operator=(const Sampler &) = delete;
    ::llama_sampler *ptr = nullptr;
};

struct CpuRepackChoice {
    std::string setting, reason;
    bool enabled = true;
};
CpuRepackChoice choose_cpu_repack(const std::string &setting);  // from llama_print_system_info (AMX_INT8)

class Engine {
public:
    explicit Engine(const EngineConfig &config);
    ~Engine();
    Engine(const Engine &) = delete;
    Engine &operator=(const Engine &) = delete;

    const EngineConfig config;
    Observer observer;
    std::atomic<bool> *cancel_flag = nullptr;  // checked between decode batches and tokens
    PrefixCache kv;

    bool has_vision() const { return mctx_ != nullptr; }
    int32_t n_ctx() const { return n_ctx_; }
    bool kv_rollback() const { return kv_rollback_; }  // false: recurrent / hybrid LLM, a cached prefix cannot be cut
    const ChatFormat &chat_format() const { return chat_format_; }

    // One tokenizer call, as the Python engine makes it (SentencePiece: HF's non-legacy space prefix).
    std::vector<int32_t> tokenize(const std::string &text, bool add_special, bool parse_special = true) const;
    std::string detokenize(const std::vector<int32_t> &tokens) const;  // sanitized UTF-8
    std::string token_bytes(int32_t token) const;
    std::string clean_user_text(const std::string &text) const { return neutralize_specials(text, specials_); }
    std::vector<int32_t> single_token_ids(const std::vector<std::string> &words);

    Image load_image_file(const std::string &path) const;
    Image load_image_bytes(const uint8_t *data, size_t size, const std::string &what) const;
    Image load_image_rgb(const uint8_t *rgb, int32_t width, int32_t height) const;
    bool image_cached(const Image &image) const;  // already encoded

    Prompt build_prompt(const std::vector<Message> &messages, const Image *image);
    void check_budget(const Prompt &prompt, int32_t max_tokens, const std::string &what) const;
    PrefillStats prefill(const Prompt &prompt, bool reuse);
    // `sampler` continues a step's sampler state (one per step: at T > 0 its random sequence runs on across pauses);
    // null: a new one from `s` for this call.
    Generation generate(const Sampling &s, const std::function<void(const std::string &)> &on_text = {},
                        const std::function<bool(const std::vector<int32_t> &)> &should_stop = {},
                        int32_t first_token = -1, Sampler *sampler = nullptr);
    int32_t sample_next(Sampler &sampler);
    void append_tokens(const std::vector<int32_t> &tokens);
    void rollback(int32_t n_pos);
    void reset();
    void clear_caches() { reset(), image_cache_.clear(); }
    std::vector<float> logits() const;
    std::string describe_json() const;

private:
    void load();
    void release();
    std::vector<int32_t> llama_tokenize_raw(const std::string &text, bool add_special, bool parse_special) const;
    size_t head_cut(const std::string &head);
    std::string token_bytes_text(int32_t token) const;  // the vocab's text of a token (for control tokens)
    void decode_text(const std::vector<int32_t> &tokens, int32_t pos0);
    void decode_image(const ImageEntry &entry, const std::vector<std::vector<float>> &embd, int32_t pos);
    std::vector<std::vector<float>> encode(const ImageEntry &entry);
    void fail_decode(int rc);
    void check_cancel() const;
    std::shared_ptr<ImageEntry> image_entry(const Image &image);

    llama_model *model_ = nullptr;
    llama_context *ctx_ = nullptr;
    struct llama_batch *batch_ = nullptr;  // one decode batch, reused by every call
    mtmd_context *mctx_ = nullptr;
    // the mmproj's [IMG_BREAK] embedding (Pixtral / Mistral 3; else empty), read when an encoder output is non-finite
    std::vector<float> break_row_;
    bool break_row_read_ = false;
    const llama_vocab *vocab_ = nullptr;
    int32_t n_ctx_ = 0, n_batch_ = 0, n_vocab_ = 0, n_embd_ = 0, n_embd_inp_ = 0, n_threads_ = 0, n_gpu_layers_ = 0;
    bool gpu_backend_ = false, flash_attn_ = false, kv_rollback_ = true;
    CpuRepackChoice repack_;
    ChatFormat chat_format_;
    std::vector<std::string> specials_;
    std::set<int32_t> special_ids_;
    bool space_prefix_ = false;
    int32_t space_token_ = -1;
    std::map<std::string, size_t> head_cuts_;
    std::string fingerprint_;
    std::map<std::string, std::vector<int32_t>> single_ids_;
    // LRU of encoded images: most recent at the front
    std::list<std::pair<std::string, std::shared_ptr<ImageEntry>>> image_cache_;
};

}  // namespace ecso
