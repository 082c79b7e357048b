// What the KV cache holds, so a new prompt reuses the longest common prefix: the port of runtime/kv.py.
//
// A prompt is a list of pieces (text tokens, or an image occupying n_pos positions), one per decode call. Reuse keeps
// the longest common token prefix, cut back so every decode boundary below the cut is the same in the cache and the
// new prompt (llama.cpp's numbers depend on how tokens are batched), never inside an image: reuse stays bit-exact.
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

struct Unit {
    bool image;
    int32_t token;
    int32_t n_pos;
    std::string key;
    bool operator==(const Unit &o) const { return image == o.image && token == o.token && n_pos == o.n_pos && key == o.key; }
};

inline std::vector<Unit> units(const std::vector<Piece> &ps) {
    std::vector<Unit> out;
    for (const auto &p : ps) {
        if (p.image) out.push_back({true, 0, p.image_n_pos, p.key});
        else for (int32_t t : p.tokens) out.push_back({false, t, 1, {}});
    }
    return out;
}

inline std::vector<int32_t> boundary_list(const std::vector<Piece> &pieces) {
    std::vector<int32_t> out{0};
    int32_t pos = 0;
    for (const auto &p : pieces) out.push_back(pos += p.n_pos());
    return out;
}

// Positions of the longest common prefix of two piece lists (text token by token, an image only whole).
inline int32_t common_units(const std::vector<Piece> &a, const std::vector<Piece> &b) {
    auto ua = units(a), ub = units(b);
    size_t n = 0;
    int32_t pos = 0;
    while (n < ua.size() && n < ub.size() && ua[n] == ub[n]) pos += ua[n++].n_pos;
    return pos;
}

// `prompt` with the decode boundaries of `base` added where the two agree: a prompt that extends what is cached (an
// appended judge after the generated answer) is then batched as the cache was, and reuses all of it.
inline std::vector<Piece> aligned_to(const std::vector<Piece> &prompt, const std::vector<Piece> &base) {
    int32_t limit = common_units(prompt, base);
    std::set<int32_t> cuts;
    for (int32_t c : boundary_list(prompt)) cuts.insert(c);
    for (int32_t c : boundary_list(base))
        if (c <= limit) cuts.insert(c);
    std::vector<Piece> out;
    int32_t pos = 0;
    for (const auto &p : prompt) {
        int32_t end = pos + p.n_pos();
        if (p.image) {
            out.push_back(p);
        } else {
            int32_t from = pos;
            for (auto it = cuts.upper_bound(pos); it != cuts.end() && *it < end; ++it) {
                out.push_back(Piece::text({p.tokens.begin() + (from - pos), p.tokens.begin() + (*it - pos)}));
                from = *it;
            }
            out.push_back(Piece::text({p.tokens.begin() + (from - pos), p.tokens.end()}));
        }
        pos = end;
    }
    return out;
}

class PrefixCache {
public:
    std::vector<Piece> pieces;

    int32_t n_pos() const { return n_positions(pieces); }

    // Positions of `prompt` that can be reused: the longest common token prefix, cut back to the last decode boundary
    // up to which the cache and the prompt have the very same boundaries (same batches: bit-exact).
    int32_t common_prefix(const std::vector<Piece> &prompt) const {
        int32_t limit = common_units(pieces, prompt), keep = 0;
        auto a = boundary_list(pieces), b = boundary_list(prompt);
        for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
            if (a[i] != b[i] || a[i] > limit) break;
            keep = a[i];
        }
        return keep;
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

};

}  // namespace ecso
