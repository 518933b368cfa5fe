// Torch op registration for the one-sided all-to-all: turns tensors into the
// plain structs of launch.h after checking them. Python (vllm_a2a_plugin/ops.py)
// validates first with friendlier messages; these checks are the last guard
// before a kernel gets a pointer.
//
// Built two ways: with CUDA (A2A_WITH_CUDA) it registers every op; without, only
// the layout op and the schemas, so CPU-only installs still share the layout and
// torch.compile can trace the ops through their fake implementations.
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "launch.h"
#include "watchdog.h"
#include "workspace_layout.h"

#ifdef A2A_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

// The digest of the sources this library was built from (setup.py passes
// -DA2A_SOURCES_DIGEST=<hex>), as a marker string that ops.py finds in the file
// before loading it: a library an editable install left beside sources edited
// since is built anew instead of loaded. JIT builds need no marker (their build
// directory is named by the digest).
#ifndef A2A_SOURCES_DIGEST
#define A2A_SOURCES_DIGEST unknown
#endif
#define A2A_STRINGIFY_INNER(x) #x
#define A2A_STRINGIFY(x) A2A_STRINGIFY_INNER(x)
extern "C" __attribute__((used, visibility("default"))) const char a2a_sources_digest_marker[] =
    "A2A_SOURCES_DIGEST=" A2A_STRINGIFY(A2A_SOURCES_DIGEST) ";";

