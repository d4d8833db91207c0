// fastmb._C: the operator schemas of the fused ops, and the Python module that loads them.
//
// Kernels register themselves per dispatch key in their own files (csrc/cpu/, csrc/cuda/);
// fake (meta) implementations and autograd formulas are registered from Python
// (fastmb/ops/), as in pytorch/extension-cpp. The reference backend defines the same schemas
// under the name suffix "_reference" (fastmb/ops/schemas.py); a test keeps the two in step.
#include <Python.h>
#include <torch/library.h>

#include "build_info.h"
#include "cpu/isa.h"
#include "forward_replay.h"
#include "output_cache.h"
#include "prepared_chain.h"
#include "slot_stamps.h"

TORCH_LIBRARY(fastmb, m) {
  // z = depthwise_conv(x), u = batch_norm(z), y = act(u). Returns (y, mean, var): the batch
  // statistics in training (var biased), the running statistics in eval; kept for backward.
  m.def(
      "dwconv_bn_act(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor? running_mean, Tensor? running_var, int[2] stride, int[] padding, "
      "int[2] dilation, float eps, bool training, str activation) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias); an entry whose output_mask
  // flag (x, weight, bn affine) is false is an empty tensor. In training, batch_sums (2, C), the
  // sums of dL/du and dL/du * x_hat over batch_count values, replaces the batch's own (a
  // synchronised batch norm's, over its process group).
  m.def(
      "dwconv_bn_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor mean, Tensor var, int[2] stride, int[] padding, "
      "int[2] dilation, float eps, bool training, str activation, bool[3] output_mask, Tensor? batch_sums=None, "
      "int batch_count=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // y = gate(fc2(act(fc1(mean_hw(x))))) * x, fc weights as (out, in) matrices.
  // Returns (y, pooled): pooled = mean_hw(x) in the compute dtype, kept for backward.
  m.def(
      "squeeze_excitation(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
      "Tensor? fc2_bias, str activation, str gate) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias).
  m.def(
      "squeeze_excitation_backward(Tensor grad_y, Tensor x, Tensor pooled, Tensor fc1_weight, "
      "Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, str activation, str gate) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // y = act(batch_norm(z)) in training (the batch's statistics) for z (N, C, H, W): the batch
  // norm of a pointwise or full conv. Returns (y, mean, var), var biased; kept for backward.
  // CPU only.
  m.def("batch_norm_act(Tensor z, Tensor? weight, Tensor? bias, float eps, str activation) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_z, grad_weight, grad_bias); an entry whose output_mask flag (z, affine) is
  // false is an empty tensor.
  m.def(
      "batch_norm_act_backward(Tensor grad_y, Tensor z, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, "
      "str activation, bool[2] output_mask) -> (Tensor, Tensor, Tensor)");
  // y = act(batch_norm(conv(x))) in training for a full conv over few input channels (the RGB
  // stem), z = conv(x) recomputed in every pass instead of stored. Returns (y, mean, var): y
  // channels_last, var biased. CPU only.
  m.def(
      "stem_conv_bn_act(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, int[] stride, int[] padding, "
      "int[] dilation, float eps, str activation) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_weight, grad_bn_weight, grad_bn_bias); x takes no gradient. An entry whose
  // output_mask flag (weight, affine) is false is an empty tensor.
  m.def(
      "stem_conv_bn_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, "
      "Tensor var, int[] stride, int[] padding, int[] dilation, float eps, str activation, bool[2] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // z = conv2d(x, weight) without groups or bias: the forward of training's convs that are
  // neither depthwise nor 1x1, returned channels_last. CPU only, float32.
  m.def("full_conv(Tensor x, Tensor weight, int[2] stride, int[] padding, int[2] dilation) -> Tensor");
  // dL/dx of full_conv from dL/dz, x of x_size (N, C_in, H, W); returned channels_last. CPU only,
  // float32.
  m.def(
      "full_conv_input_grad(Tensor grad_z, Tensor weight, int[4] x_size, int[2] stride, int[] padding, int[2] dilation) -> Tensor");
  // dL/dweight of conv2d(x, weight) (no groups, no bias) from dL/dz, z the conv's output:
  // (C_out, C_in, kH, kW) = weight_size, contiguous. CPU only.
  m.def(
      "conv_weight_grad(Tensor grad_z, Tensor x, int[4] weight_size, int[2] stride, int[] padding, int[2] dilation) -> Tensor");
  // An eval-mode batch norm folded into the conv before it: (weight * scale, beta - mean * scale)
  // per output channel, scale = bn_weight / sqrt(running_var + eps). CPU only.
  m.def(
      "fold_conv_bn(Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, Tensor running_var, float eps) "
      "-> (Tensor, Tensor)");
  // act(batch_norm(conv1x1(x))) in eval for channels_last x: one GEMM, then the batch norm and
  // the activation applied per output channel as each row of the output is in cache. CPU only.
  m.def(
      "conv1x1_bn_act(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, Tensor running_var, "
      "float eps, str activation) -> Tensor");
  // A MobileNet V2/V3 inverted-residual block in eval, float32 channels_last, CPU only:
  // y = act(project(se(dw(expand(x))))) [+ x] (the projection's activation: identity in V2/V3,
  // the pointwise conv's in a depthwise-separable block). The 1x1 convs' weights have their batch norms folded
  // and are packed in panels of 16 output channels, (ceil(out / 16), in, 16), zero-padded; the
  // depthwise conv's batch norm is a per-channel scale and shift; the depthwise weight
  // (C, 1, kH, kW) is read in place when stored taps-major (a view of a (kH * kW, C) tensor).
  // No expansion: expand_weight and expand_bias absent; no SE: the four fc tensors absent.
  // With a stem (a block without expansion): x is the image, the block's input is
  // act(conv(x, stem_weight) * stem_scale + stem_shift), computed as the block reads it.
  m.def(
      "inverted_residual(Tensor x, Tensor? expand_weight, Tensor? expand_bias, str expand_activation, Tensor dw_weight, "
      "Tensor dw_scale, Tensor dw_shift, int[2] stride, int[] padding, int[2] dilation, str dw_activation, "
      "Tensor? fc1_weight, Tensor? fc1_bias, Tensor? fc2_weight, Tensor? fc2_bias, str se_activation, str se_gate, "
      "Tensor project_weight, Tensor project_bias, bool residual, str project_activation=\"identity\", "
      "Tensor? stem_weight=None, Tensor? stem_scale=None, Tensor? stem_shift=None, int[2] stem_stride=[1, 1], "
      "int[2] stem_padding=[0, 0], int[2] stem_dilation=[1, 1], str stem_activation=\"identity\") -> Tensor");
  // Blocks one after another in one call, each as inverted_residual (the first may take a stem),
  // each one's output the next one's input. Per block, in order: 11 tensors (expand_weight,
  // expand_bias, dw_weight, dw_scale, dw_shift, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
  // project_weight, project_bias), 9 settings (stride h, w; padding top, bottom, left, right;
  // dilation h, w; residual 0 or 1) and 5 names (expand, depthwise and SE activations, the SE
  // gate, the projection's activation). With a stem and no blocks: the stem's output.
  m.def(
      "inverted_residual_chain(Tensor x, Tensor?[] tensors, int[] settings, str[] names, Tensor? stem_weight=None, "
      "Tensor? stem_scale=None, Tensor? stem_shift=None, int[2] stem_stride=[1, 1], int[2] stem_padding=[0, 0], "
      "int[2] stem_dilation=[1, 1], str stem_activation=\"identity\") -> Tensor");
  // A MobileNet's head in eval, float32 channels_last, CPU only: the last 1x1 conv (BN folded,
  // weight packed as inverted_residual's) + activation, global average pooling, then each linear
  // layer (weight (out, in)) + its activation. Returns (N, classes). fc1_by_groups, optional: the
  // first layer's weight again, by groups of 64 inputs, each packed as the 1x1 convs' weights
  // ((C / 64, ceil(out / 16), 64, 16): [q][p][k][l] = fc_weights[0][16p + l][64q + k], zero past
  // out): with it, one image runs that layer under the conv.
  m.def(
      "classifier_head(Tensor x, Tensor conv_weight, Tensor conv_bias, str conv_activation, Tensor[] fc_weights, "
      "Tensor[] fc_biases, str[] fc_activations, Tensor? fc1_by_groups=None) -> Tensor");
}

// Importing fastmb._C runs the static registrations above; the module itself carries how the
// extension was built, for fastmb.backends(), slot_stamps, the prepared chain and the memo's replay.
static PyObject* release_cached_outputs(PyObject*, PyObject*) { return PyLong_FromLongLong(fastmb::release_cached_outputs()); }

static PyMethodDef fastmb_methods[] = {
    {"slot_stamps", fastmb::slot_stamps, METH_VARARGS, "What (dict, key) slots hold: identities, tensor data and versions, as bytes."},
    {"dict_versions", fastmb::dict_versions, METH_VARARGS, "Each dict's version (PEP 509) as bytes, or None where there are none."},
    {"tensor_stamps", fastmb::tensor_stamps, METH_VARARGS, "Each tensor's data address and version counter, as bytes."},
    {"prepare_chain", fastmb::prepare_chain, METH_VARARGS, "fastmb::inverted_residual_chain's arguments, prepared once (a capsule)."},
    {"run_chain", fastmb::run_chain, METH_VARARGS, "run_chain(prepared, x): the prepared chain op on x."},
    {"prepare_replay", fastmb::prepare_replay, METH_VARARGS, "A ForwardMemo's op calls as one native call (a capsule)."},
    {"replay", fastmb::replay, METH_VARARGS, "replay(prepared, check, x): the memo's forward on x, or None where Python must decide."},
    {"replay_backend", fastmb::replay_backend, METH_VARARGS, "fastmb.dispatch's backend choices, for the replays."},
    {"release_cached_outputs", release_cached_outputs, METH_NOARGS, "Frees the idle blocks of the CPU output cache; returns the bytes."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef fastmb_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastmb_methods};

// The instruction set whose CPU kernel tables run (FASTMB_ISA may cap it): tests and reports.
static const char* cpu_isa_name() {
  switch (fastmb::cpu::cpu_isa()) {
    case fastmb::cpu::Isa::kAvx512: return "avx512";
    case fastmb::cpu::Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastmb_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "cuda_build", fastmb::cuda_build_status()) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", fastmb::cuda_archs()) < 0 ||
      PyModule_AddStringConstant(module, "cpu_isa", cpu_isa_name()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
