// A minimal JSON writer for results and engine facts (strings are valid UTF-8 by construction).
#pragma once

#include <cmath>
#include <cstdio>
#include <string>

namespace ecso {

class Json {
public:
    Json &begin_object() { sep(); out_ += '{'; first_ = true; return *this; }
    Json &end_object() { out_ += '}'; first_ = false; return *this; }
    Json &begin_array() { sep(); out_ += '['; first_ = true; return *this; }
    Json &end_array() { out_ += ']'; first_ = false; return *this; }
    Json &key(const std::string &k) { sep(); str(k); out_ += ':'; first_ = true; return *this; }
    Json &value(const std::string &v) { sep(); str(v); return *this; }
    Json &value(const char *v) { return v ? value(std::string(v)) : null(); }
    Json &value(bool v) { sep(); out_ += v ? "true" : "false"; return *this; }
    Json &value(int v) { sep(); out_ += std::to_string(v); return *this; }
    Json &value(long v) { sep(); out_ += std::to_string(v); return *this; }
    Json &value(unsigned v) { sep(); out_ += std::to_string(v); return *this; }
    Json &value(double v) {
        sep();
        if (!std::isfinite(v)) { out_ += "null"; return *this; }
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.17g", v);
        out_ += buf;
        return *this;
    }
    Json &null() { sep(); out_ += "null"; return *this; }
    template <class T> Json &kv(const std::string &k, const T &v) { key(k); return value(v); }
    const std::string &str() const { return out_; }

private:
    void sep() {
        if (!first_) out_ += ',';
        first_ = false;
    }
    void str(const std::string &s) {
        out_ += '"';
        for (unsigned char c : s) {
            switch (c) {
                case '"': out_ += "\\\""; break;
                case '\\': out_ += "\\\\"; break;
                case '\n': out_ += "\\n"; break;
                case '\r': out_ += "\\r"; break;
                case '\t': out_ += "\\t"; break;
                default:
                    if (c < 0x20) {
                        char buf[8];
                        std::snprintf(buf, sizeof buf, "\\u%04x", c);
                        out_ += buf;
                    } else {
                        out_ += char(c);
                    }
            }
        }
        out_ += '"';
    }
    std::string out_;
    bool first_ = true;
};

}  // namespace ecso
