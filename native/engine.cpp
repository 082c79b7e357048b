// Engine: loading, tokenization, prompts, KV reuse, image encoding, decoding, sampling (see engine.hpp).
#include "engine.hpp"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <sys/stat.h>
#include <thread>

#include "clock.hpp"
#include "errors.hpp"
#include "gguf.h"
#include "image_header.hpp"
#include "llama.h"
#include "mtmd-helper.h"
#include "mtmd.h"

namespace ecso {
namespace {

void quiet_log(ggml_log_level, const char *, void *) {}
void stderr_log(ggml_log_level, const char *text, void *) { std::fputs(text, stderr); }

void init_backend(bool verbose) {
    static std::once_flag once;
    std::call_once(once, [] { llama_backend_init(); });
    // process-wide in llama.cpp: the last engine opened decides
    ggml_log_callback cb = verbose ? stderr_log : quiet_log;
    llama_log_set(cb, nullptr);
    mtmd_log_set(cb, nullptr);
    mtmd_helper_log_set(cb, nullptr);
}

// the same limits as the Python engine's ImageLimits: 1..16384 px per side, at most 40 MP
void check_image_size(int64_t width, int64_t height, const std::string &what) {
    if (width <= 0 || height <= 0 || width > 16384 || height > 16384 || width * height > 40000000)
        throw image_error("image " + (what.empty() ? std::string() : what + " ") + "is " + std::to_string(width) +
                          "x" + std::to_string(height) + ", outside 1..16384 px per side or over 40 MP; " +
                          "downscale it first");
}

bool is_file(const std::string &path) {
    struct stat st{};
    return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

struct GgufFacts {
    std::string architecture = "?", tokenizer_model;
    long projection_dim = -1;
    bool add_space_prefix = true;  // llama.cpp's default when the key is missing
};

// Reads the GGUF header: a clear error for a missing / non-GGUF / truncated file before llama.cpp sees it.
GgufFacts gguf_facts(const std::string &path, const std::string &role) {
    if (path.empty()) throw model_error(role + " path is empty");
    if (!is_file(path)) throw model_error(role + " file not found: " + path);
    {
        std::ifstream f(path, std::ios::binary);
        char magic[4] = {0};
        f.read(magic, 4);
        if (f.gcount() != 4 || std::memcmp(magic, "GGUF", 4) != 0)
            throw model_error(path + " is not a GGUF file (wrong magic bytes); expected a llama.cpp .gguf " + role);
    }
    gguf_init_params p{true, nullptr};
    gguf_context *g = gguf_init_from_file(path.c_str(), p);
    if (!g) throw model_error(path + " is truncated or corrupt (llama.cpp cannot read its GGUF header); re-download "
                              "or re-export it");
    GgufFacts f;
    auto str = [&](const char *key, std::string &out) {
        int64_t k = gguf_find_key(g, key);
        if (k >= 0 && gguf_get_kv_type(g, k) == GGUF_TYPE_STRING) out = gguf_get_val_str(g, k);
    };
    str("general.architecture", f.architecture);
    str("tokenizer.ggml.model", f.tokenizer_model);
    int64_t d = gguf_find_key(g, "clip.vision.projection_dim");
    if (d >= 0 && gguf_get_kv_type(g, d) == GGUF_TYPE_UINT32) f.projection_dim = (long)gguf_get_val_u32(g, d);
    int64_t sp = gguf_find_key(g, "tokenizer.ggml.add_space_prefix");
    if (sp >= 0 && gguf_get_kv_type(g, sp) == GGUF_TYPE_BOOL) f.add_space_prefix = gguf_get_val_bool(g, sp);
    gguf_free(g);
    return f;
}

// The f32 / f16 tensor `name` of a GGUF file as f32 values; empty when the file has none (or stores it otherwise).
std::vector<float> gguf_tensor_f32(const std::string &path, const char *name) {
    gguf_init_params p{true, nullptr};
    gguf_context *g = gguf_init_from_file(path.c_str(), p);
    if (!g) return {};
    std::vector<float> out;
    int64_t t = gguf_find_tensor(g, name);
    ggml_type type = t >= 0 ? gguf_get_tensor_type(g, t) : GGML_TYPE_COUNT;
    if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16) {
        size_t bytes = gguf_get_tensor_size(g, t);
        size_t n = bytes / (type == GGML_TYPE_F32 ? sizeof(float) : sizeof(ggml_fp16_t));
        std::vector<char> raw(bytes);
        std::ifstream f(path, std::ios::binary);
        f.seekg((std::streamoff)(gguf_get_data_offset(g) + gguf_get_tensor_offset(g, t)));
        f.read(raw.data(), (std::streamsize)bytes);
        if ((size_t)f.gcount() == bytes) {
            out.resize(n);
            for (size_t i = 0; i < n; ++i)
                out[i] = type == GGML_TYPE_F32 ? reinterpret_cast<const float *>(raw.data())[i]
                                               : ggml_fp16_to_fp32(reinterpret_cast<const ggml_fp16_t *>(raw.data())[i]);
        }
    }
    gguf_free(g);
    return out;
}

bool all_finite(const float *p, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(p[i])) return false;
    return true;
}

// Restores Pixtral's [IMG_BREAK] rows where llama.cpp left them NaN. The pinned llama.cpp makes each break row as
// `0 * t + img_break` with `t` a never-written tensor, so NaN / inf bits left in that memory by an earlier graph
// survive the "clearing". A correct break row is exactly img_break; the n tokens are p_y rows of (p_x + 1) minus one
// break, so the rows that are img_break or non-finite must be the (k * (p_x + 1) - 1)-th. Only then are the
// non-finite ones replaced; anything else is left for the caller to refuse.
void repair_break_rows(float *rows, size_t n_rows, const std::vector<float> &brk) {
    const size_t w = brk.size();
    std::vector<size_t> idx;
    std::vector<bool> bad(n_rows);
    for (size_t r = 0; r < n_rows; ++r) {
        const float *row = rows + r * w;
        bad[r] = !all_finite(row, w);
        if (bad[r] || std::memcmp(row, brk.data(), w * sizeof(float)) == 0) idx.push_back(r);
    }
    if (idx.empty()) return;
    const size_t period = idx[0] + 1;
    if (period < 2 || (n_rows + 1) % period != 0 || idx.size() != (n_rows + 1) / period - 1) return;
    for (size_t k = 0; k < idx.size(); ++k)
        if (idx[k] != (k + 1) * period - 1) return;
    for (size_t r : idx)
        if (bad[r]) std::memcpy(rows + r * w, brk.data(), w * sizeof(float));
}

std::string fnv_hex(const void *data, size_t n, uint64_t h = 1469598103934665603ULL) {
    const auto *p = static_cast<const uint8_t *>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)h);
    return buf;
}

