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
// kPeerLost: the process's abort word was raised (watchdog.h: a peer's process
// died or its heartbeat stopped); peer = the lost rank, detail0 = the reason
// (PeerLostReason), detail1 = the peer this wait was for.
enum ErrorStatus : int {
  kOk = 0,
  kTimeout = 1,
  kRuntimeTokensMismatch = 2,
  kExpertIdOutOfRange = 3,
  kPeerLost = 4,
};

// A top-k id of -1 means "no expert for this slot": vLLM's routers write it for
// padding tokens (DP and CUDA-graph padding, VLLM_MOE_SKIP_PADDING). The slot is
// skipped without an error; any other id outside [0, num_experts) is an error.
constexpr int kNoExpert = -1;

struct CommonParams {
  int rank;
  int ep_size;
  int top_k;
  int num_experts;
  int num_local_tokens;     // T_r, may be 0
  int runtime_max_tokens;   // M_rt for this step: identical on every rank, >= every T_r
  uint64_t peer_workspaces[kMaxRanks];  // base address of every rank's workspace, as seen by this rank
  WorkspaceLayout layout;
  const int32_t* topk_ids;      // [T_r, top_k] global expert ids, or kNoExpert
  const int32_t* expert_owner;  // [num_experts] rank owning each (physical) expert
  int32_t* error_record;        // device alias of host-mapped int32[kErrorRecordSize]
  const int32_t* abort_word;    // device alias of the process's host-mapped abort word (watchdog.h)
  uint64_t timeout_ns;
  int phases;
  int max_blocks;           // grid cap; the launcher sizes the grid to the work below it
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

// Largest payload row: it decides how many pieces a token is cut into.
A2A_HOST_DEVICE inline int64_t largest_payload_row(const DispatchParams& dp) {
  int64_t largest = 0;
  for (int i = 0; i < dp.num_payloads; ++i) {
    largest = dp.payload_row_bytes[i] > largest ? dp.payload_row_bytes[i] : largest;
  }
  return largest;
}

// Work split: a token's row is cut into `pieces` contiguous spans, one warp per
// (token, piece). One warp per token left each lane a chain of dependent 16-byte
// loads (a 14 KB DeepSeek row: 28 in a row); at small token counts that chain,
// not bandwidth, set the time. Pieces fill the grid instead, never shorter than
// one unrolled pass of a warp (32 lanes x kVecsPerLanePass x 16 bytes).
constexpr int kVecsPerLanePass = 4;

A2A_HOST_DEVICE inline int64_t max_pieces_for_row(int64_t row_bytes) {
  const int64_t vecs = (row_bytes + 15) / 16;
  const int64_t per_pass = 32 * kVecsPerLanePass;
  const int64_t pieces = (vecs + per_pass - 1) / per_pass;
  return pieces < 1 ? 1 : pieces;
}

// Pieces per token when `total_warps` warps share `num_tokens` tokens: enough to
// give every warp work, never more than the row has passes.
A2A_HOST_DEVICE inline int64_t pieces_per_token(int64_t row_bytes, int64_t total_warps,
                                                int64_t num_tokens) {
  const int64_t most = max_pieces_for_row(row_bytes);
  const int64_t fill = num_tokens > 0 ? total_warps / num_tokens : most;
  return fill < 1 ? 1 : (fill > most ? most : fill);
}

// Half-open range of 16-byte (or 4-byte) vectors that `piece` of `pieces` covers in
// a row of `num_vecs` vectors; spans are whole multiples of a warp's width.
struct VecSpan {
  int64_t begin;
  int64_t end;
};
A2A_HOST_DEVICE inline VecSpan piece_span(int64_t num_vecs, int64_t pieces, int64_t piece) {
  int64_t span = (num_vecs + pieces - 1) / pieces;
  span = (span + 31) / 32 * 32;
  const int64_t begin = piece * span;
  const int64_t end = begin + span < num_vecs ? begin + span : num_vecs;
  return {begin, end};
}

// Blocks for `warps` warps of work: at least one (every launch takes part in the
// signalling, even with no tokens: seed 000), at most the caller's cap.
A2A_HOST_DEVICE inline int64_t grid_for_warps(int64_t warps, int threads_per_block,
                                              int max_blocks) {
  const int64_t warps_per_block = threads_per_block / 32;
  int64_t blocks = (warps + warps_per_block - 1) / warps_per_block;
  if (blocks > max_blocks) blocks = max_blocks;
  return blocks < 1 ? 1 : blocks;
}

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

// The largest block each kernel can launch with (its registers decide: the bf16
// combine needs more than 64 per thread, so 1024-thread blocks cannot run), or 0
// if the query failed. Python checks the configured block size against it.
int dispatch_max_threads_per_block();
int combine_max_threads_per_block();

}  // namespace a2a
