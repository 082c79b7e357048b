// Prompts, decision rules and chat formats, interpreted from the data CMake generated out of ecso_prompts.json.
#include "prompts.hpp"

#include <algorithm>
#include <cstring>

#include "chat_template.hpp"
#include "ecso_prompts_data.h"
#include "errors.hpp"
#include "llama.h"

namespace ecso {
namespace {

// Replaces the first "{}" of each argument in turn (Python's str.format with positional fields).
std::string fill(const char *tmpl, const std::vector<std::string> &args) {
    std::string out, t = tmpl;
    size_t pos = 0;
    for (const auto &a : args) {
        size_t at = t.find("{}", pos);
        if (at == std::string::npos) break;
        out += t.substr(pos, at - pos) + a;
        pos = at + 2;
    }
    return out + t.substr(pos);
}

const data::DecisionRule *find_rule(const std::string &name) {
    for (const auto &r : data::decision_rules)
        if (name == r.name) return &r;
    return nullptr;
}

std::string ascii_lower(std::string s) {
    for (auto &c : s)
        if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
    return s;
}

// Unicode whitespace per Python's str.isspace, as UTF-8 (single bytes handled separately).
const char *const kSpaces[] = {"\xc2\x85", "\xc2\xa0", "\xe1\x9a\x80", "\xe2\x80\x80", "\xe2\x80\x81", "\xe2\x80\x82",
                               "\xe2\x80\x83", "\xe2\x80\x84", "\xe2\x80\x85", "\xe2\x80\x86", "\xe2\x80\x87",
                               "\xe2\x80\x88", "\xe2\x80\x89", "\xe2\x80\x8a", "\xe2\x80\xa8", "\xe2\x80\xa9",
                               "\xe2\x80\xaf", "\xe2\x81\x9f", "\xe3\x80\x80"};

size_t space_at(const std::string &s, size_t i) {
    unsigned char c = s[i];
    if (c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f)) return 1;
    for (const char *sp : kSpaces) {
        size_t n = std::strlen(sp);
        if (s.compare(i, n, sp) == 0) return n;
    }
    return 0;
}

size_t space_before(const std::string &s, size_t end) {  // length of a whitespace char ending at `end`
    for (size_t n = 1; n <= 3 && n <= end; ++n)
        if (space_at(s, end - n) == n) return n;
    return 0;
}

// stands in for an assistant message while rendering, to find the text a template puts after it (the Python engine's
// mark; it never reaches a prompt)
const std::string kAnswerMark("\0ecso-answer\0", 13);

}  // namespace

std::string prompt_version() { return data::prompt_version; }

std::string tell_response(const std::string &response) {
    // the paper cuts the response to its first 1927 characters (code points, as Python slices)
    size_t n = 0, i = 0;
    while (i < response.size() && n < (size_t)data::tell_response_chars) {
        unsigned char c = response[i];
        i += c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        ++n;
    }
    return response.substr(0, std::min(i, response.size()));
}

std::string tell_prompt(const std::string &query, const std::string &response) {
    return fill(data::tell, {query, tell_response(response)});
}

std::string cap_prompt(const std::string &query) { return fill(data::cap, {query}); }
std::string gen_prompt(const std::string &caption, const std::string &query) { return fill(data::gen, {caption, query}); }
std::string append_judge_prompt() { return data::append_judge; }
std::string media_marker() { return data::media_marker; }

std::vector<std::string> logit_words(bool yes) {
    std::vector<std::string> out;
    if (yes) for (const char *w : data::logit_yes) out.push_back(w);
    else for (const char *w : data::logit_no) out.push_back(w);
    return out;
}

bool has_decision_rule(const std::string &rule) { return find_rule(rule) != nullptr; }

std::string decision_rule_names() {
    std::string out;
    for (const auto &r : data::decision_rules) out += (out.empty() ? "" : ", ") + std::string(r.name);
    return out;
}

bool is_unsafe_reply(const std::string &reply, const std::string &rule) {
    const auto *r = find_rule(rule);
    if (!r) throw input_error("unknown decision rule '" + rule + "'; use one of " + decision_rule_names());
    std::string text = ascii_lower(strip(reply));
    if (r->n_equals_any > 0) {
        for (int i = 0; i < r->n_equals_any; ++i)
            if (text == r->equals_any[i]) return true;
        return false;
    }
    return text.find(r->contains) != std::string::npos;
}

bool reply_can_still_be_unsafe(const std::string &partial_reply, const std::string &rule) {
    const auto *r = find_rule(rule);
    if (!r || r->n_equals_any == 0) return true;
    std::string text = ascii_lower(strip(partial_reply));
    for (int i = 0; i < r->n_equals_any; ++i)
        if (std::string(r->equals_any[i]).compare(0, text.size(), text) == 0 && text.size() <= std::strlen(r->equals_any[i]))
            return true;
    return false;
}