// Cheap identity of a model file: size and a hash of its first and last MiB.
std::string file_fingerprint(const std::string &path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    size_t size = (size_t)f.tellg();
    std::string buf(std::min<size_t>(size, 1 << 20), '\0');
    f.seekg(0);
    f.read(&buf[0], buf.size());
    if (size > (2u << 20)) {
        std::string tail(1 << 20, '\0');
        f.seekg(-(1 << 20), std::ios::end);
        f.read(&tail[0], tail.size());
        buf += tail;
    }
    return fnv_hex(buf.data(), buf.size(), std::hash<size_t>{}(size));
}

}  // namespace

ImageEntry::~ImageEntry() {
    for (auto &part : parts)
        if (part.chunk) mtmd_input_chunk_free(part.chunk);
}

CpuRepackChoice choose_cpu_repack(const std::string &setting) {
    if (setting != "auto" && setting != "on" && setting != "off")
        throw input_error("unknown cpu_repack setting '" + setting + "'; use one of auto, on, off");
    if (setting == "on") return {setting, "forced on", true};
    if (setting == "off") return {setting, "forced off", false};
    std::string info = llama_print_system_info();
    bool amx = false;
    for (size_t at = info.find("AMX_INT8"); at != std::string::npos; at = info.find("AMX_INT8", at + 1)) {
        size_t eq = info.find('=', at);
        if (eq != std::string::npos) {
            size_t v = info.find_first_not_of(' ', eq + 1);
            amx = amx || (v != std::string::npos && info[v] != '0' && info[v] != '|');
        }
    }
    if (amx)
        return {setting, "this llama.cpp build uses AMX, whose repacked weights crash llama.cpp (ggml-org/llama.cpp#20824)",
                false};
    return {setting, "no AMX in this llama.cpp build", true};
}