namespace a2a {
namespace {

WorkspaceSpec make_spec(int64_t ep_size, int64_t max_tokens_per_rank, int64_t top_k,
                        c10::IntArrayRef payload_row_bytes, int64_t combine_row_bytes) {
  TORCH_CHECK(ep_size >= 1 && ep_size <= kMaxRanks, "ep_size (", ep_size, ") must be in [1, ",
              kMaxRanks, "]");
  TORCH_CHECK(max_tokens_per_rank >= 0, "max_tokens_per_rank (", max_tokens_per_rank,
              ") must be >= 0");
  TORCH_CHECK(top_k >= 1 && top_k <= kMaxTopK, "top_k (", top_k, ") must be in [1, ", kMaxTopK, "]");
  TORCH_CHECK(static_cast<int64_t>(payload_row_bytes.size()) <= kMaxPayloads, "at most ",
              kMaxPayloads, " payloads, got ", payload_row_bytes.size());
  TORCH_CHECK(combine_row_bytes >= 0 && combine_row_bytes % 16 == 0, "combine_row_bytes (",
              combine_row_bytes, ") must be a non-negative multiple of 16");
  WorkspaceSpec spec{};
  spec.ep_size = static_cast<int32_t>(ep_size);
  spec.max_tokens_per_rank = static_cast<int32_t>(max_tokens_per_rank);
  spec.top_k = static_cast<int32_t>(top_k);
  spec.num_payloads = static_cast<int32_t>(payload_row_bytes.size());
  for (size_t i = 0; i < payload_row_bytes.size(); ++i) {
    TORCH_CHECK(payload_row_bytes[i] > 0 && payload_row_bytes[i] % 4 == 0, "payload ", i,
                " row bytes (", payload_row_bytes[i], ") must be a positive multiple of 4");
    spec.payload_row_bytes[i] = payload_row_bytes[i];
  }
  spec.combine_row_bytes = combine_row_bytes;
  return spec;
}

std::vector<int64_t> workspace_layout(int64_t ep_size, int64_t max_tokens_per_rank, int64_t top_k,
                                      c10::IntArrayRef payload_row_bytes, int64_t combine_row_bytes) {
  const WorkspaceSpec spec =
      make_spec(ep_size, max_tokens_per_rank, top_k, payload_row_bytes, combine_row_bytes);
  const WorkspaceLayout layout = make_workspace_layout(spec);
  std::vector<int64_t> out;
  out.reserve(layout_vector_size(spec.num_payloads));
  out.push_back(layout.header);
  out.push_back(layout.recv_topk_ids);
  out.push_back(layout.recv_topk_weights);
  for (int i = 0; i < spec.num_payloads; ++i) out.push_back(layout.payload[i]);
  out.push_back(layout.combine);
  out.push_back(layout.total_bytes);
  return out;
}

// Byte offsets of the header fields, so Python tests can read flags and epochs
// without repeating the struct.
std::vector<int64_t> header_field_offsets() {
  return {
      static_cast<int64_t>(offsetof(WorkspaceHeader, dispatch_flags)),
      static_cast<int64_t>(offsetof(WorkspaceHeader, combine_flags)),
      static_cast<int64_t>(offsetof(WorkspaceHeader, sender_runtime_tokens)),
      static_cast<int64_t>(offsetof(WorkspaceHeader, dispatch_epoch)),
      static_cast<int64_t>(offsetof(WorkspaceHeader, combine_epoch)),
      static_cast<int64_t>(offsetof(WorkspaceHeader, aborted)),
      static_cast<int64_t>(sizeof(WorkspaceHeader)),
  };
}

std::vector<int64_t> limits() { return {kMaxRanks, kMaxPayloads, kMaxTopK, kMaxExperts}; }

#ifdef A2A_WITH_CUDA

int64_t row_bytes_of(const at::Tensor& t) {
  int64_t row = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) row *= t.size(d);
  return row;
}

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the workspace is on ", device);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// What stays fixed between calls of one rank's all-to-all: checked once per
// launch plan (and on every call of the unplanned ops).
CommonParams make_static_common(const at::Tensor& workspace, c10::IntArrayRef peer_ptrs,
                                int64_t rank, const at::Tensor& expert_owner,
                                int64_t error_record_ptr, int64_t abort_word_ptr,
                                const WorkspaceSpec& spec,
                                int64_t max_blocks, int64_t threads_per_block, int64_t timeout_ns) {
  const at::Device device = workspace.device();
  TORCH_CHECK(workspace.is_cuda() && workspace.scalar_type() == at::kByte && workspace.dim() == 1,
              "workspace must be a 1-D uint8 CUDA tensor");
  const WorkspaceLayout layout = make_workspace_layout(spec);
  TORCH_CHECK(workspace.numel() >= layout.total_bytes, "workspace has ", workspace.numel(),
              " bytes but this spec needs ", layout.total_bytes);
  TORCH_CHECK(static_cast<int64_t>(peer_ptrs.size()) == spec.ep_size, "peer_ptrs has ",
              peer_ptrs.size(), " entries for ep_size ", spec.ep_size);
  TORCH_CHECK(rank >= 0 && rank < spec.ep_size, "rank (", rank, ") must be in [0, ", spec.ep_size, ")");
  TORCH_CHECK(peer_ptrs[rank] == reinterpret_cast<int64_t>(workspace.data_ptr()),
              "peer_ptrs[rank] must be this rank's workspace");
  check_cuda_tensor(expert_owner, "expert_owner", device);
  TORCH_CHECK(expert_owner.scalar_type() == at::kInt && expert_owner.dim() == 1 &&
                  expert_owner.numel() >= 1 && expert_owner.numel() <= kMaxExperts,
              "expert_owner must be int32 [num_experts] with num_experts in [1, ", kMaxExperts, "]");
  TORCH_CHECK(error_record_ptr != 0, "error_record_ptr must be a device address from "
              "error_record_device_address()");
  TORCH_CHECK(threads_per_block >= 32 && threads_per_block <= 1024 && threads_per_block % 32 == 0,
              "threads_per_block (", threads_per_block, ") must be a multiple of 32 in [32, 1024]");
  TORCH_CHECK(timeout_ns > 0, "timeout_ns must be positive");
  TORCH_CHECK(max_blocks >= 1, "max_blocks (", max_blocks, ") must be >= 1");

  CommonParams p{};
  p.rank = static_cast<int>(rank);
  p.ep_size = spec.ep_size;
  p.top_k = spec.top_k;
  p.num_experts = static_cast<int>(expert_owner.numel());
  for (int r = 0; r < spec.ep_size; ++r) p.peer_workspaces[r] = static_cast<uint64_t>(peer_ptrs[r]);
  p.layout = layout;
  p.expert_owner = expert_owner.data_ptr<int32_t>();
  p.error_record = reinterpret_cast<int32_t*>(error_record_ptr);
  // 0: no abort word (raw op calls without a watchdog); waits then end only
  // when the peer arrives or the timeout passes.
  p.abort_word = reinterpret_cast<const int32_t*>(abort_word_ptr);
  p.timeout_ns = static_cast<uint64_t>(timeout_ns);
  p.max_blocks = static_cast<int>(max_blocks);
  p.threads_per_block = static_cast<int>(threads_per_block);
  return p;
}

// What changes on every call: this step's tokens, their ids, the phases.
void set_call(CommonParams& p, const at::Tensor& topk_ids, const at::Device& device,
              const WorkspaceSpec& spec, int64_t runtime_max_tokens, int64_t phases) {
  check_cuda_tensor(topk_ids, "topk_ids", device);
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt && topk_ids.dim() == 2 &&
                  topk_ids.size(1) == spec.top_k,
              "topk_ids must be int32 [num_tokens, ", spec.top_k, "], got ", topk_ids.scalar_type(),
              " ", topk_ids.sizes());
  const int64_t num_tokens = topk_ids.size(0);
  TORCH_CHECK(runtime_max_tokens >= num_tokens && runtime_max_tokens <= spec.max_tokens_per_rank,
              "runtime_max_tokens (", runtime_max_tokens, ") must be >= num_tokens (", num_tokens,
              ") and <= the workspace's max_tokens_per_rank (", spec.max_tokens_per_rank, ")");
  TORCH_CHECK(phases >= 1 && phases <= 3, "phases must be 1, 2 or 3");
  p.num_local_tokens = static_cast<int>(num_tokens);
  p.runtime_max_tokens = static_cast<int>(runtime_max_tokens);
  p.topk_ids = topk_ids.data_ptr<int32_t>();
  p.phases = static_cast<int>(phases);
}

