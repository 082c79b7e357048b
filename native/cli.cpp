// ecso-native: the core path of `ecso-run` on libecso (same flags, same --json), for machines without Python.
// Uses only the public C ABI (include/ecso.h), like any app would.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "ecso.h"

namespace {

const char *kUsage =
    "usage: ecso-native --model LLM.gguf [--mmproj MMPROJ.gguf] [--image PATH] [options] QUERY\n"
    "\n"
    "Answer QUERY about an image with ECSO (Eyes Closed, Safety On), natively (libecso). QUERY may be - (stdin).\n"
    "\n"
    "model:  -m/--model PATH  --mmproj PATH  --ctx N (4096)  -ngl/--n-gpu-layers N (-1: all on a GPU build)\n"
    "        --no-mmproj-gpu  --threads N  --flash-attn | --no-flash-attn  --cpu-repack auto|on|off\n"
    "        --chat-format auto|llava-1.5|gguf  -v/--verbose\n"
    "ecso:   -i/--image PATH  --max-tokens N (512)  --temperature T (0)  --top-p P (1)  --seed N (0)\n"
    "        --judge paper|logit|append|append-logit|always-unsafe  --rule exact|contains  --threshold P (0.5)\n"
    "        --guard-every N (0)  --no-reuse  --no-defense  --stream | --no-stream  --json\n"
    "conversation (earlier turns, in order, before QUERY; repeatable):\n"
    "        --system TEXT  --user TEXT  --assistant TEXT\n";

int exit_code(ecso_status s) {
    switch (s) {
        case ECSO_ERR_INPUT: case ECSO_ERR_IMAGE: case ECSO_ERR_CONTEXT_OVERFLOW: return 2;
        case ECSO_ERR_MODEL: return 3;
        case ECSO_ERR_ENGINE: return 4;
        case ECSO_ERR_CANCELLED: return 130;
        default: return 1;
    }
}

int die(const std::string &msg, int code) {
    std::fprintf(stderr, "ecso-native: error: %s\n", msg.c_str());
    return code;
}

void on_event(const ecso_event *ev, void *) {
    std::string step = ev->step ? ev->step : "";
    if (ev->kind == ECSO_EVENT_TOKEN && (step == "answer" || step == "regenerate")) {
        std::fputs(ev->text, stdout);
        std::fflush(stdout);
    } else if (ev->kind == ECSO_EVENT_RETRACT) {
        std::fputs("\n[retracted: judged unsafe while streaming]\n", stderr);
    } else if (ev->kind == ECSO_EVENT_STEP_START && step == "regenerate") {
        std::fputs("\n[judged unsafe: answering again without the image]\n\n", stderr);
    }
}

struct Turn {
    int32_t role;
    std::string content;
};

}  // namespace