Engine::Engine(const EngineConfig &cfg) : config(cfg) {
    init_backend(cfg.verbose);
    GgufFacts facts = gguf_facts(cfg.model, "model");
    if (facts.architecture == "clip")
        throw model_error(cfg.model + " is an mmproj (vision projector), not a language model; pass it as mmproj and "
                          "give the LLM as model");
    long proj_dim = -1;
    if (!cfg.mmproj.empty()) {
        GgufFacts m = gguf_facts(cfg.mmproj, "mmproj");
        if (m.architecture != "clip") throw model_error(cfg.mmproj + " is not an mmproj file (expected architecture 'clip')");
        proj_dim = m.projection_dim;
    }
    // SentencePiece: llama.cpp would add a space after every control token; HF (non-legacy, LLaVA's tokenizer) adds
    // one only at the start. Load with llama.cpp's prefix off and add it in `tokenize` (as the Python engine does).
    space_prefix_ = facts.tokenizer_model == "llama" && facts.add_space_prefix;
    if (cfg.n_ctx < 64 || cfg.n_batch < 1) throw input_error("n_ctx must be at least 64 and n_batch at least 1");
    repack_ = choose_cpu_repack(cfg.cpu_repack);
    gpu_backend_ = llama_supports_gpu_offload();
    n_gpu_layers_ = cfg.n_gpu_layers < 0 ? (gpu_backend_ ? 999 : 0) : cfg.n_gpu_layers;
    n_threads_ = cfg.n_threads > 0 ? cfg.n_threads : std::max(1u, std::thread::hardware_concurrency());
    try {
        load();
        if (proj_dim >= 0 && proj_dim != n_embd_)
            throw model_error("mmproj " + cfg.mmproj + " projects to " + std::to_string(proj_dim) +
                              " dims but the model's hidden size is " + std::to_string(n_embd_) +
                              ": this projector belongs to another model");
    } catch (...) {
        release();  // the destructor does not run when a constructor throws
        throw;
    }
    fingerprint_ = file_fingerprint(cfg.model) + (cfg.mmproj.empty() ? "" : ":" + file_fingerprint(cfg.mmproj));
}

