// What the watchdog thread (watchdog.h) and the kernels (device_utils.cuh)
// share: the abort word's fields and the reasons a peer counts as lost. Plain
// C++, no includes beyond <cstdint>, so nvcc and the host compiler both take it.
#pragma once

#include <cstdint>

namespace a2a {

// Why a peer counts as lost (the abort word's reason, A2APeerLostError.reason).
enum PeerLostReason : int32_t {
  kLostNone = 0,
  kLostProcessGone = 1,   // its process no longer exists (or is a zombie)
  kLostHeartbeat = 2,     // its heartbeat stopped for longer than the interval
  kLostRaisedByHost = 3,  // raised by hand (AbortWord.raise_lost, tests)
};

// The abort word: int32[kAbortWordSize] in pinned host memory (one per process,
// shared by every all-to-all of its pool). The watchdog writes peer and reason,
// then the state with a release store; a kernel that reads state != 0 reads
// the other two after an acquire.
enum AbortField : int {
  kAbortState = 0,   // 0: running; 1: a peer was lost
  kAbortPeer = 1,    // the lost peer's EP rank
  kAbortReason = 2,  // PeerLostReason
  kAbortWordSize = 4,
};

}  // namespace a2a
