// Device helpers shared by the dispatch and combine kernels: system-scope
// acquire/release on peer-visible words, bounded spin-waits, error reporting.
//
// Memory-ordering rules of the protocol (PTX memory model, ISA 8.x, section
// "Memory Consistency Model"), in one place:
//  * Every signal is message passing: a writer makes data visible, then stores a
//    flag; a reader sees the flag, then reads the data. A release at .sys scope on
//    the flag store and an acquire at .sys scope on the flag load order it. .sys,
//    not .gpu: peers can be threads of another GPU (NVLink) or of another process
//    on this GPU (CUDA IPC), and .gpu scope only covers "the current program on
//    this device".
//  * There is no store-buffering (Dekker) pattern anywhere, so no fence.sc is
//    needed: fence.acq_rel (MEMBAR.ALL) is enough; fence.sc.sys (what
//    __threadfence_system() emits: MEMBAR.SC.SYS) is the slow one.
//  * Release is cumulative: a st.release.sys (or fence.acq_rel.sys + strong store)
//    orders every write that happens-before it, including other threads' writes
//    ordered before it by __syncthreads() (bar.sync synchronizes the CTA) and
//    earlier kernels' writes on the same stream. So one release store per flag,
//    after a barrier, publishes the whole block's writes: no separate fence.
#pragma once

#include <cstdint>
#include <cstdio>

#include "launch.h"
#include "watchdog_abi.h"
#include "workspace_layout.h"