void Engine::load() {
    const auto &cfg = config;
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = n_gpu_layers_;
    mp.use_extra_bufts = repack_.enabled;
    llama_model_kv_override overrides[2]{};  // zero-terminated
    if (space_prefix_) {
        std::strncpy(overrides[0].key, "tokenizer.ggml.add_space_prefix", sizeof overrides[0].key - 1);
        overrides[0].tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
        overrides[0].val_bool = false;
        mp.kv_overrides = overrides;
    }
    model_ = llama_model_load_from_file(cfg.model.c_str(), mp);
    if (!model_)
        throw model_error("llama.cpp could not load " + cfg.model + " (corrupt, truncated or unsupported "
                          "architecture); set verbose to see llama.cpp's reason");
    vocab_ = llama_model_get_vocab(model_);
    n_vocab_ = llama_vocab_n_tokens(vocab_);
    n_embd_ = llama_model_n_embd(model_);
    n_embd_inp_ = llama_model_n_embd_inp(model_);  // image embedding rows (Qwen3-VL: n_embd x (1 + deepstack))
    // Recurrent and hybrid LLMs (LFM2's short convolutions, Mamba, ...) keep only their latest state: a cached prefix
    // cannot be cut back, so a prompt that differs after a shared prefix is recomputed from the start (image
    // embeddings still come from the cache); one that only extends what is cached still reuses it.
    kv_rollback_ = !(llama_model_is_recurrent(model_) || llama_model_is_hybrid(model_));
    // the chat format before the context: an unknown template fails without allocating the KV cache
    const char *tmpl = llama_model_chat_template(model_, nullptr);
    chat_format_ = ChatFormat::choose(cfg.chat_format, tmpl ? tmpl : "", token_bytes_text(llama_vocab_bos(vocab_)),
                                      token_bytes_text(llama_vocab_eos(vocab_)), llama_vocab_get_add_bos(vocab_));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cfg.n_ctx;
    cp.n_batch = cp.n_ubatch = std::min(cfg.n_batch, cfg.n_ctx);
    cp.n_seq_max = 2;
    cp.kv_unified = true;  // seq_rm on partial ranges needs a unified cache
    cp.n_threads = cp.n_threads_batch = n_threads_;
    if (cfg.kv_f32) cp.type_k = cp.type_v = GGML_TYPE_F32;
    // only when asked for, on every backend: with it, reuse is not bit-identical to recomputation (as in Python)
    flash_attn_ = cfg.flash_attn > 0;
    cp.flash_attn_type = flash_attn_ ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    ctx_ = llama_init_from_model(model_, cp);
    if (!ctx_)
        throw model_error("could not create a llama.cpp context of " + std::to_string(cfg.n_ctx) +
                          " tokens (out of memory?); try a smaller n_ctx");
    n_ctx_ = (int32_t)llama_n_ctx(ctx_);
    n_batch_ = (int32_t)cp.n_batch;
    batch_ = new llama_batch(llama_batch_init(n_batch_, 0, 1));
    if (!cfg.mmproj.empty()) {
        mtmd_context_params p = mtmd_context_params_default();
        p.use_gpu = cfg.mmproj_gpu && gpu_backend_;
        p.n_threads = n_threads_;
        p.warmup = false;
        p.print_timings = false;
        if (!flash_attn_) p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
        mctx_ = mtmd_init_from_file(cfg.mmproj.c_str(), model_, p);
        if (!mctx_)
            throw model_error("llama.cpp could not load the mmproj " + cfg.mmproj + " with this model (corrupt file, "
                              "or a projector made for another model); set verbose for details");
        if (!mtmd_support_vision(mctx_)) throw model_error(cfg.mmproj + " has no vision encoder");
    }
    // texts of control / user-defined tokens (e.g. <|im_end|>, </s>): user and model text must not forge them
    std::set<std::string> specials{media_marker()};
    for (int32_t t = 0; t < n_vocab_; ++t) {
        if (!(llama_vocab_get_attr(vocab_, t) & (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_USER_DEFINED))) continue;
        special_ids_.insert(t);
        std::string s = token_bytes_text(t);
        bool alnum = !s.empty();
        for (unsigned char c : s) alnum = alnum && (std::isalnum(c) || c >= 0x80);
        if (utf8_length(s) > 1 && !alnum) specials.insert(s);
    }
    specials_.assign(specials.begin(), specials.end());
    if (space_prefix_) {
        auto ids = llama_tokenize_raw(" ", false, false);
        space_token_ = ids.size() == 1 ? ids[0] : -1;
    }
    std::stable_sort(specials_.begin(), specials_.end(),
                     [](const std::string &a, const std::string &b) { return utf8_length(a) > utf8_length(b); });
}

Engine::~Engine() { release(); }

void Engine::release() {
    image_cache_.clear();
    if (batch_) llama_batch_free(*batch_), delete batch_, batch_ = nullptr;
    if (mctx_) mtmd_free(mctx_);
    if (ctx_) llama_free(ctx_);
    if (model_) llama_model_free(model_);
    mctx_ = nullptr, ctx_ = nullptr, model_ = nullptr;
}

// ------------------------------------------------------------------------------------------------------ text
std::string Engine::token_bytes_text(int32_t token) const {
    if (token < 0) return "";
    const char *t = llama_vocab_get_text(vocab_, token);
    return t ? utf8_sanitize(t) : "";
}

std::vector<int32_t> Engine::llama_tokenize_raw(const std::string &text, bool add_special, bool parse_special) const {
    std::vector<int32_t> buf(text.size() + 16);
    int32_t n = llama_tokenize(vocab_, text.data(), (int32_t)text.size(), buf.data(), (int32_t)buf.size(), add_special,
                               parse_special);
    if (n < 0) {
        buf.resize(-n);
        n = llama_tokenize(vocab_, text.data(), (int32_t)text.size(), buf.data(), (int32_t)buf.size(), add_special,
                           parse_special);
    }
    buf.resize(std::max(n, 0));
    return buf;
}