// Payload rows, router weights and padding ids of one dispatch. Row sizes are
// taken from the payloads: the unplanned op derives its spec from them, and the
// planned one has checked each payload against its plan's row form first.
void set_dispatch_inputs(DispatchParams& dp, at::TensorList payloads,
                         const std::optional<at::Tensor>& topk_weights, const at::Tensor& topk_ids,
                         const at::Tensor& pad_ids, const at::Device& device) {
  check_cuda_tensor(pad_ids, "pad_ids", device);
  TORCH_CHECK(pad_ids.scalar_type() == at::kInt && pad_ids.numel() == dp.common.ep_size,
              "pad_ids must be int32 [ep_size]");
  dp.pad_ids = pad_ids.data_ptr<int32_t>();
  if (topk_weights.has_value()) {
    check_cuda_tensor(*topk_weights, "topk_weights", device);
    TORCH_CHECK(topk_weights->scalar_type() == at::kFloat && topk_weights->sizes() == topk_ids.sizes(),
                "topk_weights must be float32 with the shape of topk_ids");
    dp.topk_weights = topk_weights->data_ptr<float>();
  }
  dp.num_payloads = static_cast<int>(payloads.size());
  for (size_t i = 0; i < payloads.size(); ++i) {
    check_cuda_tensor(payloads[i], "payload", device);
    TORCH_CHECK(payloads[i].dim() >= 1 && payloads[i].size(0) == topk_ids.size(0), "payload ", i,
                " has ", payloads[i].size(0), " rows but topk_ids has ", topk_ids.size(0));
    const int64_t row = row_bytes_of(payloads[i]);
    dp.payloads[i] = payloads[i].data_ptr();
    dp.payload_row_bytes[i] = row;
  }
}

// Combine's destination: [num_tokens, hidden] of a float type, 16-byte aligned.
void set_combine_output(CombineParams& cp, at::Tensor& out, const at::Tensor& topk_ids,
                        const at::Device& device) {
  check_cuda_tensor(out, "out", device);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == topk_ids.size(0), "out must be [num_tokens, hidden]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0, "out must be 16-byte aligned");
  switch (out.scalar_type()) {
    case at::kFloat: cp.dtype = CombineDtype::kFloat32; break;
    case at::kHalf: cp.dtype = CombineDtype::kFloat16; break;
    case at::kBFloat16: cp.dtype = CombineDtype::kBFloat16; break;
    default: TORCH_CHECK(false, "combine supports float32, float16 and bfloat16, got ", out.scalar_type());
  }
  cp.hidden_size = static_cast<int>(out.size(1));
  cp.output = out.data_ptr();
}