namespace a2a {

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* ptr) {
  uint32_t value;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

// Store with release semantics at system scope (SASS: MEMBAR.ALL.SYS + STG.STRONG.SYS).
__device__ __forceinline__ void st_release_sys(uint32_t* ptr, uint32_t value) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys(uint32_t* ptr, uint32_t value) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Lightweight fences (MEMBAR.ALL.*): enough for release/acquire patterns.
__device__ __forceinline__ void fence_acq_rel_sys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

__device__ __forceinline__ void fence_acq_rel_gpu() {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint8_t* workspace_of(const CommonParams& p, int rank) {
  return reinterpret_cast<uint8_t*>(p.peer_workspaces[rank]);
}

__device__ __forceinline__ WorkspaceHeader* header_of(const CommonParams& p, int rank) {
  return reinterpret_cast<WorkspaceHeader*>(workspace_of(p, rank) + p.layout.header);
}

// First error wins; the record lives in host memory so the host can read it
// even while kernels are still running (or hung elsewhere).
__device__ inline void report_error(const CommonParams& p, int status, int peer, int phase,
                                    uint32_t epoch, int detail0, int detail1) {
  int32_t* rec = p.error_record;
  if (atomicCAS(rec + kErrStatus, 0, -1) != 0) return;  // someone else is (or was) writing
  rec[kErrRank] = p.rank;
  rec[kErrPeer] = peer;
  rec[kErrPhase] = phase;
  rec[kErrEpoch] = static_cast<int32_t>(epoch);
  rec[kErrDetail0] = detail0;
  rec[kErrDetail1] = detail1;
  __threadfence_system();
  atomicExch(rec + kErrStatus, status);
  __threadfence_system();
  printf("[a2a_one_sided] rank %d: error %d (peer %d, phase %s, epoch %u)\n", p.rank, status, peer,
         phase == 0 ? "dispatch" : "combine", epoch);
}

// How often a spinning wait reads the abort word. It lives in host memory (the
// watchdog thread writes it), so each read is a PCIe round trip (~1-2 us): never
// on every iteration, and never at all in a wait that ends within this time
// (every wait of a healthy step), so healthy steps pay nothing. Many waiters
// (combine: every block) poll at once while a peer is late; at this interval
// that stays a few million small reads per second, and a lost peer is seen
// within this time plus one read.
constexpr uint64_t kAbortPollNs = 20000;

__device__ __forceinline__ int32_t ld_volatile_sys(const int32_t* ptr) {
  int32_t value;
  asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

// The kernels' half of the abort: record kPeerLost (peer and reason from the
// abort word) and mark this rank's header so later launches return at entry.
__device__ inline void take_abort(const CommonParams& p, int waited_for, int phase, uint32_t epoch) {
  fence_acq_rel_sys();  // the watchdog wrote peer and reason before the state
  const int32_t lost_peer = ld_volatile_sys(p.abort_word + kAbortPeer);
  const int32_t reason = ld_volatile_sys(p.abort_word + kAbortReason);
  header_of(p, p.rank)->aborted = 1;
  report_error(p, kPeerLost, lost_peer, phase, epoch, reason, waited_for);
}

// True once a wait of this rank saw the abort word: a launch reads it at entry
// (beside the epoch it reads anyway, same cache line) and returns at once, so
// rounds queued behind a lost peer finish as no-ops instead of waiting.
__device__ __forceinline__ bool rank_aborted(const WorkspaceHeader* hdr) {
  return *reinterpret_cast<const volatile uint32_t*>(&hdr->aborted) != 0;
}

// Spin until *flag == expected, the process's abort word is raised (a peer was
// lost: see watchdog.h), or the timeout passes (the backstop when no watchdog
// runs, or it missed a hang). Returns false on abort or timeout (after
// recording it); the caller then gives up instead of hanging forever.
__device__ inline bool wait_flag(const CommonParams& p, const uint32_t* flag, uint32_t expected,
                                 int peer, int phase) {
  if (ld_acquire_sys(flag) == expected) return true;
  const uint64_t start = global_timer_ns();
  uint64_t next_poll = start + kAbortPollNs;
  while (true) {
    if (ld_acquire_sys(flag) == expected) return true;
    const uint64_t now = global_timer_ns();
    if (now >= next_poll) {
      next_poll = now + kAbortPollNs;
      // No abort word (0: raw op calls without a watchdog): the timeout only.
      if (p.abort_word != nullptr && ld_volatile_sys(p.abort_word + kAbortState) != 0) {
        take_abort(p, peer, phase, expected);
        return false;
      }
    }
    if (now - start > p.timeout_ns) {
      report_error(p, kTimeout, peer, phase, expected, static_cast<int>(ld_acquire_sys(flag)), 0);
      return false;
    }
  }
}

// Warp-wide OR of a 64-bit mask.
__device__ __forceinline__ uint64_t warp_or_u64(uint64_t value) {
  const uint32_t lo = __reduce_or_sync(0xffffffffu, static_cast<uint32_t>(value));
  const uint32_t hi = __reduce_or_sync(0xffffffffu, static_cast<uint32_t>(value >> 32));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// Called by every block after its share of the work; returns true in exactly
// one block, the last to arrive, after resetting the counter for the next launch.
// The caller of the last block then publishes every block's writes with release
// stores (see the rules at the top).
//
// One-block grids (every small batch) need no counter: the barrier alone orders
// the block's writes before the caller's release stores.
//
// Several blocks: each block's thread 0 makes the block's writes visible at
// system scope (fence.acq_rel.sys after the barrier: cumulative over the block)
// before counting itself, so the last block's release stores never overtake
// another block's NVLink writes. PTX alone would allow .gpu here (causality is
// transitive and release is cumulative); .sys keeps each block's remote writes
// performed at system scope before the count, as the kernels always did, at one
// fence per block off the one-block path. The last block's acquire fence
// (.gpu: the counter is on this GPU) orders the count before what it does next.
__device__ inline bool arrive_last_block(uint32_t* counter) {
  __shared__ bool is_last;
  __syncthreads();
  if (gridDim.x == 1) return true;
  if (threadIdx.x == 0) {
    fence_acq_rel_sys();
    const uint32_t previous = atomicAdd(counter, 1u);
    is_last = previous == gridDim.x - 1;
    if (is_last) {
      fence_acq_rel_gpu();
      *counter = 0;  // the next launch's atomics run after this kernel (stream order)
    }
  }
  __syncthreads();
  return is_last;
}

}  // namespace a2a
