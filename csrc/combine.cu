// One-sided combine: each rank's experts leave their reduced outputs in its own
// workspace ([sender, token] slots, zero-copy). After a barrier (every rank
// raises a flag in every peer), each sender pulls, for each of its tokens, the
// partial results from the token's distinct target ranks and sums them in fp32.
//
// Epoch: combine never advances an epoch of its own. Dispatch and combine
// alternate strictly on every rank (the host state machine), so a combine's
// epoch is the epoch of the dispatch it completes: dispatch_epoch, which the
// dispatch kernel set before this launch started (stream order) and no block of
// this launch changes. So no block needs to know which block finishes last:
// no grid-wide counter, no fence at the end. combine_epoch is only a count of
// completed combines (tests, statistics), stored by block 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_utils.cuh"
#include "launch.h"

namespace a2a {
namespace {

constexpr int kPhaseIdCombine = 1;

// 16 bytes of T <-> 4 / 8 / 8 fp32 accumulators.
template <typename T>
struct Pack;
template <>
struct Pack<float> {
  static constexpr int kElems = 4;
  __device__ static void add(const uint4& v, float* acc) {
    acc[0] += __uint_as_float(v.x);
    acc[1] += __uint_as_float(v.y);
    acc[2] += __uint_as_float(v.z);
    acc[3] += __uint_as_float(v.w);
  }
  __device__ static uint4 store(const float* acc) {
    return make_uint4(__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]),
                      __float_as_uint(acc[3]));
  }
};
template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ static void add(const uint4& v, float* acc) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static uint4 store(const float* acc) {
    uint4 out;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return out;
  }
};
template <>
struct Pack<__half> {
  static constexpr int kElems = 8;
  __device__ static void add(const uint4& v, float* acc) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static uint4 store(const float* acc) {
    uint4 out;
    __half2* h = reinterpret_cast<__half2*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(acc[2 * i], acc[2 * i + 1]);
    return out;
  }
};

int64_t combine_dtype_bytes(CombineDtype dtype) {
  return dtype == CombineDtype::kFloat32 ? 4 : 2;
}

__device__ void raise_combine_flags(const CommonParams& p, uint32_t epoch) {
  // The experts' writes to our combine region happened in earlier kernels of this
  // stream: they happen-before this store, and a release is cumulative, so the
  // release alone orders them before peers can see the flag. Our own flag is
  // never read (wait_for_peers skips it: our input is ready by stream order).
  for (int peer = threadIdx.x; peer < p.ep_size; peer += blockDim.x) {
    if (peer == p.rank) continue;
    st_release_sys(&header_of(p, peer)->combine_flags[p.rank], epoch);
  }
}

// Every block waits for itself: no block depends on another block of this launch,
// only on peers' flags (raised by the peers' first block).
__device__ bool wait_for_peers(const CommonParams& p, uint32_t epoch) {
  if (p.ep_size == 1) return true;  // nobody to wait for (block-uniform)
  __shared__ int timed_out;
  if (threadIdx.x == 0) timed_out = 0;
  __syncthreads();
  WorkspaceHeader* hdr = header_of(p, p.rank);
  for (int peer = threadIdx.x; peer < p.ep_size; peer += blockDim.x) {
    if (peer == p.rank) continue;  // our own combine input is ready by stream order
    if (!wait_flag(p, &hdr->combine_flags[peer], epoch, peer, kPhaseIdCombine)) timed_out = 1;
  }
  __syncthreads();
  return timed_out == 0;
}

