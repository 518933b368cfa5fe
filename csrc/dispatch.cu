// One-sided dispatch: every rank writes its tokens straight into the receive
// slots [sender, token] of the ranks that own their experts, then raises one
// flag per peer; a receiver waits until every sender's flag carries this epoch.
//
// Work unit: one warp per token slot t < runtime_max_tokens.
//  * routing header (every slot, every rank): top-k ids sanitized for the
//    receiving rank (ids it does not own and all ids of empty slots become that
//    rank's padding id) and the matching weights (0 where padded). Written to
//    all ranks so receivers never read stale ids and need no sanitize pass.
//  * payload rows (real tokens only): each row is read once and stored to each
//    *distinct* target rank.
//
// Signalling (fixed cost at small batches): the last block (the only block of a
// small batch) raises one release flag per peer and waits for every peer's flag.
// A fused launch (send + wait in one kernel) skips its own flag: its own slots
// were written by this very grid, ordered by the barrier / block counter, and
// later kernels on the stream see them by stream order. With one rank that
// leaves no flag, fence or wait at all.
#include <cuda_runtime.h>

#include "device_utils.cuh"
#include "launch.h"

namespace a2a {
namespace {

constexpr int kPhaseIdDispatch = 0;
// Loads one pass (kVecsPerLanePass vectors per lane) of a row starting at `base`.
template <typename Vec>
__device__ __forceinline__ void load_pass(const Vec* src_vec, int64_t base, int64_t end, int lane,
                                          Vec (&chunk)[kVecsPerLanePass]) {
#pragma unroll
  for (int u = 0; u < kVecsPerLanePass; ++u) {
    const int64_t v = base + u * 32 + lane;
    if (v < end) chunk[u] = src_vec[v];
  }
}

// Copies vectors [span.begin, span.end) of one row to every rank in `targets`:
// each lane loads kVecsPerLanePass vectors (all in flight at once), then stores
// them to each target. `first_pass` holds the first pass when the caller loaded
// it early (`first_pass_loaded`), so its latency overlapped the routing loads.
template <typename Vec>
__device__ __forceinline__ void copy_span_to_targets(const uint8_t* src, VecSpan span,
                                                     const CommonParams& p, uint64_t targets,
                                                     int64_t dst_offset, int lane,
                                                     const Vec (&first_pass)[kVecsPerLanePass],
                                                     bool first_pass_loaded) {
  const Vec* src_vec = reinterpret_cast<const Vec*>(src);
  for (int64_t base = span.begin; base < span.end; base += 32 * kVecsPerLanePass) {
    Vec chunk[kVecsPerLanePass];
    if (first_pass_loaded && base == span.begin) {
#pragma unroll
      for (int u = 0; u < kVecsPerLanePass; ++u) chunk[u] = first_pass[u];
    } else {
      load_pass(src_vec, base, span.end, lane, chunk);
    }
    uint64_t remaining = targets;
    while (remaining) {
      const int rank = __ffsll(static_cast<long long>(remaining)) - 1;
      remaining &= remaining - 1;
      Vec* dst = reinterpret_cast<Vec*>(workspace_of(p, rank) + dst_offset);
#pragma unroll
      for (int u = 0; u < kVecsPerLanePass; ++u) {
        const int64_t v = base + u * 32 + lane;
        if (v < span.end) dst[v] = chunk[u];
      }
    }
  }
}

// Padding id of `rank` from two per-lane registers holding pad_ids[lane] and
// pad_ids[lane + 32] (loaded once, beside the routing loads): every lane must call.
__device__ __forceinline__ int pad_id_of(int rank, int pad_lo, int pad_hi) {
  const int lo = __shfl_sync(0xffffffffu, pad_lo, rank & 31);
  const int hi = __shfl_sync(0xffffffffu, pad_hi, rank & 31);
  return rank < 32 ? lo : hi;
}

// `aborted`: this rank's abort mark, read at kernel entry and first used here,
// after the routing and payload loads are in flight, so its latency hides
// behind theirs (a check before the first load would add a round trip to
// every dispatch). An aborted round sends nothing.
__device__ void send_tokens(const DispatchParams& dp, bool aborted) {
  const CommonParams& p = dp.common;
  const int lane = threadIdx.x % 32;
  const int warps_per_block = blockDim.x / 32;
  const int global_warp = blockIdx.x * warps_per_block + threadIdx.x / 32;
  const int total_warps = gridDim.x * warps_per_block;
  const int k = p.top_k;
  const int64_t sender_slot_base = int64_t(p.rank) * p.runtime_max_tokens;
  // Real tokens are cut into pieces; empty slots (t >= T_r) only get a header,
  // written by the warp of piece 0.
  const int64_t pieces = pieces_per_token(largest_payload_row(dp), total_warps, p.num_local_tokens);
  const int64_t units = int64_t(p.runtime_max_tokens) * pieces;
  // Independent of the token: loaded once, before the dependent routing loads.
  static_assert(kMaxRanks <= 64, "pad ids travel in two registers per lane");
  const int pad_lo = lane < p.ep_size ? dp.pad_ids[lane] : 0;
  const int pad_hi = lane + 32 < p.ep_size ? dp.pad_ids[lane + 32] : 0;
  // Payload 0 (the hidden states, the largest row) in 16-byte vectors: its first
  // pass is loaded before the routing (ids -> owner) so both latencies overlap.
  const int64_t row0_bytes = dp.num_payloads > 0 ? dp.payload_row_bytes[0] : 0;
  const bool row0_vec16 = dp.num_payloads > 0 && row0_bytes % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(dp.payloads[0]) % 16 == 0;

  for (int64_t unit = global_warp; unit < units; unit += total_warps) {
    const int t = static_cast<int>(unit / pieces);
    const int64_t piece = unit % pieces;
    const bool real = t < p.num_local_tokens;
    if (!real && piece != 0) continue;
    int expert = -1;
    int owner = -1;
    float weight = 0.f;
    float loaded_weight = 0.f;
    if (real && lane < k) {
      expert = p.topk_ids[int64_t(t) * k + lane];
      if (dp.topk_weights != nullptr) loaded_weight = dp.topk_weights[int64_t(t) * k + lane];
    }
    uint4 first_pass[kVecsPerLanePass];
    const bool first_pass_loaded = real && row0_vec16;
    if (first_pass_loaded) {
      const VecSpan span0 = piece_span(row0_bytes / 16, pieces, piece);
      load_pass(reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(dp.payloads[0]) +
                                               int64_t(t) * row0_bytes),
                span0.begin, span0.end, lane, first_pass);
    }
    if (aborted) return;  // warp-uniform: every lane read the same word
    if (real && lane < k) {
      if (expert >= 0 && expert < p.num_experts) {
        owner = p.expert_owner[expert];
        weight = loaded_weight;
      } else if (expert != kNoExpert && piece == 0) {
        // Python validates ids before launch when asked to; this keeps memory safe
        // (and says so) when it was not.
        report_error(p, kExpertIdOutOfRange, -1, kPhaseIdDispatch, 0, expert, t);
      }
    }
    const uint64_t targets = warp_or_u64(owner >= 0 ? (1ull << owner) : 0ull);

    // Routing header: lane j covers (rank j / k, slot j % k) for all ranks.
    const int64_t header_index = (sender_slot_base + t) * k;
    // Every lane takes part in the shuffles, so the loop bound is warp-uniform.
    for (int j0 = 0; piece == 0 && j0 < p.ep_size * k; j0 += 32) {
      const int j = j0 + lane;
      const int slot = j % k;
      const int src_expert = __shfl_sync(0xffffffffu, expert, slot);
      const int src_owner = __shfl_sync(0xffffffffu, owner, slot);
      const float src_weight = __shfl_sync(0xffffffffu, weight, slot);
      const int pad = pad_id_of(j < p.ep_size * k ? j / k : 0, pad_lo, pad_hi);
      if (j < p.ep_size * k) {
        const int rank = j / k;
        const bool local_to_rank = src_owner == rank;
        uint8_t* ws = workspace_of(p, rank);
        reinterpret_cast<int32_t*>(ws + p.layout.recv_topk_ids)[header_index + slot] =
            local_to_rank ? src_expert : pad;
        reinterpret_cast<float*>(ws + p.layout.recv_topk_weights)[header_index + slot] =
            local_to_rank ? src_weight : 0.f;
      }
    }

    if (!real || targets == 0) continue;
    for (int i = 0; i < dp.num_payloads; ++i) {
      const int64_t row_bytes = dp.payload_row_bytes[i];
      const uint8_t* src = static_cast<const uint8_t*>(dp.payloads[i]) + int64_t(t) * row_bytes;
      const int64_t dst_offset = p.layout.payload[i] + (sender_slot_base + t) * row_bytes;
      const bool aligned16 = (row_bytes % 16 == 0) &&
                             (reinterpret_cast<uintptr_t>(dp.payloads[i]) % 16 == 0);
      if (aligned16) {
        copy_span_to_targets<uint4>(src, piece_span(row_bytes / 16, pieces, piece), p, targets,
                                    dst_offset, lane, first_pass, i == 0 && first_pass_loaded);
      } else {
        const uint32_t no_first_pass[kVecsPerLanePass] = {};
        copy_span_to_targets<uint32_t>(src, piece_span(row_bytes / 4, pieces, piece), p, targets,
                                       dst_offset, lane, no_first_pass, false);
      }
    }
  }
}

// Tells every peer that this rank's slots in its workspace are complete. Called
// by the last block after the barrier in arrive_last_block(): the release store
// (cumulative) publishes every block's payload and header writes, and orders the
// runtime-tokens word before the flag. `skip_self`: a fused launch needs no flag
// for its own slots (see the top of the file).
__device__ void raise_dispatch_flags(const CommonParams& p, uint32_t epoch, bool skip_self) {
  for (int peer = threadIdx.x; peer < p.ep_size; peer += blockDim.x) {
    if (skip_self && peer == p.rank) continue;
    WorkspaceHeader* hdr = header_of(p, peer);
    st_relaxed_sys(&hdr->sender_runtime_tokens[p.rank], static_cast<uint32_t>(p.runtime_max_tokens));
    st_release_sys(&hdr->dispatch_flags[p.rank], epoch);
  }
}

__device__ void wait_for_senders(const CommonParams& p, uint32_t epoch, bool skip_self) {
  WorkspaceHeader* hdr = header_of(p, p.rank);
  for (int sender = threadIdx.x; sender < p.ep_size; sender += blockDim.x) {
    if (skip_self && sender == p.rank) continue;
    if (!wait_flag(p, &hdr->dispatch_flags[sender], epoch, sender, kPhaseIdDispatch)) continue;
    const uint32_t theirs = hdr->sender_runtime_tokens[sender];
    if (theirs != static_cast<uint32_t>(p.runtime_max_tokens)) {
      report_error(p, kRuntimeTokensMismatch, sender, kPhaseIdDispatch, epoch,
                   static_cast<int>(theirs), p.runtime_max_tokens);
    }
  }
  __syncthreads();  // every wait is over before the epoch moves on
  if (threadIdx.x == 0) hdr->dispatch_epoch = epoch;
}

__global__ void dispatch_kernel(const __grid_constant__ DispatchParams dp) {
  const CommonParams& p = dp.common;
  WorkspaceHeader* my_hdr = header_of(p, p.rank);
  // Stable for the whole launch: only the last block's wait phase advances it,
  // after every block has read it (each read it before arriving at the counter).
  const uint32_t epoch = *reinterpret_cast<volatile uint32_t*>(&my_hdr->dispatch_epoch) + 1;
  // A peer was lost (an earlier wait of this rank saw the abort word): a no-op
  // that sends nothing, raises no flag and waits for nobody. Grid-uniform: only a
  // wait phase sets the mark, and in a launch with a send phase that runs after
  // every block arrived. Blocks still count themselves (arrive_last_block), so
  // the block counter stays right for the next launch.
  const bool aborted = rank_aborted(my_hdr);
  const bool fused = (p.phases & kPhaseSend) && (p.phases & kPhaseWait);

  if (p.phases & kPhaseSend) {
    send_tokens(dp, aborted);
    if (!arrive_last_block(&my_hdr->dispatch_blocks_done) || aborted) return;
    raise_dispatch_flags(p, epoch, fused);
  }
  if (aborted) return;
  if (p.phases & kPhaseWait) {
    if ((p.phases & kPhaseSend) == 0 && blockIdx.x != 0) return;
    wait_for_senders(p, epoch, fused);
  }
}

}  // namespace

int launch_dispatch(const DispatchParams& params, cudaStream_t stream) {
  const CommonParams& c = params.common;
  int64_t blocks = 1;  // wait-only launches: one block
  if (c.phases & kPhaseSend) {
    // Enough warps for every empty slot's header and every piece of every real token.
    const int64_t pieces = int64_t(c.num_local_tokens) * max_pieces_for_row(largest_payload_row(params));
    const int64_t warps = pieces > c.runtime_max_tokens ? pieces : c.runtime_max_tokens;
    blocks = grid_for_warps(warps, c.threads_per_block, c.max_blocks);
  }
  dispatch_kernel<<<static_cast<int>(blocks), c.threads_per_block, 0, stream>>>(params);
  return static_cast<int>(cudaGetLastError());
}

int dispatch_max_threads_per_block() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, dispatch_kernel) != cudaSuccess) return 0;
  return attr.maxThreadsPerBlock;
}

}  // namespace a2a
