// A GGUF chat template (Jinja) rendered by llama.cpp's own C++ Jinja engine (common/jinja of the pinned llama.cpp
// source, compiled into libecso): the engine llama-server renders templates with, so any template a model ships
// renders natively. The context is what the Python engine gives Jinja2: messages, add_generation_prompt=true,
// bos_token, eos_token (and the engine's trim_blocks / lstrip_blocks, llama.cpp's defaults too).
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace ecso {

// One message as the template sees it: `content` a plain string, or typed content parts as HF processors send them
// ([{"type": "image"}, {"type": "text", "text": content}] or [{"type": "text", ...}]).
struct TemplateMessage {
    enum class Content { text, typed_text, typed_image_text };
    std::string role, content;
    Content kind = Content::text;
};

class JinjaTemplate {
public:
    // Parses the template; throws ecso::Error (ECSO_ERR_MODEL) with llama.cpp's message when it is not valid Jinja.
    explicit JinjaTemplate(const std::string &source);
    ~JinjaTemplate();
    JinjaTemplate(const JinjaTemplate &) = delete;
    JinjaTemplate &operator=(const JinjaTemplate &) = delete;

    // Renders; throws ecso::Error (ECSO_ERR_MODEL) with the template's own message (raise_exception) or the engine's.
    std::string render(const std::vector<TemplateMessage> &messages, const std::string &bos_token,
                       const std::string &eos_token) const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace ecso
