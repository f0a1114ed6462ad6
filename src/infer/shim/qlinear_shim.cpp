// convoflow's int8 shim: dynamically quantized Linear layers on CPU through libtorch's own
// quantized kernels (fbgemm), which tch 0.24 does not bind: `quantized::linear_prepack` packs an
// int8 weight (per output channel, symmetric, no bias: src/infer/quant.rs adds it) once; `quantized::linear_dynamic`
// then quantizes each input to uint8 from its own min/max, runs the int8 GEMM and returns fp32 —
// the op behind torch.ao's dynamic quantization. Both are reached through the dispatcher by
// name, boxed, so no header of the packed-params class is needed. Every entry point catches C++
// exceptions and reports them as a message.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <vector>

#include "shim_error.h"

namespace {
using convoflow_shim::set_error;

const c10::OperatorHandle& linear_prepack() {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_prepack", "");
  return op;
}

const c10::OperatorHandle& linear_dynamic() {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
  return op;
}
}  // namespace

extern "C" {

// Packs `weight` ([out, in], any float dtype), without a bias, into int8 fbgemm packed
// params: one scale per output channel, zero point 0, values within [-63, 63] (7 bits): with
// 8-bit inputs fbgemm's AVX2 kernels sum pairs of u8 x s8 products in int16, and
// 2 x 255 x 63 < 32767 never saturates, while 8-bit inputs keep the activations (quantized per
// call over a whole batch, so the coarser of the two) at full precision. Returns an owned handle
// (free it with cf_qlinear_free) or null with the message in `err`.
void* cf_qlinear_prepack(const void* weight, char* err, size_t errlen) {
  try {
    const auto& w = *static_cast<const at::Tensor*>(weight);
    at::NoGradGuard no_grad;
    auto wf = w.to(at::kCPU, at::kFloat).contiguous();
    auto scales = wf.abs().amax({1}).div(63.0).clamp_min(1e-12).to(at::kDouble);
    auto zero_points = at::zeros({wf.size(0)}, at::dtype(at::kLong));
    auto qw = at::quantize_per_channel(wf, scales, zero_points, 0, at::kQInt8);
    std::vector<c10::IValue> stack{qw, std::optional<at::Tensor>()};
    linear_prepack().callBoxed(&stack);
    return new c10::IValue(std::move(stack.at(0)));
  } catch (const std::exception& e) {
    set_error(e, err, errlen);
    return nullptr;
  }
}

void cf_qlinear_free(void* packed) {
  delete static_cast<c10::IValue*>(packed);
}

// out = linear_dynamic(input, packed): `input` fp32 [..., in], `out` an existing tensor handle
// that receives the fp32 [..., out] result. `reduce_range` quantizes inputs to 7 bits instead of
// 8 (not needed with the 7-bit weights above).
int cf_qlinear_forward(const void* packed, const void* input, void* out, int reduce_range, char* err, size_t errlen) {
  try {
    const auto& params = *static_cast<const c10::IValue*>(packed);
    const auto& x = *static_cast<const at::Tensor*>(input);
    std::vector<c10::IValue> stack{x, params, reduce_range != 0};
    linear_dynamic().callBoxed(&stack);
    *static_cast<at::Tensor*>(out) = stack.at(0).toTensor();
    return 0;
  } catch (const std::exception& e) {
    set_error(e, err, errlen);
    return 1;
  }
}

// The quantized engine libtorch uses for the ops above (at::QEngine as an int).
int cf_qengine() {
  return static_cast<int>(at::globalContext().qEngine());
}
}