void dispatch(at::Tensor& workspace, c10::IntArrayRef peer_ptrs, int64_t rank,
              at::TensorList payloads, const at::Tensor& topk_ids,
              const std::optional<at::Tensor>& topk_weights, const at::Tensor& expert_owner,
              const at::Tensor& pad_ids, int64_t error_record_ptr, int64_t max_tokens_per_rank,
              int64_t runtime_max_tokens, int64_t combine_row_bytes, int64_t phases,
              int64_t max_blocks, int64_t threads_per_block, int64_t timeout_ns,
              int64_t abort_word_ptr) {
  const c10::cuda::CUDAGuard guard(workspace.device());
  std::vector<int64_t> row_bytes;
  for (const at::Tensor& payload : payloads) row_bytes.push_back(row_bytes_of(payload));
  const WorkspaceSpec spec = make_spec(static_cast<int64_t>(peer_ptrs.size()), max_tokens_per_rank,
                                       topk_ids.dim() == 2 ? topk_ids.size(1) : 0, row_bytes,
                                       combine_row_bytes);
  DispatchParams dp{};
  dp.common = make_static_common(workspace, peer_ptrs, rank, expert_owner, error_record_ptr,
                                 abort_word_ptr, spec, max_blocks, threads_per_block,
                                 timeout_ns);
  set_call(dp.common, topk_ids, workspace.device(), spec, runtime_max_tokens, phases);
  set_dispatch_inputs(dp, payloads, topk_weights, topk_ids, pad_ids, workspace.device());
  const int err = launch_dispatch(dp, at::cuda::getCurrentCUDAStream(workspace.device().index()));
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

void combine(at::Tensor& workspace, c10::IntArrayRef peer_ptrs, int64_t rank,
             const at::Tensor& topk_ids, const at::Tensor& expert_owner, at::Tensor& out,
             int64_t error_record_ptr, int64_t max_tokens_per_rank, int64_t runtime_max_tokens,
             c10::IntArrayRef payload_row_bytes, int64_t phases, int64_t max_blocks,
             int64_t threads_per_block, int64_t timeout_ns, int64_t abort_word_ptr) {
  const c10::cuda::CUDAGuard guard(workspace.device());
  TORCH_CHECK(out.dim() == 2, "out must be [num_tokens, hidden]");
  const WorkspaceSpec spec =
      make_spec(static_cast<int64_t>(peer_ptrs.size()), max_tokens_per_rank,
                topk_ids.dim() == 2 ? topk_ids.size(1) : 0, payload_row_bytes,
                out.size(1) * out.element_size());
  CombineParams cp{};
  cp.common = make_static_common(workspace, peer_ptrs, rank, expert_owner, error_record_ptr,
                                 abort_word_ptr, spec, max_blocks, threads_per_block,
                                 timeout_ns);
  set_call(cp.common, topk_ids, workspace.device(), spec, runtime_max_tokens, phases);
  set_combine_output(cp, out, topk_ids, workspace.device());
  const int err = launch_combine(cp, at::cuda::getCurrentCUDAStream(workspace.device().index()));
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

// ------------------------------------------------------------------ launch plans
// A launch plan holds one rank's fixed arguments, checked once, under an integer
// handle: the planned ops then take only what changes per call. Why: each
// argument costs the Python -> dispatcher boxing ~0.3-0.5 us (16 arguments with
// two int lists and a tensor list: ~8 us per call on a CPU host), which made the
// two op calls most of an eager round trip's host time.

// The dtype and row shape (sizes after the token dimension) that every call's
// tensor in one role (payload i, combine's out) must have, read once from a "like"
// tensor when the plan is made. The planned ops check their tensors against these,
// so a call needs no argument check in Python (OneSidedAllToAll runs its own,
// friendlier check only after the op refused).
struct RowForm {
  at::ScalarType dtype;
  std::vector<int64_t> row_shape;
};

RowForm row_form_of(const at::Tensor& like, const char* name) {
  TORCH_CHECK(like.dim() >= 1, name, " needs a token dimension");
  return {like.scalar_type(), like.sizes().slice(1).vec()};
}

void check_row_form(const at::Tensor& t, const RowForm& form, const char* name) {
  const int64_t row_dims = static_cast<int64_t>(form.row_shape.size());
  TORCH_CHECK(t.scalar_type() == form.dtype && t.dim() == 1 + row_dims &&
                  t.sizes().slice(1) == c10::IntArrayRef(form.row_shape),
              name, " must be ", form.dtype, " with rows of shape ", c10::IntArrayRef(form.row_shape),
              " (this plan's), got ", t.scalar_type(), " ", t.sizes());
}

struct LaunchPlan {
  WorkspaceSpec spec;
  CommonParams common;  // static fields only; set_call fills the rest per call
  void* workspace_data;
  at::Tensor expert_owner;  // the tables the kernels read, kept alive with the plan
  at::Tensor pad_ids;
  std::vector<RowForm> payload_forms;  // [spec.num_payloads]
  RowForm out_form;
};

struct PlanRegistry {
  std::mutex mutex;
  std::unordered_map<int64_t, std::shared_ptr<const LaunchPlan>> plans;
  int64_t next_id = 1;
};

PlanRegistry& plan_registry() {
  static PlanRegistry registry;
  return registry;
}

// `payload_like` (one per payload) and `out_like`: tensors with the dtype and row
// shape of every call's payloads and combine output (any number of rows, 0
// included; only their metadata is read).
int64_t make_launch_plan(const at::Tensor& workspace, c10::IntArrayRef peer_ptrs, int64_t rank,
                         const at::Tensor& expert_owner, const at::Tensor& pad_ids,
                         int64_t error_record_ptr, int64_t max_tokens_per_rank, int64_t top_k,
                         at::TensorList payload_like, const at::Tensor& out_like,
                         int64_t max_blocks, int64_t threads_per_block, int64_t timeout_ns,
                         int64_t abort_word_ptr) {
  auto plan = std::make_shared<LaunchPlan>();
  std::vector<int64_t> payload_row_bytes;
  for (const at::Tensor& like : payload_like) {
    plan->payload_forms.push_back(row_form_of(like, "payload_like"));
    payload_row_bytes.push_back(row_bytes_of(like));
  }
  plan->out_form = row_form_of(out_like, "out_like");
  TORCH_CHECK(out_like.dim() == 2, "out_like must be [rows, hidden]");
  plan->spec = make_spec(static_cast<int64_t>(peer_ptrs.size()), max_tokens_per_rank, top_k,
                         payload_row_bytes, row_bytes_of(out_like));
  plan->common = make_static_common(workspace, peer_ptrs, rank, expert_owner, error_record_ptr,
                                    abort_word_ptr, plan->spec, max_blocks,
                                    threads_per_block, timeout_ns);
  check_cuda_tensor(pad_ids, "pad_ids", workspace.device());
  TORCH_CHECK(pad_ids.scalar_type() == at::kInt && pad_ids.numel() == plan->spec.ep_size,
              "pad_ids must be int32 [ep_size]");
  plan->workspace_data = workspace.data_ptr();
  plan->expert_owner = expert_owner;
  plan->pad_ids = pad_ids;
  PlanRegistry& registry = plan_registry();
  const std::lock_guard<std::mutex> lock(registry.mutex);
  const int64_t id = registry.next_id++;
  registry.plans.emplace(id, std::move(plan));
  return id;
}

void free_launch_plan(int64_t id) {
  PlanRegistry& registry = plan_registry();
  const std::lock_guard<std::mutex> lock(registry.mutex);
  registry.plans.erase(id);
}

std::shared_ptr<const LaunchPlan> find_plan(int64_t id, const at::Tensor& workspace) {
  std::shared_ptr<const LaunchPlan> plan;
  {
    PlanRegistry& registry = plan_registry();
    const std::lock_guard<std::mutex> lock(registry.mutex);
    const auto it = registry.plans.find(id);
    TORCH_CHECK(it != registry.plans.end(), "launch plan ", id, " does not exist (freed, or "
                "never made by make_launch_plan)");
    plan = it->second;
  }
  TORCH_CHECK(workspace.is_cuda() && workspace.data_ptr() == plan->workspace_data,
              "workspace is not the one launch plan ", id, " was made for");
  return plan;
}

void dispatch_planned(int64_t plan_id, at::Tensor& workspace, const at::Tensor& x,
                      const std::optional<at::Tensor>& x_scales, const at::Tensor& topk_ids,
                      const std::optional<at::Tensor>& topk_weights, int64_t runtime_max_tokens,
                      int64_t phases) {
  const c10::cuda::CUDAGuard guard(workspace.device());
  const std::shared_ptr<const LaunchPlan> plan = find_plan(plan_id, workspace);
  DispatchParams dp{};
  dp.common = plan->common;
  set_call(dp.common, topk_ids, workspace.device(), plan->spec, runtime_max_tokens, phases);
  const at::Tensor payloads[2] = {x, x_scales.has_value() ? *x_scales : at::Tensor()};
  const at::TensorList payload_list(payloads, x_scales.has_value() ? 2 : 1);
  TORCH_CHECK(payload_list.size() == plan->payload_forms.size(), "this plan sends ",
              plan->payload_forms.size() == 2 ? "x and x_scales" : "x only", ", got ",
              payload_list.size(), " payloads");
  for (size_t i = 0; i < payload_list.size(); ++i) {
    check_row_form(payload_list[i], plan->payload_forms[i], i == 0 ? "x" : "x_scales");
  }
  set_dispatch_inputs(dp, payload_list, topk_weights, topk_ids, plan->pad_ids, workspace.device());
  const int err = launch_dispatch(dp, at::cuda::getCurrentCUDAStream(workspace.device().index()));
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

void combine_planned(int64_t plan_id, at::Tensor& workspace, const at::Tensor& topk_ids,
                     at::Tensor& out, int64_t runtime_max_tokens, int64_t phases) {
  const c10::cuda::CUDAGuard guard(workspace.device());
  const std::shared_ptr<const LaunchPlan> plan = find_plan(plan_id, workspace);
  CombineParams cp{};
  cp.common = plan->common;
  set_call(cp.common, topk_ids, workspace.device(), plan->spec, runtime_max_tokens, phases);
  check_row_form(out, plan->out_form, "out");
  set_combine_output(cp, out, topk_ids, workspace.device());
  const int err = launch_combine(cp, at::cuda::getCurrentCUDAStream(workspace.device().index()));
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

// Device alias of a pinned host tensor: kernels write errors there and the host
// reads them without a CUDA call. Passed to the ops as an int so compilers never
// functionalize (copy) it: it is an out-of-band channel, not a tensor value.
int64_t error_record_device_address(const at::Tensor& record) {
  TORCH_CHECK(record.device().is_cpu() && record.is_pinned() && record.scalar_type() == at::kInt &&
                  record.numel() >= kErrorRecordSize,
              "the error record must be a pinned int32 CPU tensor of ", kErrorRecordSize,
              " elements");
  void* device_ptr = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&device_ptr, record.data_ptr(), 0));
  return reinterpret_cast<int64_t>(device_ptr);
}

// The same for the process's abort word (watchdog_abi.h), which the kernels
// only read.
int64_t abort_word_device_address(const at::Tensor& word) {
  TORCH_CHECK(word.device().is_cpu() && word.is_pinned() && word.scalar_type() == at::kInt &&
                  word.numel() >= kAbortWordSize,
              "the abort word must be a pinned int32 CPU tensor of ", kAbortWordSize, " elements");
  void* device_ptr = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&device_ptr, word.data_ptr(), 0));
  return reinterpret_cast<int64_t>(device_ptr);
}

