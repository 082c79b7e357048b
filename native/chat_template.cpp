// llama.cpp's Jinja engine behind JinjaTemplate (see chat_template.hpp). The only file that sees common/jinja.
#include "chat_template.hpp"

#include <cstring>
#include <exception>

#include "errors.hpp"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "jinja/value.h"
#include "json.h"  // llama.cpp's common_json (common/json.h)

namespace ecso {
namespace {

// llama.cpp's Jinja errors quote the template source over several lines ("While executing ... Error: <what>"): the
// message is the last "Error: " line, else the first non-empty line.
std::string one_line(const std::string &s) {
    std::string text = s;
    size_t err = text.rfind("Error: ");
    if (err != std::string::npos) text = text.substr(err + 7);
    size_t start = text.find_first_not_of(" \n\r\t");
    if (start == std::string::npos) return "unknown error";
    return text.substr(start, text.find('\n', start) - start);
}

const char *const kRaised = "Jinja Exception: ";  // what raise_exception(msg) throws

common_json message_json(const TemplateMessage &m) {
    common_json msg = common_json::object();
    msg["role"] = m.role;
    if (m.kind == TemplateMessage::Content::text) {
        msg["content"] = m.content;
        return msg;
    }
    common_json parts = common_json::array();
    if (m.kind == TemplateMessage::Content::typed_image_text) {
        common_json image = common_json::object();
        image["type"] = "image";
        parts.push_back(image);
    }
    common_json text = common_json::object();
    text["type"] = "text";
    text["text"] = m.content;
    parts.push_back(text);
    msg["content"] = parts;
    return msg;
}

}  // namespace

struct JinjaTemplate::Impl {
    std::string source;
    jinja::program program;
};

JinjaTemplate::JinjaTemplate(const std::string &source) : impl_(new Impl) {
    try {
        jinja::lexer lexer;
        auto tokens = lexer.tokenize(source);
        impl_->program = jinja::parse_from_tokens(tokens);
        impl_->source = tokens.source;
    } catch (const std::exception &e) {
        throw model_error("the model's chat template is not valid Jinja for llama.cpp's template engine (" +
                          one_line(e.what()) + "); use chat format llava-1.5");
    }
}

JinjaTemplate::~JinjaTemplate() = default;

std::string JinjaTemplate::render(const std::vector<TemplateMessage> &messages, const std::string &bos_token,
                                  const std::string &eos_token) const {
    try {
        common_json msgs = common_json::array();
        for (const auto &m : messages) msgs.push_back(message_json(m));
        common_json input = common_json::object();
        input["messages"] = msgs;
        input["add_generation_prompt"] = true;
        input["bos_token"] = bos_token;
        input["eos_token"] = eos_token;
        jinja::context ctx(impl_->source);
        jinja::global_from_json(ctx, input, false);
        jinja::runtime runtime(ctx);
        const jinja::value result = runtime.execute(impl_->program);
        return jinja::runtime::gather_string_parts(result)->as_string().str();
    } catch (const Error &) {
        throw;
    } catch (const std::exception &e) {
        std::string what = one_line(e.what());
        if (what.compare(0, std::strlen(kRaised), kRaised) == 0)
            throw model_error("the chat template refused the conversation: " + what.substr(std::strlen(kRaised)));
        throw model_error("the model's chat template failed to render (" + what + "); use chat format llava-1.5");
    }
}

}  // namespace ecso