std::vector<int32_t> Engine::tokenize(const std::string &text, bool add_special, bool parse_special) const {
    if (!space_prefix_ || text.empty()) return llama_tokenize_raw(text, add_special, parse_special);
    auto ids = llama_tokenize_raw(" " + text, add_special, parse_special);
    // as HF: a text that starts with a control token gets no space before it
    size_t i = (add_special && ids.size() > 1 && ids[0] == llama_vocab_bos(vocab_)) ? 1 : 0;
    if (ids.size() > i + 1 && ids[i] == space_token_ && special_ids_.count(ids[i + 1])) ids.erase(ids.begin() + i);
    return ids;
}

std::string Engine::token_bytes(int32_t token) const {
    char buf[64];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof buf, 0, false);
    if (n >= 0) return std::string(buf, n);
    std::string big(-n, '\0');
    n = llama_token_to_piece(vocab_, token, &big[0], (int32_t)big.size(), 0, false);
    return big.substr(0, std::max(n, 0));
}

std::string Engine::detokenize(const std::vector<int32_t> &tokens) const {
    std::string raw;
    for (int32_t t : tokens) raw += token_bytes(t);
    return utf8_sanitize(raw);
}

std::vector<int32_t> Engine::single_token_ids(const std::vector<std::string> &words) {
    std::string key;
    for (const auto &w : words) key += w + '\x1f';
    auto it = single_ids_.find(key);
    if (it != single_ids_.end()) return it->second;
    std::vector<int32_t> out;
    for (const auto &w : words) {
        auto ids = tokenize(w, false, false);
        if (ids.size() == 1 && std::find(out.begin(), out.end(), ids[0]) == out.end()) out.push_back(ids[0]);
    }
    return single_ids_[key] = out;
}

// ------------------------------------------------------------------------------------------------------ images
Image Engine::load_image_file(const std::string &path) const {
    if (!is_file(path)) throw image_error("image not found: " + path);
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    size_t size = (size_t)f.tellg();
    if (size > (50u << 20)) throw image_error("image " + path + " is over the 50 MB limit");
    std::vector<uint8_t> data(size);
    f.seekg(0);
    f.read(reinterpret_cast<char *>(data.data()), size);
    return load_image_bytes(data.data(), data.size(), path);
}

Image Engine::load_image_bytes(const uint8_t *data, size_t size, const std::string &what) const {
    if (!data || size == 0) throw image_error("image " + what + " is empty (0 bytes)");
    if (size > (50u << 20)) throw image_error("image " + what + " is over the 50 MB limit");
    if (!mctx_) throw input_error("this model has no vision projector: give an mmproj, or send no image");
    // the size limits before decoding: stb_image allocates what the header declares (a JPEG of a few hundred bytes
    // can declare hundreds of megapixels: gigabytes of RGB and tens of seconds of decoding) and mtmd copies it again
    int hdr_w = 0, hdr_h = 0;
    if (image_header_size(data, size, &hdr_w, &hdr_h)) check_image_size(hdr_w, hdr_h, what);
    mtmd_helper_bitmap_wrapper w = mtmd_helper_bitmap_init_from_buf(mctx_, data, size, false, mtmd_helper_init_opt_default());
    if (!w.bitmap) throw image_error("image " + what + " cannot be decoded (corrupt, truncated or not an image)");
    if (mtmd_bitmap_is_audio(w.bitmap)) {
        mtmd_bitmap_free(w.bitmap);
        throw image_error(what + " is audio, not an image");
    }
    uint32_t nx = mtmd_bitmap_get_nx(w.bitmap), ny = mtmd_bitmap_get_ny(w.bitmap);
    const uint8_t *px = mtmd_bitmap_get_data(w.bitmap);
    Image img = load_image_rgb(px, (int32_t)nx, (int32_t)ny);
    mtmd_bitmap_free(w.bitmap);
    return img;
}