// One warp per (token, piece). Each pass a lane keeps kVecsPerLanePass vectors of
// fp32 sums and walks the token's target ranks, loading that many vectors of each
// at once; ranks are summed in ascending order, so the result does not depend on
// the work split. (An earlier version held one vector of every target in
// registers, uint4[16]: 141 registers for bf16, one block per SM.)
//
// Small batches (each warp has one unit: latency-bound) load the first pass of
// this rank's own partial before the routing loads (ids -> owner) return: it is
// our own workspace, always mapped and already final (stream order), so the load
// is safe whether or not this rank turns out to be a target; when it is (always,
// at one rank), the chain ids -> owner -> partial loses its last step.
template <typename T>
__device__ void reduce_tokens(const CombineParams& cp) {
  const CommonParams& p = cp.common;
  const int lane = threadIdx.x % 32;
  const int warps_per_block = blockDim.x / 32;
  const int global_warp = blockIdx.x * warps_per_block + threadIdx.x / 32;
  const int total_warps = gridDim.x * warps_per_block;
  const int k = p.top_k;
  const int64_t row_bytes = int64_t(cp.hidden_size) * sizeof(T);
  const int64_t num_vecs = row_bytes / 16;
  constexpr int kElems = Pack<T>::kElems;
  constexpr int kPass = kVecsPerLanePass;
  const int64_t pieces = pieces_per_token(row_bytes, total_warps, p.num_local_tokens);
  const int64_t units = int64_t(p.num_local_tokens) * pieces;
  const bool preload_own = units <= total_warps;  // grid-uniform

  for (int64_t unit = global_warp; unit < units; unit += total_warps) {
    const int t = static_cast<int>(unit / pieces);
    const VecSpan span = piece_span(num_vecs, pieces, unit % pieces);
    const int64_t slot_offset =
        p.layout.combine + (int64_t(p.rank) * p.runtime_max_tokens + t) * row_bytes;
    int expert = -1;
    if (lane < k) expert = p.topk_ids[int64_t(t) * k + lane];
    uint4 own_first[kPass];
    if (preload_own) {
      const uint4* own = reinterpret_cast<const uint4*>(workspace_of(p, p.rank) + slot_offset);
#pragma unroll
      for (int u = 0; u < kPass; ++u) {
        const int64_t v = span.begin + lane + u * 32;
        if (v < span.end) own_first[u] = own[v];
      }
    }
    int owner = -1;
    if (lane < k && expert >= 0 && expert < p.num_experts) owner = p.expert_owner[expert];
    const uint64_t targets = warp_or_u64(owner >= 0 ? (1ull << owner) : 0ull);
    uint4* dst = reinterpret_cast<uint4*>(static_cast<uint8_t*>(cp.output) + int64_t(t) * row_bytes);
    for (int64_t base = span.begin + lane; base < span.end; base += 32 * kPass) {
      const bool first_pass = base == span.begin + lane;
      float acc[kPass][kElems];
#pragma unroll
      for (int u = 0; u < kPass; ++u) {
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[u][e] = 0.f;
      }
      uint64_t remaining = targets;
      while (remaining) {
        const int rank = __ffsll(static_cast<long long>(remaining)) - 1;
        remaining &= remaining - 1;
        uint4 loaded[kPass];
        if (preload_own && first_pass && rank == p.rank) {
#pragma unroll
          for (int u = 0; u < kPass; ++u) loaded[u] = own_first[u];
        } else {
          const uint4* src = reinterpret_cast<const uint4*>(workspace_of(p, rank) + slot_offset);
#pragma unroll
          for (int u = 0; u < kPass; ++u) {
            if (base + u * 32 < span.end) loaded[u] = src[base + u * 32];
          }
        }
#pragma unroll
        for (int u = 0; u < kPass; ++u) {
          if (base + u * 32 < span.end) Pack<T>::add(loaded[u], acc[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kPass; ++u) {
        if (base + u * 32 < span.end) dst[base + u * 32] = Pack<T>::store(acc[u]);
      }
    }
  }
}

template <typename T>
__global__ void combine_kernel(const __grid_constant__ CombineParams cp) {
  const CommonParams& p = cp.common;
  WorkspaceHeader* my_hdr = header_of(p, p.rank);
  const uint32_t epoch = *reinterpret_cast<volatile uint32_t*>(&my_hdr->dispatch_epoch);
  // A peer was lost: a no-op (blocks are independent here, so a block that sees
  // the mark another block of this launch just set may leave too).
  if (rank_aborted(my_hdr)) return;

  if ((p.phases & kPhaseSend) && blockIdx.x == 0) raise_combine_flags(p, epoch);
  if (!(p.phases & kPhaseWait)) return;
  const bool ready = wait_for_peers(p, epoch);
  if (ready) reduce_tokens<T>(cp);
  if (blockIdx.x == 0 && threadIdx.x == 0) my_hdr->combine_epoch = epoch;
}

}  // namespace

int launch_combine(const CombineParams& params, cudaStream_t stream) {
  const CommonParams& c = params.common;
  const int threads = c.threads_per_block;
  int64_t blocks = 1;  // signal-only launches: one block
  if (c.phases & kPhaseWait) {
    const int64_t row_bytes = int64_t(params.hidden_size) * combine_dtype_bytes(params.dtype);
    blocks = grid_for_warps(int64_t(c.num_local_tokens) * max_pieces_for_row(row_bytes), threads,
                            c.max_blocks);
  }
  switch (params.dtype) {
    case CombineDtype::kFloat32:
      combine_kernel<float><<<static_cast<int>(blocks), threads, 0, stream>>>(params);
      break;
    case CombineDtype::kFloat16:
      combine_kernel<__half><<<static_cast<int>(blocks), threads, 0, stream>>>(params);
      break;
    case CombineDtype::kBFloat16:
      combine_kernel<__nv_bfloat16><<<static_cast<int>(blocks), threads, 0, stream>>>(params);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

int combine_max_resident_blocks(int device, int threads_per_block) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  // The dtype instantiations use different register counts; the bound must hold
  // for whichever one runs, so take the smallest occupancy.
  const void* kernels[] = {reinterpret_cast<const void*>(combine_kernel<float>),
                           reinterpret_cast<const void*>(combine_kernel<__half>),
                           reinterpret_cast<const void*>(combine_kernel<__nv_bfloat16>)};
  int per_sm = 1 << 30;
  for (const void* kernel : kernels) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads_per_block, 0) !=
        cudaSuccess) {
      return 0;
    }
    per_sm = blocks < per_sm ? blocks : per_sm;
  }
  return sms * per_sm;
}

int combine_max_threads_per_block() {
  const void* kernels[] = {reinterpret_cast<const void*>(combine_kernel<float>),
                           reinterpret_cast<const void*>(combine_kernel<__half>),
                           reinterpret_cast<const void*>(combine_kernel<__nv_bfloat16>)};
  int most = 1 << 30;
  for (const void* kernel : kernels) {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return 0;
    most = attr.maxThreadsPerBlock < most ? attr.maxThreadsPerBlock : most;
  }
  return most;
}

}  // namespace a2a
