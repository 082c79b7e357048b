// Monotonic seconds, for step timings.
#pragma once

#include <chrono>

namespace ecso {

inline double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace ecso