Image Engine::load_image_rgb(const uint8_t *rgb, int32_t width, int32_t height) const {
    if (!rgb) throw image_error("raw RGB image data is a null pointer");
    check_image_size(width, height, "");
    Image img;
    img.width = width, img.height = height;
    img.rgb.assign(rgb, rgb + (size_t)width * height * 3);
    std::string dims = std::to_string(width) + "x" + std::to_string(height) + ":";
    img.key = fnv_hex(img.rgb.data(), img.rgb.size(), std::hash<std::string>{}(dims)) + ":" + fingerprint_;
    return img;
}

bool Engine::image_cached(const Image &image) const {
    for (const auto &kv : image_cache_)
        if (kv.first == image.key) return !kv.second->embd.empty();
    return false;
}

std::shared_ptr<ImageEntry> Engine::image_entry(const Image &image) {
    for (auto it = image_cache_.begin(); it != image_cache_.end(); ++it) {
        if (it->first != image.key) continue;
        image_cache_.splice(image_cache_.begin(), image_cache_, it);  // most recent first
        return it->second;
    }
    mtmd_bitmap *bitmap = mtmd_bitmap_init(image.width, image.height, image.rgb.data());
    if (!bitmap) throw image_error("llama.cpp refused the image (" + std::to_string(image.width) + "x" +
                                   std::to_string(image.height) + ")");
    mtmd_input_chunks *chunks = mtmd_input_chunks_init();
    auto entry = std::make_shared<ImageEntry>();
    std::string marker = mtmd_default_marker();
    mtmd_input_text text{marker.c_str(), marker.size(), false, true};
    const mtmd_bitmap *bitmaps[1] = {bitmap};
    int32_t rc = mtmd_tokenize(mctx_, chunks, &text, bitmaps, 1);
    bool other_kind = false;
    for (size_t i = 0; rc == 0 && i < mtmd_input_chunks_size(chunks); ++i) {
        const mtmd_input_chunk *c = mtmd_input_chunks_get(chunks, i);
        ImagePart part;
        if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token *toks = mtmd_input_chunk_get_tokens_text(c, &n);
            if (n == 0) continue;
            part.tokens.assign(toks, toks + n);
            part.n_tokens = part.n_pos = (int32_t)n;
        } else if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_IMAGE) {
            part.chunk = mtmd_input_chunk_copy(c);
            part.n_tokens = (int32_t)mtmd_input_chunk_get_n_tokens(c);
            part.n_pos = mtmd_input_chunk_get_n_pos(c);
        } else {
            other_kind = true;
            continue;
        }
        entry->n_tokens += part.n_tokens, entry->n_pos += part.n_pos;
        entry->parts.push_back(std::move(part));
    }
    mtmd_input_chunks_free(chunks);
    mtmd_bitmap_free(bitmap);
    if (rc != 0) throw image_error("llama.cpp could not preprocess the image (mtmd_tokenize=" + std::to_string(rc) + ")");
    if (other_kind)
        throw image_error("llama.cpp turned the image into a non-image chunk; this mmproj is not a vision projector "
                          "ecso supports");
    bool has_image = false;
    for (const auto &part : entry->parts) has_image = has_image || part.chunk;
    if (!has_image) throw image_error("llama.cpp produced no image tokens for the image");
    image_cache_.emplace_front(image.key, entry);
    while ((int32_t)image_cache_.size() > std::max(0, config.image_cache_entries)) image_cache_.pop_back();
    return entry;
}

std::vector<std::vector<float>> Engine::encode(const ImageEntry &entry) {
    std::vector<std::vector<float>> out;
    for (const auto &part : entry.parts) {
        if (!part.chunk) continue;
        int32_t rc = mtmd_encode_chunk(mctx_, part.chunk);
        if (rc != 0) throw engine_error("the vision encoder failed (mtmd_encode_chunk=" + std::to_string(rc) + ")");
        const float *p = mtmd_get_output_embd(mctx_);
        out.emplace_back(p, p + (size_t)part.n_tokens * n_embd_inp_);
        std::vector<float> &rows = out.back();
        if (!all_finite(rows.data(), rows.size())) {
            if (!break_row_read_) {  // read on first need only: Pixtral / Mistral 3's [IMG_BREAK] embedding
                break_row_ = gguf_tensor_f32(config.mmproj, "v.token_embd.img_break");
                break_row_read_ = true;
            }
            if (!break_row_.empty() && (int32_t)break_row_.size() == n_embd_inp_)
                repair_break_rows(rows.data(), (size_t)part.n_tokens, break_row_);
            if (!all_finite(rows.data(), rows.size()))
                throw engine_error("the vision encoder returned non-finite image embeddings (NaN or inf); the mmproj "
                                   "file is broken or does not fit this model; re-export it or use the model's own");
        }
    }
    return out;
}

