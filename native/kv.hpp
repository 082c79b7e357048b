// What the KV cache holds, so a new prompt reuses the longest common prefix: the port of runtime/kv.py.
//
// A prompt is a list of pieces (text tokens, or an image occupying n_pos positions). Cuts fall only where both the
// cache and the new prompt have a piece boundary (llama.cpp's numbers depend on how tokens are batched), and never
// inside an image: reuse stays bit-exact against evaluating from scratch.
#pragma once

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace ecso {

struct Piece {
    bool image = false;
    std::vector<int32_t> tokens;  // text
    std::string key;              // image: content hash + model fingerprints
    int32_t n_tokens = 0;         // image
    int32_t image_n_pos = 0;      // image

    int32_t n_pos() const { return image ? image_n_pos : (int32_t)tokens.size(); }
    static Piece text(std::vector<int32_t> toks) { Piece p; p.tokens = std::move(toks); return p; }
};

inline int32_t n_positions(const std::vector<Piece> &pieces) {
    int32_t n = 0;
    for (const auto &p : pieces) n += p.n_pos();
    return n;
}

inline std::set<int32_t> boundaries(const std::vector<Piece> &pieces) {
    std::set<int32_t> out{0};
    int32_t pos = 0;
    for (const auto &p : pieces) out.insert(pos += p.n_pos());
    return out;
}

// The pieces of `prompt` from position n_pos on (n_pos must not fall inside an image).
inline std::vector<Piece> suffix_after(const std::vector<Piece> &prompt, int32_t n_pos) {
    std::vector<Piece> out;
    int32_t pos = 0;
    for (const auto &p : prompt) {
        int32_t end = pos + p.n_pos();
        if (end > n_pos) {
            if (pos >= n_pos) out.push_back(p);
            else if (!p.image) out.push_back(Piece::text({p.tokens.begin() + (n_pos - pos), p.tokens.end()}));
            else throw std::logic_error("suffix would start inside an image");
        }
        pos = end;
    }
    return out;
}

class PrefixCache {
public:
    std::vector<Piece> pieces;

    int32_t n_pos() const { return n_positions(pieces); }

    // Positions of `prompt` that can be reused: the matching prefix (text token by token, an image only whole), cut
    // back to the last position that is a piece boundary of both the cache and the prompt.
    int32_t common_prefix(const std::vector<Piece> &prompt) const {
        auto held = units(pieces), want = units(prompt);
        size_t n = 0;
        int32_t pos = 0;
        while (n < held.size() && n < want.size() && held[n] == want[n]) {
            pos += held[n].n_pos;
            ++n;
        }
        auto a = boundaries(pieces), b = boundaries(prompt);
        int32_t best = 0;
        for (int32_t x : a)
            if (x <= pos && b.count(x)) best = std::max(best, x);
        return best;
    }

    // Keeps the first n_pos positions; refuses to cut an image in two.
    void truncate(int32_t n_pos) {
        std::vector<Piece> kept;
        int32_t pos = 0;
        for (const auto &p : pieces) {
            if (pos >= n_pos) break;
            if (pos + p.n_pos() <= n_pos) {
                kept.push_back(p);
                pos += p.n_pos();
            } else if (!p.image) {
                kept.push_back(Piece::text({p.tokens.begin(), p.tokens.begin() + (n_pos - pos)}));
                pos = n_pos;
            } else {
                throw std::logic_error("cannot cut the KV cache inside an image");
            }
        }
        pieces = std::move(kept);
    }

    void append(Piece p) {
        if (p.n_pos()) pieces.push_back(std::move(p));
    }
    void clear() { pieces.clear(); }

private:
    struct Unit {
        bool image;
        int32_t token;
        int32_t n_pos;
        std::string key;
        bool operator==(const Unit &o) const {
            return image == o.image && token == o.token && n_pos == o.n_pos && key == o.key;
        }
    };
    static std::vector<Unit> units(const std::vector<Piece> &ps) {
        std::vector<Unit> out;
        for (const auto &p : ps) {
            if (p.image) out.push_back({true, 0, p.image_n_pos, p.key});
            else for (int32_t t : p.tokens) out.push_back({false, t, 1, {}});
        }
        return out;
    }
};

}  // namespace ecso