std::string neutralize_specials(std::string text, const std::vector<std::string> &specials) {
    for (const auto &s : specials) {
        if (utf8_length(s) <= 1 || text.find(s) == std::string::npos) continue;
        unsigned char c = s[0];
        size_t first = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        std::string broken = s.substr(0, first) + data::control_token_breaker + s.substr(first);
        std::string out;
        size_t pos = 0, at;
        while ((at = text.find(s, pos)) != std::string::npos) {
            out += text.substr(pos, at - pos) + broken;
            pos = at + s.size();
        }
        text = out + text.substr(pos);
    }
    return text;
}

std::string strip(const std::string &s) {
    size_t b = 0, e = s.size(), n;
    while (b < e && (n = space_at(s, b))) b += n;
    while (e > b && (n = space_before(s, e))) e -= n;
    return s.substr(b, e - b);
}

std::string utf8_sanitize(const std::string &in) {
    static const char kRepl[] = "\xef\xbf\xbd";
    std::string out;
    size_t i = 0, n = in.size();
    while (i < n) {
        unsigned char c = in[i];
        if (c < 0x80) { out += char(c); ++i; continue; }
        int len = 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        if (!len) { out += kRepl; ++i; continue; }
        size_t j = i + 1;
        bool ok = true;
        for (int k = 1; k < len; ++k, ++j) {
            unsigned char d = j < n ? (unsigned char)in[j] : 0;
            unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
            if (j >= n || d < l || d > h) { ok = false; break; }
        }
        if (ok) out.append(in, i, len);
        else out += kRepl;  // one replacement for the maximal invalid subpart
        i = j;
    }
    return out;
}

size_t utf8_length(const std::string &s) {
    size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
}

ChatFormat ChatFormat::choose(Kind requested, const std::string &tmpl, const std::string &bos_text,
                              const std::string &eos_text, bool adds_bos) {
    ChatFormat f;
    if (requested == Kind::llava15 || (requested == Kind::automatic && tmpl.empty())) {
        f.name = "llava-1.5";
    } else if (tmpl.empty()) {
        throw model_error("the model has no chat template; use chat format llava-1.5");
    } else {
        f.name = "gguf-template";
        f.jinja_ = std::make_shared<const JinjaTemplate>(tmpl);
        f.bos_ = bos_text, f.eos_ = eos_text, f.adds_bos_ = adds_bos;
    }
    std::vector<Message> probe{{"user", "Hi"}, {"assistant", "Hello"}, {"user", "Bye"}};
    f.render(probe), f.prompt({probe[0]}, true), f.prompt({probe[0]}, false);  // fails at open, not mid-request
    return f;
}

std::string ChatFormat::render_jinja(const std::vector<TemplateMessage> &messages) const {
    std::string text = jinja_->render(messages, bos_, eos_);
    // BOS is added by the tokenizer (add_special); a template that writes it too would double it
    if (adds_bos_ && !bos_.empty() && text.compare(0, bos_.size(), bos_) == 0) text = text.substr(bos_.size());
    return text;
}

std::string ChatFormat::render(const std::vector<Message> &messages) const {
    if (jinja_) {
        std::vector<TemplateMessage> msgs;
        for (const auto &m : messages) msgs.push_back({m.role, m.content, TemplateMessage::Content::text});
        return render_jinja(msgs);
    }
    std::string system = data::llava15_system;  // llava-1.5 (vicuna_v1), from the data
    size_t start = 0;
    if (!messages.empty() && messages[0].role == "system") system = messages[0].content, start = 1;
    std::string out = system + data::llava15_after_system;
    for (size_t i = start; i < messages.size(); ++i)
        out += fill(messages[i].role == "user" ? data::llava15_user : data::llava15_assistant, {messages[i].content});
    return out + data::llava15_generation;
}

RenderedPrompt ChatFormat::prompt(const std::vector<Message> &messages, bool image) const {
    RenderedPrompt placed;
    if (image && jinja_ && template_image_slot(messages, placed)) return placed;
    return marker_prompt(messages, image);
}

// The image (or only a cut) at the start of the first user turn's content, LLaVA style.
RenderedPrompt ChatFormat::marker_prompt(const std::vector<Message> &messages, bool image) const {
    auto it = std::find_if(messages.begin(), messages.end(), [](const Message &m) { return m.role == "user"; });
    if (it == messages.end()) throw input_error("a prompt needs a user message");
    std::vector<Message> marked = messages;
    Message &first_user = marked[it - messages.begin()];
    const std::string mark = media_marker();
    first_user.content = mark + (image ? "\n" : "") + first_user.content;
    std::string text = render(marked);
    size_t at = text.find(mark);
    if (at == std::string::npos || text.find(mark, at + 1) != std::string::npos)
        throw model_error("the " + name + " chat template does not put the user's message into the prompt verbatim; "
                          "choose another chat format");
    RenderedPrompt r;
    r.image = image;
    r.head = text.substr(0, at);
    if (image) {
        r.tail = text.substr(at + mark.size());
        return r;
    }
    std::string whole = render(messages);  // without an image the prompt is tokenized whole
    if (whole.compare(0, r.head.size(), r.head) != 0) r.head.clear();  // no shared head
    r.tail = whole.substr(r.head.size());
    return r;
}