// ------------------------------------------------------------------------------------------------------ prompts
namespace {
std::vector<Piece> split_at(const std::vector<int32_t> &tokens, size_t cut) {
    std::vector<Piece> out;
    cut = std::min(cut, tokens.size());
    if (cut > 0) out.push_back(Piece::text({tokens.begin(), tokens.begin() + cut}));
    if (cut < tokens.size()) out.push_back(Piece::text({tokens.begin() + cut, tokens.end()}));
    return out;
}
}  // namespace

// Tokenized as the reference does: whole without an image; [head + BOS] / image / [tail, no BOS] with one. Decode
// boundaries: after the stable part of the head (shared by every step, with or without the image), around the image.
Prompt Engine::build_prompt(const std::vector<Message> &messages, const Image *image) {
    if (image && !has_vision()) throw input_error("this model has no vision projector: give an mmproj, or send no image");
    RenderedPrompt r = chat_format_.prompt(messages, image != nullptr);
    size_t cut = head_cut(r.head);
    Prompt p;
    if (!image) {
        p.pieces = split_at(tokenize(r.head + r.tail, true), cut);
        return p;
    }
    p.pieces = split_at(tokenize(r.head, true), cut);
    auto entry = image_entry(*image);
    p.images[image->key] = entry;
    Piece ip;
    ip.image = true, ip.key = image->key, ip.n_tokens = entry->n_tokens, ip.image_n_pos = entry->n_pos;
    p.pieces.push_back(ip);
    p.pieces.push_back(Piece::text(tokenize(r.tail, false)));
    return p;
}

// The tokens of `head` that stay the same whatever text follows it. The last token is left out (SentencePiece merges
// the head's trailing space into the next word), and any the probes show to merge with what follows.
size_t Engine::head_cut(const std::string &head) {
    auto it = head_cuts_.find(head);
    if (it != head_cuts_.end()) return it->second;
    auto ids = tokenize(head, true);
    long cut = (long)ids.size() - 1;
    for (const char *probe : {"x", "A", "\n"}) {
        auto with = tokenize(head + probe, true);
        long n = 0;
        while (n < (long)ids.size() && n < (long)with.size() && ids[n] == with[n]) ++n;
        cut = std::min(cut, n);
    }
    return head_cuts_[head] = (size_t)std::max(cut, 0L);
}

void Engine::check_budget(const Prompt &prompt, int32_t max_tokens, const std::string &what) const {
    int32_t need = prompt.n_pos() + max_tokens;
    if (need <= n_ctx_) return;
    int32_t img = 0;
    for (const auto &p : prompt.pieces) img += p.image ? p.n_pos() : 0;
    throw overflow_error(what + " needs " + std::to_string(prompt.n_pos()) + " positions (" + std::to_string(img) +
                         " for the image) + " + std::to_string(max_tokens) + " new tokens = " + std::to_string(need) +
                         ", more than the context of " + std::to_string(n_ctx_) +
                         "; use a shorter query, fewer max tokens or a larger n_ctx");
}

// ------------------------------------------------------------------------------------------------------ KV + decode
void Engine::reset() {
    llama_memory_clear(llama_get_memory(ctx_), true);
    kv.clear();
}

void Engine::rollback(int32_t n_pos) {
    kv.truncate(n_pos);
    if (!llama_memory_seq_rm(llama_get_memory(ctx_), 0, n_pos, -1)) {
        reset();
        throw engine_error("llama.cpp could not roll back the KV cache; it was cleared");
    }
}

void Engine::check_cancel() const {
    if (cancel_flag && cancel_flag->load()) throw Error(ECSO_ERR_CANCELLED, "the request was cancelled");
}

