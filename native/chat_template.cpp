// llama.cpp's Jinja engine behind JinjaTemplate (see chat_template.hpp). The only file that sees common/jinja.
#include "chat_template.hpp"

#include <exception>

#include "errors.hpp"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "jinja/value.h"
#include "json.h"  // llama.cpp's common_json (common/json.h)

namespace ecso {
namespace {

// llama.cpp's Jinja errors quote the template source over several lines: the first line says what went wrong.
std::string first_line(const std::string &s) {
    size_t nl = s.find('\n');
    std::string line = s.substr(0, nl);
    return line.empty() ? "unknown error" : line;
}

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
                          first_line(e.what()) + "); use chat format llava-1.5");
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
    } catch (const jinja::raised_exception &e) {
        throw model_error(std::string("the chat template refused the conversation: ") + first_line(e.what()));
    } catch (const Error &) {
        throw;
    } catch (const std::exception &e) {
        throw model_error("the model's chat template failed to render (" + first_line(e.what()) +
                          "); use chat format llava-1.5");
    }
}

}  // namespace ecso
