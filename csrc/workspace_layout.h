// Workspace layout of one EP rank: the single source of truth for every offset.
//
// Every rank allocates a workspace of the same size and carves it the same way,
// so a sender can compute the address of any receive slot in a peer's workspace
// from (peer base pointer + offset). Python never repeats these offsets: it asks
// the `a2a_one_sided::workspace_layout` op, which calls `make_workspace_layout`.
//
// Plain C++ (host and device): compiled by nvcc for the kernels and by the host
// compiler for the CPU-only build of the extension.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define A2A_HOST_DEVICE __host__ __device__
#else
#define A2A_HOST_DEVICE
#endif

namespace a2a {

// Limits enforced before launch (Python and TORCH_CHECK) and sized into the header.
constexpr int kMaxRanks = 64;      // one bit per rank in a uint64 target mask
constexpr int kMaxPayloads = 8;    // payload pointers travel by value in the kernel params
constexpr int kMaxTopK = 16;       // one lane per top-k slot in half a warp
constexpr int kMaxExperts = 4096;  // owner table lives in global memory; only bounds validation
constexpr int64_t kRegionAlign = 128;

// Signalling words. Peers write the per-sender arrays; only this rank writes the
// rest. Flags hold the epoch (1, 2, ...) of the operation they complete, so they
// never need resetting and stay correct under CUDA-graph replay.
struct alignas(128) WorkspaceHeader {
  uint32_t dispatch_flags[kMaxRanks];         // [sender] epoch whose payloads sender finished writing here
  uint32_t combine_flags[kMaxRanks];          // [peer] epoch at which peer's combine input became readable
  uint32_t sender_runtime_tokens[kMaxRanks];  // [sender] runtime max tokens per rank the sender used
  uint32_t dispatch_epoch;                    // dispatches this rank completed; also the epoch of
                                              // the combine that completes the round (combine.cu)
  uint32_t combine_epoch;                     // combines this rank completed (a count, not a protocol word)
  uint32_t dispatch_blocks_done;              // blocks of the running dispatch launch that finished sending
  uint32_t aborted;                           // nonzero once a wait of this rank saw the abort word:
                                              // later launches return at entry (recover() zeroes it)
};

struct WorkspaceSpec {
  int32_t ep_size;
  int32_t max_tokens_per_rank;  // capacity M: every region is sized for [ep_size, M] slots
  int32_t top_k;
  int32_t num_payloads;
  int64_t payload_row_bytes[kMaxPayloads];  // bytes of one token of dispatch payload i
  int64_t combine_row_bytes;                // bytes of one token of combine input
};

struct WorkspaceLayout {
  int64_t header;             // WorkspaceHeader
  int64_t recv_topk_ids;      // int32 [ep_size, M, top_k], sanitized ids of every sender's slots
  int64_t recv_topk_weights;  // float32 [ep_size, M, top_k], 0 where the id is the padding id
  int64_t payload[kMaxPayloads];  // bytes [ep_size, M, payload_row_bytes[i]]
  int64_t combine;            // bytes [ep_size, M, combine_row_bytes], experts' reduced outputs
  int64_t total_bytes;
};

// Number of int64 values `workspace_layout` returns to Python:
// header, ids, weights, payload[0..n), combine, total.
A2A_HOST_DEVICE inline int layout_vector_size(int num_payloads) { return 5 + num_payloads; }

A2A_HOST_DEVICE inline int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Regions are laid out with the capacity M; at run time the slots of one step are
// packed with the step's runtime max tokens M_rt <= M, so [ep_size, M_rt, ...]
// views are contiguous and fit inside the region.
A2A_HOST_DEVICE inline WorkspaceLayout make_workspace_layout(const WorkspaceSpec& spec) {
  WorkspaceLayout layout{};
  const int64_t slots = int64_t(spec.ep_size) * spec.max_tokens_per_rank;
  int64_t cursor = 0;
  layout.header = cursor;
  cursor = align_up(cursor + int64_t(sizeof(WorkspaceHeader)), kRegionAlign);
  layout.recv_topk_ids = cursor;
  cursor = align_up(cursor + slots * spec.top_k * 4, kRegionAlign);
  layout.recv_topk_weights = cursor;
  cursor = align_up(cursor + slots * spec.top_k * 4, kRegionAlign);
  for (int i = 0; i < kMaxPayloads; ++i) {
    layout.payload[i] = cursor;
    if (i < spec.num_payloads) {
      cursor = align_up(cursor + slots * spec.payload_row_bytes[i], kRegionAlign);
    }
  }
  layout.combine = cursor;
  cursor = align_up(cursor + slots * spec.combine_row_bytes, kRegionAlign);
  layout.total_bytes = cursor;
  return layout;
}

}  // namespace a2a