PrefillStats Engine::prefill(const Prompt &prompt, bool reuse) {
    double t0 = now();
    int32_t keep = 0;
    if (reuse) {
        keep = kv.common_prefix(prompt.pieces);
        if (keep >= prompt.n_pos()) keep = prompt.n_pos() - prompt.pieces.back().n_pos();  // fresh logits
        if (!kv_rollback_ && keep < kv.n_pos()) keep = 0;  // a recurrent state cannot be cut back: recompute
        rollback(keep);
    } else {
        reset();
    }
    PrefillStats st;
    int32_t pos = keep;
    for (const Piece &piece : suffix_after(prompt.pieces, keep)) {
        check_cancel();
        if (!piece.image) {
            decode_text(piece.tokens, pos);
        } else {
            ImageEntry &entry = *prompt.images.at(piece.key);
            std::vector<std::vector<float>> fresh;  // the naive path encodes again and keeps nothing
            if (!reuse || entry.embd.empty()) {
                double te = now();
                fresh = encode(entry);
                st.encode_seconds += now() - te;
                st.image_encodes += 1;
                if (reuse) entry.embd = fresh;
            }
            decode_image(entry, reuse ? entry.embd : fresh, pos);
        }
        kv.append(piece);
        pos += piece.n_pos();
    }
    st.n_prompt = prompt.n_pos(), st.n_reused = keep, st.n_evaluated = prompt.n_pos() - keep;
    st.seconds = now() - t0;
    return st;
}

void Engine::decode_text(const std::vector<int32_t> &tokens, int32_t pos0) {
    if (observer) observer(false, tokens, pos0, 0);
    const int32_t n = (int32_t)tokens.size();
    llama_batch &b = *batch_;
    for (int32_t start = 0; start < n; start += n_batch_) {
        check_cancel();
        int32_t m = std::min(n_batch_, n - start);
        b.n_tokens = m;
        for (int32_t i = 0; i < m; ++i) {
            b.token[i] = tokens[start + i];
            b.pos[i] = pos0 + start + i;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = 0;
            b.logits[i] = (start + i == n - 1);
        }
        int rc = llama_decode(ctx_, b);
        if (rc != 0) fail_decode(rc);
    }
}

// The whole block: its marker tokens as text, each image chunk from its embeddings (mtmd sets the positions: M-RoPE
// grids for Qwen2-VL, non-causal attention for Gemma 3).
void Engine::decode_image(const ImageEntry &entry, const std::vector<std::vector<float>> &embd, int32_t pos) {
    if (observer) observer(true, {}, pos, entry.n_pos);
    const int32_t start = pos;
    size_t next = 0;
    for (const auto &part : entry.parts) {
        if (!part.chunk) {
            decode_text(part.tokens, pos);
            pos += part.n_pos;
            continue;
        }
        check_cancel();
        if (next >= embd.size()) throw engine_error("an image chunk has no embeddings");
        llama_pos new_n_past = 0;
        int32_t rc = mtmd_helper_decode_image_chunk(mctx_, ctx_, part.chunk, const_cast<float *>(embd[next++].data()),
                                                    pos, 0, n_batch_, &new_n_past, nullptr, nullptr);
        if (rc != 0) fail_decode(rc);
        if (new_n_past != pos + part.n_pos) throw engine_error("image decode advanced to an unexpected position");
        pos += part.n_pos;
    }
    if (pos != start + entry.n_pos) throw engine_error("the image block took an unexpected number of positions");
}

void Engine::fail_decode(int rc) {
    reset();
    if (rc == 1) throw overflow_error("the KV cache is full; use a larger n_ctx or fewer max tokens");
    throw engine_error("llama_decode failed with code " + std::to_string(rc) + "; the KV cache was cleared");
}

std::vector<float> Engine::logits() const {
    const float *p = llama_get_logits_ith(ctx_, -1);
    return std::vector<float>(p, p + n_vocab_);
}

void Engine::append_tokens(const std::vector<int32_t> &tokens) {
    decode_text(tokens, kv.n_pos());
    kv.append(Piece::text(tokens));
}

}  // namespace ecso
