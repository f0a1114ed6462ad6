// Shared by the CPU shims: every extern "C" entry point catches C++ exceptions and reports them
// as a NUL-terminated message in the caller's buffer (src/infer/mod.rs `shim_message` reads it).
#pragma once

#include <cstddef>
#include <cstdio>
#include <exception>

namespace convoflow_shim {
inline void set_error(const std::exception& e, char* err, size_t errlen) {
  if (err != nullptr && errlen > 0) {
    std::snprintf(err, errlen, "%s", e.what());
  }
}
}  // namespace convoflow_shim