int64_t combine_max_resident_blocks_op(int64_t device, int64_t threads_per_block) {
  return combine_max_resident_blocks(static_cast<int>(device), static_cast<int>(threads_per_block));
}

int64_t max_threads_per_block_op(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const int dispatch_most = dispatch_max_threads_per_block();
  const int combine_most = combine_max_threads_per_block();
  return dispatch_most < combine_most ? dispatch_most : combine_most;
}

#endif  // A2A_WITH_CUDA

// ------------------------------------------------------------------ watchdog
// Watchdogs by handle (watchdog.h), in both builds: the thread is host code.

struct WatchdogRegistry {
  std::mutex mutex;
  std::unordered_map<int64_t, std::shared_ptr<PeerWatchdog>> watchdogs;
  int64_t next_id = 1;
};

WatchdogRegistry& watchdog_registry() {
  static WatchdogRegistry registry;
  return registry;
}

std::shared_ptr<PeerWatchdog> find_watchdog(int64_t id) {
  WatchdogRegistry& registry = watchdog_registry();
  const std::lock_guard<std::mutex> lock(registry.mutex);
  const auto it = registry.watchdogs.find(id);
  TORCH_CHECK(it != registry.watchdogs.end(), "watchdog ", id, " does not exist (stopped?)");
  return it->second;
}

