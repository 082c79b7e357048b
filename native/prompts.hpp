// Prompts, decision rules and chat formats of the native engine. Every string and rule comes from
// runtime/ecso_prompts.json (compiled into ecso_prompts_data.h at configure time): nothing is restated here.
#pragma once

#include <memory>
#include <string>
#include <vector>

struct llama_model;

namespace ecso {

struct Message {
    std::string role;  // system | user | assistant
    std::string content;
};

// A rendered prompt cut where the first user turn's content starts. With an image, the image goes between head and
// tail; without one, head + tail is the template's rendering of the messages, tokenized whole.
struct RenderedPrompt {
    std::string head, tail;
    bool image = false;
};

std::string prompt_version();
std::string tell_response(const std::string &response);  // the first 1927 characters
std::string tell_prompt(const std::string &query, const std::string &response);  // response cut to 1927 chars
std::string cap_prompt(const std::string &query);
std::string gen_prompt(const std::string &caption, const std::string &query);
std::string append_judge_prompt();
std::vector<std::string> logit_words(bool yes);
bool has_decision_rule(const std::string &rule);
std::string decision_rule_names();  // "exact, contains"
bool is_unsafe_reply(const std::string &reply, const std::string &rule);
bool reply_can_still_be_unsafe(const std::string &partial_reply, const std::string &rule);
std::string media_marker();

// Breaks control-token strings in user or model text (zero-width space after the first character).
std::string neutralize_specials(std::string text, const std::vector<std::string> &specials);

// Python str.strip() for the whitespace a model emits (ASCII and the Unicode spaces).
std::string strip(const std::string &s);
// UTF-8 bytes decoded with invalid sequences replaced by U+FFFD (Python's errors="replace").
std::string utf8_sanitize(const std::string &bytes);
size_t utf8_length(const std::string &s);

class JinjaTemplate;
struct TemplateMessage;

// How messages become prompt text: llava-1.5 (vicuna_v1, from the data) or the GGUF's own Jinja template, rendered
// by llama.cpp's Jinja engine exactly as runtime/prompts.py renders it with Jinja2 (the conformance tests compare).
class ChatFormat {
public:
    enum class Kind { automatic, llava15, gguf };
    std::string name;  // "llava-1.5" | "gguf-template"

    // auto: the GGUF's template when it has one, else llava-1.5. Probes a conversation both ways, so a template that
    // cannot be rendered fails here (ECSO_ERR_MODEL with the template's message), not in the middle of a request.
    static ChatFormat choose(Kind requested, const std::string &gguf_template, const std::string &bos_text,
                             const std::string &eos_text, bool adds_bos);
    std::string render(const std::vector<Message> &messages) const;
    // With an image: where the template puts one (typed content), else first in the first user turn; cut there.
    RenderedPrompt prompt(const std::vector<Message> &messages, bool image) const;
    // The text the template puts after the last message, an assistant turn (closing it, opening the next).
    std::string after_assistant(std::vector<Message> messages, bool image) const;

private:
    std::shared_ptr<const JinjaTemplate> jinja_;
    std::string bos_, eos_;
    bool adds_bos_ = true;
    RenderedPrompt marker_prompt(const std::vector<Message> &messages, bool image) const;
    std::string render_jinja(const std::vector<TemplateMessage> &messages) const;
    bool template_image_slot(const std::vector<Message> &messages, RenderedPrompt &out) const;
};

}  // namespace ecso
