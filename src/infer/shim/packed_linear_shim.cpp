// convoflow's packed fp32 Linear layers on CPU through oneDNN (libtorch's MKLDNN backend), which
// tch 0.24 does not bind: `mkldnn::_reorder_linear_weight` reorders a [out, in] weight once into
// oneDNN's blocked layout, `mkldnn::_linear_pointwise` then runs x·Wᵀ + b with an optional fused
// activation (gelu erf/tanh, relu) — the ops PyTorch's own CPU compiler (inductor, with frozen
// weights) emits for Linear. Reached through the dispatcher by name, boxed, like the int8 shim.
// Every entry point catches C++ exceptions and reports them as a message.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "shim_error.h"

namespace {
using convoflow_shim::set_error;

const c10::OperatorHandle& reorder_weight() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_linear_weight", "");
  return op;
}

const c10::OperatorHandle& linear_pointwise() {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  return op;
}
}  // namespace

extern "C" {

// 1 when libtorch was built with oneDNN (MKLDNN) and the CPU can run it.
int cf_packed_available() {
  return at::hasMKLDNN() ? 1 : 0;
}

// `out` receives `weight` ([out, in], converted to fp32 on CPU) in oneDNN's layout for inputs of
// about `batch_hint` rows (0: no hint); the result computes the same for any row count. Returns
// 0, or 1 with the message in `err`.
int cf_packed_reorder(const void* weight, int64_t batch_hint, void* out, char* err, size_t errlen) {
  try {
    at::NoGradGuard no_grad;
    auto w = static_cast<const at::Tensor*>(weight)->to(at::kCPU, at::kFloat).contiguous();
    std::vector<c10::IValue> stack{w, batch_hint > 0 ? c10::IValue(batch_hint) : c10::IValue()};
    reorder_weight().callBoxed(&stack);
    *static_cast<at::Tensor*>(out) = stack.at(0).toTensor();
    return 0;
  } catch (const std::exception& e) {
    set_error(e, err, errlen);
    return 1;
  }
}

// out = activation(input · packedᵀ + bias): `input` fp32 [..., in] (contiguous), `packed` from
// cf_packed_reorder, `bias` fp32 [out] or null; `attr` "none", "gelu" or "relu"; `algorithm`
// "none" (erf) or "tanh" for gelu, "" otherwise. Returns 0, or 1 with the message in `err`.
int cf_packed_linear(const void* input, const void* packed, const void* bias, const char* attr, const char* algorithm,
                     void* out, char* err, size_t errlen) {
  try {
    at::NoGradGuard no_grad;
    const auto& x = *static_cast<const at::Tensor*>(input);
    const auto& w = *static_cast<const at::Tensor*>(packed);
    c10::IValue b = bias == nullptr ? c10::IValue() : c10::IValue(*static_cast<const at::Tensor*>(bias));
    std::vector<c10::IValue> stack{x.contiguous(), w, b, std::string(attr), c10::List<std::optional<at::Scalar>>(),
                                   std::string(algorithm)};
    linear_pointwise().callBoxed(&stack);
    *static_cast<at::Tensor*>(out) = stack.at(0).toTensor();
    return 0;
  } catch (const std::exception& e) {
    set_error(e, err, errlen);
    return 1;
  }
}
}
