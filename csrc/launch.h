// Host launchers of the one-sided all-to-all kernels. Plain CUDA C++: no ATen,
// so nvcc can compile the kernels alone (tests/test_csrc_compiles.py does).
// The torch binding (bindings.cpp) validates tensors and fills these structs.
#pragma once

#include <cstdint>

#include "workspace_layout.h"

typedef struct CUstream_st* cudaStream_t;

namespace a2a {

// Bits of the `phases` argument. Fused launches (both bits) are what production
// uses; the split form lets one process drive several logical ranks on one GPU
// from one stream (send for every rank, then wait for every rank), so no launch
// ever spins on a kernel that has not started (design §8, compute-sanitizer).
constexpr int kPhaseSend = 1;  // dispatch: write payloads and raise flags; combine: raise flags
constexpr int kPhaseWait = 2;  // dispatch: wait for every sender; combine: wait, then reduce

// Error record in host-mapped pinned memory, written by the first failing thread
// so the host can read it without a CUDA call. Indices into an int32[8] array.
enum ErrorField : int {
  kErrStatus = 0,   // ErrorStatus
  kErrRank = 1,     // rank that saw the error
  kErrPeer = 2,     // peer it was waiting for (or -1)
  kErrPhase = 3,    // 0 = dispatch, 1 = combine
  kErrEpoch = 4,    // epoch of the failing operation
  kErrDetail0 = 5,  // status-specific detail (mismatch: peer's value; bad id: the id)
  kErrDetail1 = 6,  // status-specific detail (mismatch: our value; bad id: token index)
  kErrorRecordSize = 8,
};
enum ErrorStatus : int { kOk = 0, kTimeout = 1, kRuntimeTokensMismatch = 2, kExpertIdOutOfRange = 3 };

struct CommonParams {
  int rank;
  int ep_size;
  int top_k;
  int num_experts;
  int num_local_tokens;     // T_r, may be 0
  int runtime_max_tokens;   // M_rt for this step: identical on every rank, >= every T_r
  uint64_t peer_workspaces[kMaxRanks];  // base address of every rank's workspace, as seen by this rank
  WorkspaceLayout layout;
  const int32_t* topk_ids;      // [T_r, top_k] global expert ids
  const int32_t* expert_owner;  // [num_experts] rank owning each (physical) expert
  int32_t* error_record;        // device alias of host-mapped int32[kErrorRecordSize]
  uint64_t timeout_ns;
  int phases;
  int num_blocks;
  int threads_per_block;
};

struct DispatchParams {
  CommonParams common;
  const float* topk_weights;      // [T_r, top_k] or nullptr
  const int32_t* pad_ids;         // [ep_size] padding id of each receiving rank
  int num_payloads;
  const void* payloads[kMaxPayloads];  // [T_r, payload_row_bytes[i]] rows, contiguous
  int64_t payload_row_bytes[kMaxPayloads];
};

enum class CombineDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CombineParams {
  CommonParams common;
  CombineDtype dtype;
  int hidden_size;   // elements per token of the combine input and output
  void* output;      // [T_r, hidden_size] of dtype
};

// Both return cudaError_t as int so this header needs no CUDA include.
int launch_dispatch(const DispatchParams& params, cudaStream_t stream);
int launch_combine(const CombineParams& params, cudaStream_t stream);

// Combine blocks wait on peers, so several logical ranks sharing one GPU must
// keep all their combine grids resident at once: this is that bound (occupancy
// x SM count) for `threads_per_block`, or 0 if the query failed.
int combine_max_resident_blocks(int device, int threads_per_block);

}  // namespace a2a