namespace {

bool is_continuation(const std::string &s, size_t i) { return i < s.size() && (s[i] & 0xC0) == 0x80; }

// What a template may write for an image: tags like <image>, <|image_pad|>, [IMG], and whitespace (the Python
// engine's regex `(?:\s|<[^<>\s]{1,48}>|\[[A-Z_]{1,24}\])*`, lengths in code points).
bool is_image_slot(const std::string &s) {
    size_t i = 0, n;
    while (i < s.size()) {
        if ((n = space_at(s, i))) {
            i += n;
        } else if (s[i] == '<') {
            size_t j = i + 1, count = 0;
            while (j < s.size() && s[j] != '<' && s[j] != '>' && !space_at(s, j)) {
                count += !is_continuation(s, j);
                ++j;
            }
            if (j >= s.size() || s[j] != '>' || count < 1 || count > 48) return false;
            i = j + 1;
        } else if (s[i] == '[') {
            size_t j = i + 1;
            while (j < s.size() && ((s[j] >= 'A' && s[j] <= 'Z') || s[j] == '_')) ++j;
            if (j >= s.size() || s[j] != ']' || j - i - 1 < 1 || j - i - 1 > 24) return false;
            i = j + 1;
        } else {
            return false;
        }
    }
    return true;
}

}  // namespace

// Renders the first user turn as HF processors do, typed content [image, text], and again as [text]: the difference
// is the template's image placeholder (Qwen2-VL <|vision_start|><|image_pad|><|vision_end|>, Gemma 3
// <start_of_image>, SmolVLM <image>), which the image replaces (mtmd then writes the family's own image tokens).
// False unless that difference is made only of tag-like tokens and whitespace.
bool ChatFormat::template_image_slot(const std::vector<Message> &messages, RenderedPrompt &out) const {
    auto it = std::find_if(messages.begin(), messages.end(), [](const Message &m) { return m.role == "user"; });
    if (it == messages.end()) return false;
    size_t idx = it - messages.begin();
    std::vector<TemplateMessage> with_image, text_only;
    for (size_t i = 0; i < messages.size(); ++i) {
        TemplateMessage m{messages[i].role, messages[i].content, TemplateMessage::Content::text};
        with_image.push_back(m), text_only.push_back(m);
    }
    with_image[idx].kind = TemplateMessage::Content::typed_image_text;
    text_only[idx].kind = TemplateMessage::Content::typed_text;
    std::string a, b;
    try {
        a = render_jinja(with_image), b = render_jinja(text_only);
    } catch (const std::exception &) {  // a template that cannot take typed content
        return false;
    }
    size_t p = 0, lim = std::min(a.size(), b.size());
    while (p < lim && a[p] == b[p]) ++p;
    while (p > 0 && is_continuation(a, p)) --p;  // compare code points, as the Python engine does
    size_t q = 0;
    while (q < lim - p && a[a.size() - 1 - q] == b[b.size() - 1 - q]) ++q;
    while (q > 0 && is_continuation(a, a.size() - q)) --q;
    std::string slot = a.substr(p, a.size() - q - p);
    const std::string &text = messages[idx].content;
    if (!is_image_slot(slot) || strip(slot).empty() ||
        (a.substr(a.size() - q) + a.substr(0, p)).find(text) == std::string::npos)
        return false;
    out.head = a.substr(0, p), out.tail = a.substr(a.size() - q), out.image = true;
    return true;
}

std::string ChatFormat::after_assistant(std::vector<Message> messages, bool image) const {
    int last = -1;
    for (size_t i = 0; i < messages.size(); ++i)
        if (messages[i].role == "assistant") last = (int)i;
    if (last < 0) throw input_error("after_assistant needs an assistant message");
    messages[last].content = kAnswerMark;
    std::string tail = prompt(messages, image).tail;
    size_t at = tail.find(kAnswerMark);
    if (at == std::string::npos || tail.find(kAnswerMark, at + 1) != std::string::npos)
        throw model_error("the " + name + " chat template does not put the assistant's answer into the conversation "
                          "verbatim; use judge paper or logit");
    return tail.substr(at + kAnswerMark.size());
}

}  // namespace ecso
