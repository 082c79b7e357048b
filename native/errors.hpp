// Errors of the native engine: a status code (ecso.h) and a one-line message that says what to do.
#pragma once

#include <stdexcept>
#include <string>

#include "ecso.h"

namespace ecso {

struct Error : std::runtime_error {
    ecso_status code;
    Error(ecso_status c, const std::string &msg) : std::runtime_error(msg), code(c) {}
};

inline Error input_error(const std::string &m) { return Error(ECSO_ERR_INPUT, m); }
inline Error image_error(const std::string &m) { return Error(ECSO_ERR_IMAGE, m); }
inline Error model_error(const std::string &m) { return Error(ECSO_ERR_MODEL, m); }
inline Error overflow_error(const std::string &m) { return Error(ECSO_ERR_CONTEXT_OVERFLOW, m); }
inline Error engine_error(const std::string &m) { return Error(ECSO_ERR_ENGINE, m); }

}  // namespace ecso