int main(int argc, char **argv) {
    if (ecso_abi_version() != ECSO_ABI_VERSION)
        return die("libecso has ABI " + std::to_string(ecso_abi_version()) + " but ecso-native was built for " +
                   std::to_string(ECSO_ABI_VERSION) + "; rebuild it against this libecso", 1);
    ecso_config cfg;
    ecso_options opt;
    if (ecso_config_init(&cfg, sizeof cfg) != ECSO_OK || ecso_options_init(&opt, sizeof opt) != ECSO_OK)
        return die(ecso_last_error(), 1);
    std::vector<Turn> history;
    std::string model, mmproj, image, query, chat_format = "auto", cpu_repack = "auto", judge = "paper", rule = "exact";
    bool have_query = false, as_json = false;
    int stream = -1;
    std::vector<std::string> args(argv + 1, argv + argc);
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string &a = args[i];
        auto next = [&](const char *what) -> std::string {
            if (i + 1 >= args.size()) throw std::runtime_error(std::string(what) + " needs a value");
            return args[++i];
        };
        auto num = [&](const char *what) -> double {
            std::string v = next(what);
            char *end = nullptr;
            double d = std::strtod(v.c_str(), &end);
            if (v.empty() || *end) throw std::runtime_error(std::string(what) + ": '" + v + "' is not a number");
            return d;
        };
        try {
            if (a == "-h" || a == "--help") { std::fputs(kUsage, stdout); return 0; }
            else if (a == "-m" || a == "--model") model = next("--model");
            else if (a == "--mmproj") mmproj = next("--mmproj");
            else if (a == "-i" || a == "--image") image = next("--image");
            else if (a == "--ctx") cfg.n_ctx = (int32_t)num("--ctx");
            else if (a == "-ngl" || a == "--n-gpu-layers") cfg.n_gpu_layers = (int32_t)num("--n-gpu-layers");
            else if (a == "--no-mmproj-gpu") cfg.mmproj_gpu = 0;
            else if (a == "--threads") cfg.n_threads = (int32_t)num("--threads");
            else if (a == "--flash-attn") cfg.flash_attn = 1;
            else if (a == "--no-flash-attn") cfg.flash_attn = 0;
            else if (a == "--cpu-repack") cpu_repack = next("--cpu-repack");
            else if (a == "--chat-format") chat_format = next("--chat-format");
            else if (a == "-v" || a == "--verbose") cfg.verbose = 1;
            else if (a == "--max-tokens") opt.max_tokens = opt.caption_max_tokens = (int32_t)num("--max-tokens");
            else if (a == "--temperature") opt.temperature = (float)num("--temperature");
            else if (a == "--top-p") opt.top_p = (float)num("--top-p");
            else if (a == "--seed") opt.seed = (uint32_t)num("--seed");
            else if (a == "--judge") judge = next("--judge");
            else if (a == "--rule") rule = next("--rule");
            else if (a == "--threshold") opt.logit_threshold = (float)num("--threshold");
            else if (a == "--guard-every") opt.guard_every = (int32_t)num("--guard-every");
            else if (a == "--no-reuse") opt.reuse = 0;
            else if (a == "--no-defense") opt.defense = 0;
            else if (a == "--stream") stream = 1;
            else if (a == "--no-stream") stream = 0;
            else if (a == "--json") as_json = true;
            else if (a == "--system") history.push_back({ECSO_ROLE_SYSTEM, next("--system")});
            else if (a == "--user") history.push_back({ECSO_ROLE_USER, next("--user")});
            else if (a == "--assistant") history.push_back({ECSO_ROLE_ASSISTANT, next("--assistant")});
            else if (a.size() > 1 && a[0] == '-' && a != "-") return die("unknown option " + a + " (see --help)", 2);
            else if (have_query) return die("give one QUERY (quote it)", 2);
            else query = a, have_query = true;
        } catch (const std::exception &e) {
            return die(e.what(), 2);
        }
    }
    if (model.empty()) return die("--model LLM.gguf is required (the native CLI takes paths, not registry names)", 2);
    if (!have_query) return die("give a QUERY (see --help)", 2);
    if (query == "-") {
        std::stringstream ss;
        ss << std::cin.rdbuf();
        query = ss.str();
    }
    cfg.model = model.c_str();
    cfg.mmproj = mmproj.empty() ? nullptr : mmproj.c_str();
    // string forms of the choices live here, in the flags; the C API takes enums
    if (chat_format == "auto") cfg.chat_format = ECSO_CHAT_FORMAT_AUTO;
    else if (chat_format == "llava-1.5") cfg.chat_format = ECSO_CHAT_FORMAT_LLAVA15;
    else if (chat_format == "gguf") cfg.chat_format = ECSO_CHAT_FORMAT_GGUF;
    else return die("unknown chat format '" + chat_format + "'; use auto, llava-1.5 or gguf", 2);
    if (cpu_repack == "auto") cfg.cpu_repack = ECSO_CPU_REPACK_AUTO;
    else if (cpu_repack == "on") cfg.cpu_repack = ECSO_CPU_REPACK_ON;
    else if (cpu_repack == "off") cfg.cpu_repack = ECSO_CPU_REPACK_OFF;
    else return die("unknown cpu repack setting '" + cpu_repack + "'; use one of auto, on, off", 2);
    opt.judge = ecso_judge_from_name(judge.c_str());
    if (opt.judge < 0) {
        std::string names;
        for (int32_t j = 0; ecso_judge_name(j); ++j) names += (j ? ", " : "") + std::string(ecso_judge_name(j));
        return die("unknown judge '" + judge + "'; use one of " + names, 2);
    }
    opt.decision_rule = ecso_decision_rule_from_name(rule.c_str());
    if (opt.decision_rule < 0) {
        std::string names;
        for (int32_t r = 0; ecso_decision_rule_name(r); ++r) names += (r ? ", " : "") + std::string(ecso_decision_rule_name(r));
        return die("unknown decision rule '" + rule + "'; use one of " + names, 2);
    }
    std::vector<ecso_turn> turns;
    for (const auto &t : history) turns.push_back({t.role, t.content.c_str()});
    opt.history = turns.data();
    opt.n_history = (int32_t)turns.size();
    if (stream < 0) stream = isatty(STDOUT_FILENO) && !as_json;

    ecso_engine *engine = nullptr;
    ecso_status rc = ecso_open(&cfg, &engine);
    if (rc != ECSO_OK) return die(ecso_last_error(), exit_code(rc));
    ecso_image img;
    ecso_image_init(&img, sizeof img);
    img.kind = ECSO_IMAGE_PATH;
    img.path = image.c_str();
    ecso_result *result = nullptr;
    rc = ecso_run(engine, image.empty() ? nullptr : &img, query.c_str(), &opt, stream ? on_event : nullptr, nullptr,
                  &result);
    if (rc != ECSO_OK) {
        int code = exit_code(rc);
        std::string msg = ecso_last_error();
        ecso_free(engine);
        return die(msg, code);
    }
    if (stream) std::fputs("\n", stdout);
    if (as_json) std::printf("%s\n", ecso_result_json(result));
    else if (!stream) std::printf("%s\n", ecso_result_answer(result));
    ecso_result_free(result);
    ecso_free(engine);
    return 0;
}