int64_t watchdog_segment_bytes_op(int64_t num_ranks) {
  TORCH_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks (", num_ranks,
              ") must be in [1, ", kMaxRanks, "]");
  return watchdog_segment_bytes(num_ranks);
}

// `abort_word`: the process's int32[kAbortWordSize] CPU tensor (pinned where
// CUDA is present); the caller keeps it alive until watchdog_stop.
int64_t watchdog_start(const std::string& path, int64_t num_ranks, c10::IntArrayRef my_ranks,
                       const at::Tensor& abort_word, int64_t interval_ns, int64_t tick_ns,
                       int64_t exit_after_ns, int64_t end_parent_pid) {
  TORCH_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks (", num_ranks,
              ") must be in [1, ", kMaxRanks, "]");
  TORCH_CHECK(abort_word.device().is_cpu() && abort_word.scalar_type() == at::kInt &&
                  abort_word.is_contiguous() && abort_word.numel() >= kAbortWordSize,
              "abort_word must be a contiguous int32 CPU tensor of ", kAbortWordSize, " elements");
  TORCH_CHECK(interval_ns > 0 && tick_ns > 0 && tick_ns <= interval_ns,
              "need 0 < tick_ns (", tick_ns, ") <= interval_ns (", interval_ns, ")");
  TORCH_CHECK(exit_after_ns >= 0, "exit_after_ns (", exit_after_ns, ") must be >= 0");
  TORCH_CHECK(end_parent_pid >= 0, "end_parent_pid (", end_parent_pid, ") must be >= 0");
  std::vector<int> mine;
  for (const int64_t r : my_ranks) {
    TORCH_CHECK(r >= 0 && r < num_ranks, "rank ", r, " outside [0, ", num_ranks, ")");
    mine.push_back(static_cast<int>(r));
  }
  TORCH_CHECK(!mine.empty(), "a watchdog needs at least one rank of its own");
  std::shared_ptr<PeerWatchdog> watchdog;
  try {
    watchdog = std::make_shared<PeerWatchdog>(path, static_cast<int>(num_ranks), mine,
                                              abort_word.data_ptr<int32_t>(), interval_ns, tick_ns,
                                              exit_after_ns, end_parent_pid);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  WatchdogRegistry& registry = watchdog_registry();
  const std::lock_guard<std::mutex> lock(registry.mutex);
  const int64_t id = registry.next_id++;
  registry.watchdogs.emplace(id, std::move(watchdog));
  return id;
}

void watchdog_stop(int64_t id, bool depart) {
  std::shared_ptr<PeerWatchdog> watchdog;
  {
    WatchdogRegistry& registry = watchdog_registry();
    const std::lock_guard<std::mutex> lock(registry.mutex);
    const auto it = registry.watchdogs.find(id);
    if (it == registry.watchdogs.end()) return;  // stopping twice is fine
    watchdog = it->second;
    registry.watchdogs.erase(it);
  }
  watchdog->stop(depart);
}

void watchdog_pause(int64_t id, int64_t rank, bool paused) {
  const auto watchdog = find_watchdog(id);
  TORCH_CHECK(rank >= 0 && rank < kMaxRanks, "rank (", rank, ") out of range");
  watchdog->pause(static_cast<int>(rank), paused);
}

void watchdog_clear_group(int64_t id) { find_watchdog(id)->clear_group(); }
void watchdog_rearm(int64_t id) { find_watchdog(id)->rearm(); }
std::vector<int64_t> watchdog_state(int64_t id) { return find_watchdog(id)->state(); }

bool built_with_cuda() {
#ifdef A2A_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace a2a

TORCH_LIBRARY(a2a_one_sided, m) {
  m.def("workspace_layout(int ep_size, int max_tokens_per_rank, int top_k, int[] payload_row_bytes, "
        "int combine_row_bytes) -> int[]",
        &a2a::workspace_layout);
  m.def("header_field_offsets() -> int[]", &a2a::header_field_offsets);
  m.def("limits() -> int[]", &a2a::limits);
  m.def("built_with_cuda() -> bool", &a2a::built_with_cuda);
  m.def("watchdog_segment_bytes(int num_ranks) -> int", &a2a::watchdog_segment_bytes_op);
  m.def("watchdog_start(str path, int num_ranks, int[] my_ranks, Tensor abort_word, "
        "int interval_ns, int tick_ns, int exit_after_ns=0, int end_parent_pid=0) -> int",
        &a2a::watchdog_start);
  m.def("watchdog_stop(int watchdog, bool depart) -> ()", &a2a::watchdog_stop);
  m.def("watchdog_pause(int watchdog, int rank, bool paused) -> ()", &a2a::watchdog_pause);
  m.def("watchdog_clear_group(int watchdog) -> ()", &a2a::watchdog_clear_group);
  m.def("watchdog_rearm(int watchdog) -> ()", &a2a::watchdog_rearm);
  m.def("watchdog_state(int watchdog) -> int[]", &a2a::watchdog_state);
  m.def("dispatch(Tensor(a!) workspace, int[] peer_ptrs, int rank, Tensor[] payloads, "
        "Tensor topk_ids, Tensor? topk_weights, Tensor expert_owner, Tensor pad_ids, "
        "int error_record_ptr, int max_tokens_per_rank, int runtime_max_tokens, "
        "int combine_row_bytes, int phases, int max_blocks, int threads_per_block, "
        "int timeout_ns, int abort_word_ptr=0) -> ()");
  m.def("combine(Tensor(a!) workspace, int[] peer_ptrs, int rank, Tensor topk_ids, "
        "Tensor expert_owner, Tensor(b!) out, int error_record_ptr, int max_tokens_per_rank, "
        "int runtime_max_tokens, int[] payload_row_bytes, int phases, int max_blocks, "
        "int threads_per_block, int timeout_ns, int abort_word_ptr=0) -> ()");
  // The same two launches with a launch plan's fixed arguments (make_launch_plan).
  m.def("dispatch_planned(int plan, Tensor(a!) workspace, Tensor x, Tensor? x_scales, "
        "Tensor topk_ids, Tensor? topk_weights, int runtime_max_tokens, int phases) -> ()");
  m.def("combine_planned(int plan, Tensor(a!) workspace, Tensor topk_ids, Tensor(b!) out, "
        "int runtime_max_tokens, int phases) -> ()");
#ifdef A2A_WITH_CUDA
  m.def("make_launch_plan(Tensor workspace, int[] peer_ptrs, int rank, Tensor expert_owner, "
        "Tensor pad_ids, int error_record_ptr, int max_tokens_per_rank, int top_k, "
        "Tensor[] payload_like, Tensor out_like, int max_blocks, int threads_per_block, "
        "int timeout_ns, int abort_word_ptr=0) -> int",
        &a2a::make_launch_plan);
  m.def("free_launch_plan(int plan) -> ()", &a2a::free_launch_plan);
  m.def("combine_max_resident_blocks(int device, int threads_per_block) -> int",
        &a2a::combine_max_resident_blocks_op);
  m.def("error_record_device_address(Tensor record) -> int", &a2a::error_record_device_address);
  m.def("abort_word_device_address(Tensor word) -> int", &a2a::abort_word_device_address);
  m.def("max_threads_per_block(int device) -> int", &a2a::max_threads_per_block_op);
#endif
}

#ifdef A2A_WITH_CUDA
TORCH_LIBRARY_IMPL(a2a_one_sided, CUDA, m) {
  m.impl("dispatch", &a2a::dispatch);
  m.impl("combine", &a2a::combine);
  m.impl("dispatch_planned", &a2a::dispatch_planned);
  m.impl("combine_planned", &a2a::combine_planned);
}
#endif
