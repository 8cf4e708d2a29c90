// Which backend the Python registry (flexigpt_kernels/ops/backends.py) has selected for CPU
// calls, as the op kernels of flexigpt_kernels._C see it. The registry pushes its decision with
// torch.ops.flexigpt._set_native_routes(cpu, env) together with the FLEXIGPT_BACKEND value it
// resolved with; a kernel finding another value in the environment treats the selection as
// unknown and hands the call to Python (its _py twin op), which resolves again and pushes.
//
// An op kernel of the library that honours the selection does:
//   if (flexigpt::cpp_selected()) { ...C++ kernel... } else { ...call the op's _py twin... }
// The state is one per shared library (an inline function's static: every translation unit of
// _C shares it).
#pragma once

#include <cstdlib>
#include <mutex>
#include <string>

namespace flexigpt {

struct NativeRoutes {
  std::mutex mu;
  bool cpu = false;  // the selection resolves CPU calls to the C++ kernels
  std::string env;   // the FLEXIGPT_BACKEND value that decision was made for ("" when unset)
};

inline NativeRoutes& native_routes() {
  static NativeRoutes r;
  return r;
}

inline void set_native_routes(bool cpu, std::string env) {
  auto& r = native_routes();
  std::lock_guard<std::mutex> lock(r.mu);
  r.cpu = cpu;
  r.env = std::move(env);
}

// Whether CPU calls run the C++ kernels now (dtype checks are the caller's).
inline bool cpp_selected() {
  const char* env = std::getenv("FLEXIGPT_BACKEND");
  auto& r = native_routes();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.cpu && r.env == (env != nullptr ? env : "");
}

}  // namespace flexigpt
