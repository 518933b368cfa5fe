// Peer watchdog: a host thread per process that keeps this process's EP ranks'
// heartbeats going and watches every other rank of the group, in a shared-memory
// segment all ranks of the group map (EP groups of this backend are one node:
// the manager refuses internode groups, so host shared memory reaches every
// peer). A peer whose process is gone, or whose heartbeat stopped for longer
// than the interval, raises this process's abort word: host-mapped memory the
// kernels' spin-waits poll (device_utils.cuh wait_flag), so every waiting
// kernel leaves at once instead of waiting for its device timeout.
//
// A native thread, not a Python one: it must keep beating while Python holds
// the GIL for seconds (torch.compile, a long C call, graph capture), or a merely
// slow peer would look dead. It takes no lock the hot path takes and touches no
// CUDA state: the abort word is plain host memory.
//
// Plain C++ and POSIX (no ATen, no CUDA): part of the CPU-only build too, so
// the watchdog's logic is tested on machines without a GPU.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "watchdog_abi.h"

namespace a2a {

// The shared segment: a header line, then one line per EP rank. Every field a
// peer reads is a lock-free atomic of the host (the segment is shared between
// processes: std::atomic on a mapping of the same file is address-free for
// these sizes).
struct alignas(64) WatchdogGroupLine {
  uint32_t magic;
  uint32_t num_ranks;
  // 0, or (1 << 63) | (reason << 32) | peer: the first loss anyone saw, so every
  // survivor (and a stopped process when it resumes) agrees on one lost peer.
  std::atomic<uint64_t> lost;
};
enum SlotState : uint32_t { kSlotUnset = 0, kSlotAlive = 1, kSlotDeparted = 2 };
struct alignas(64) WatchdogSlot {
  std::atomic<uint64_t> heartbeat;  // incremented every tick by the owning process
  std::atomic<int64_t> pid;
  std::atomic<uint32_t> state;      // SlotState: departed ranks left on purpose
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared atomics must be lock-free");
constexpr uint32_t kWatchdogMagic = 0xA2A0D06u;
constexpr int kPeerLostExitCode = 75;  // EX_TEMPFAIL: the group must be rebuilt

inline int64_t watchdog_segment_bytes(int64_t num_ranks) {
  return static_cast<int64_t>(sizeof(WatchdogGroupLine)) +
         num_ranks * static_cast<int64_t>(sizeof(WatchdogSlot));
}

inline uint64_t pack_lost(int32_t peer, int32_t reason) {
  return (1ull << 63) | (static_cast<uint64_t>(static_cast<uint32_t>(reason)) << 32) |
         static_cast<uint32_t>(peer);
}

// True when `pid` is gone: no such process, or a zombie (killed but not yet
// reaped by its parent: kill(pid, 0) still succeeds for those).
inline bool process_gone(int64_t pid) {
  if (pid <= 0) return false;
  if (kill(static_cast<pid_t>(pid), 0) != 0) return errno == ESRCH;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%lld/stat", static_cast<long long>(pid));
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return false;  // no /proc: the heartbeat still catches it
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  // "pid (comm) S ...": the state follows the last ')' (comm may hold parentheses).
  const char* close = std::strrchr(buf, ')');
  if (close == nullptr || close[1] == '\0' || close[2] == '\0') return false;
  const char state = close[2];
  return state == 'Z' || state == 'X';
}

class PeerWatchdog {
 public:
  // `my_ranks`: the EP ranks this process drives (several for logical ranks on
  // one GPU). `abort_word`: host address of int32[kAbortWordSize].
  // `exit_after_ns` > 0: end this process (exit code kPeerLostExitCode) that long
  // after a loss nobody rearmed. For engines, whose step may block in a host
  // collective with the lost peer (a gloo all-reduce waits on a stopped peer
  // forever) where no kernel wait and no Python check of ours can end it; the
  // engine's front end then reports its dead engine. 0: never.
  // `end_parent_pid` > 0: when exiting so, end that process first if it is still
  // this process's parent: an engine process whose workers run the all-to-all
  // (vLLM's engine core) may itself wait in a host collective with the lost
  // peer's engine (its data-parallel all-reduce), where our exit cannot reach
  // it. SIGTERM, then SIGKILL if it is still there a second later. 0: never.
  PeerWatchdog(const std::string& path, int num_ranks, std::vector<int> my_ranks,
               int32_t* abort_word, int64_t interval_ns, int64_t tick_ns, int64_t exit_after_ns,
               int64_t end_parent_pid = 0)
      : num_ranks_(num_ranks),
        my_ranks_(std::move(my_ranks)),
        abort_word_(abort_word),
        interval_ns_(interval_ns),
        tick_ns_(tick_ns),
        exit_after_ns_(exit_after_ns),
        end_parent_pid_(static_cast<pid_t>(end_parent_pid)),
        paused_(num_ranks),
        mine_(num_ranks, false) {
    for (auto& p : paused_) p.store(false);
    const int fd = open(path.c_str(), O_RDWR);
    if (fd < 0) throw std::runtime_error("watchdog: cannot open " + path + ": " + std::strerror(errno));
    bytes_ = static_cast<size_t>(watchdog_segment_bytes(num_ranks));
    struct stat st {};
    if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(bytes_)) {
      close(fd);
      throw std::runtime_error("watchdog: segment " + path + " is smaller than " +
                               std::to_string(bytes_) + " bytes");
    }
    void* base = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);  // the mapping keeps the segment alive, also after it is unlinked
    if (base == MAP_FAILED) throw std::runtime_error(std::string("watchdog: mmap failed: ") + std::strerror(errno));
    base_ = static_cast<uint8_t*>(base);
    const int64_t pid = static_cast<int64_t>(getpid());
    for (int r : my_ranks_) {
      mine_[r] = true;
      slot(r)->pid.store(pid);
      slot(r)->state.store(kSlotAlive);
    }
    thread_ = std::thread([this] { run(); });
  }

  ~PeerWatchdog() { stop(/*depart=*/true); }

  // Stops the thread. `depart`: this process leaves on purpose (shutdown), so
  // peers stop watching its ranks instead of reporting them lost.
  void stop(bool depart) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
    }
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
    if (depart) {
      for (int r : my_ranks_) slot(r)->state.store(kSlotDeparted);
    }
    munmap(base_, bytes_);
    base_ = nullptr;
  }

  // Test hook: stop (or restart) the heartbeat of one of this process's ranks,
  // as if that rank's process had stopped; the other ranks then report it lost.
  void pause(int rank, bool paused) { paused_.at(rank).store(paused); }

  // Clears the group's loss word (one rank does it, between two barriers of
  // rearm(): every rank has stopped acting on the old loss before it is cleared).
  void clear_group() { group()->lost.store(0); }

  // Forgets this process's loss and restarts every peer's staleness clock; the
  // caller clears the abort word after this (the thread does not write it again
  // unless a new loss happens).
  void rearm() { rearm_.store(true); }

  // [group lost (0/1), lost peer, reason, ticks run, alive slots] for tests.
  std::vector<int64_t> state() const {
    const uint64_t lost = group()->lost.load();
    int64_t alive = 0;
    for (int r = 0; r < num_ranks_; ++r) alive += slot(r)->state.load() == kSlotAlive;
    return {static_cast<int64_t>(lost >> 63), static_cast<int64_t>(static_cast<int32_t>(lost & 0xffffffffu)),
            static_cast<int64_t>((lost >> 32) & 0x7fffffffu), ticks_.load(), alive};
  }

 private:
  WatchdogGroupLine* group() const { return reinterpret_cast<WatchdogGroupLine*>(base_); }
  WatchdogSlot* slot(int r) const {
    return reinterpret_cast<WatchdogSlot*>(base_ + sizeof(WatchdogGroupLine)) + r;
  }

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  void raise_abort(int32_t peer, int32_t reason) {
    // The group word first: survivors (and a stopped peer, when it resumes) adopt
    // the first loss anyone saw, so every rank names the same peer.
    uint64_t expected = 0;
    const uint64_t mine = pack_lost(peer, reason);
    if (!group()->lost.compare_exchange_strong(expected, mine)) {
      peer = static_cast<int32_t>(expected & 0xffffffffu);
      reason = static_cast<int32_t>((expected >> 32) & 0x7fffffffu);
    }
    set_abort_word(peer, reason);
  }

  void set_abort_word(int32_t peer, int32_t reason) {
    if (__atomic_load_n(&abort_word_[kAbortState], __ATOMIC_ACQUIRE) != 0) return;
    __atomic_store_n(&abort_word_[kAbortPeer], peer, __ATOMIC_RELAXED);
    __atomic_store_n(&abort_word_[kAbortReason], reason, __ATOMIC_RELAXED);
    __atomic_store_n(&abort_word_[kAbortState], 1, __ATOMIC_RELEASE);
    std::fprintf(stderr, "[a2a_one_sided] watchdog (pid %d): EP rank %d lost (%s); aborting this "
                 "process's all-to-all waits\n", static_cast<int>(getpid()), peer,
                 reason == kLostProcessGone ? "process gone"
                 : reason == kLostHeartbeat ? "heartbeat stopped" : "raised by host");
  }

  void run() {
    std::vector<uint64_t> last_beat(num_ranks_, 0);
    std::vector<int64_t> last_change(num_ranks_, now_ns());
    int64_t last_tick = now_ns();
    bool tripped = false;
    int64_t tripped_at = 0;
    while (!stop_.load()) {
      const int64_t now = now_ns();
      for (int r : my_ranks_) {
        if (!paused_[r].load()) slot(r)->heartbeat.fetch_add(1);
      }
      // This thread itself did not run for a whole interval (the process was
      // stopped, or the host starved it): it cannot judge peers over a window it
      // did not watch, so every clock restarts.
      const bool blind = now - last_tick > interval_ns_;
      if (blind || rearm_.exchange(false)) {
        for (int r = 0; r < num_ranks_; ++r) {
          last_beat[r] = slot(r)->heartbeat.load();
          last_change[r] = now;
        }
        if (!blind) {
          tripped = false;
          tripped_at = 0;
        }
      }
      last_tick = now;
      const uint64_t group_lost = group()->lost.load();
      if (!tripped && group_lost != 0) {
        set_abort_word(static_cast<int32_t>(group_lost & 0xffffffffu),
                       static_cast<int32_t>((group_lost >> 32) & 0x7fffffffu));
        tripped = true;
      }
      for (int r = 0; r < num_ranks_ && !tripped; ++r) {
        WatchdogSlot* s = slot(r);
        if (s->state.load() != kSlotAlive) continue;  // departed (or not yet started)
        const uint64_t beat = s->heartbeat.load();
        if (beat != last_beat[r]) {
          last_beat[r] = beat;
          last_change[r] = now;
        } else if (now - last_change[r] > interval_ns_) {
          raise_abort(r, kLostHeartbeat);
          tripped = true;
        }
        if (!tripped && !mine_[r] && process_gone(s->pid.load())) {
          raise_abort(r, kLostProcessGone);
          tripped = true;
        }
      }
      if (tripped && tripped_at == 0) tripped_at = now;
      if (tripped && exit_after_ns_ > 0 && now - tripped_at > exit_after_ns_) {
        std::fprintf(stderr, "[a2a_one_sided] watchdog (pid %d): EP rank %d was lost and this "
                     "process did not stop within %.1f s; exiting (code %d)\n",
                     static_cast<int>(getpid()), __atomic_load_n(&abort_word_[kAbortPeer], __ATOMIC_RELAXED),
                     static_cast<double>(exit_after_ns_) * 1e-9, kPeerLostExitCode);
        std::fflush(stderr);
        end_parent();
        _exit(kPeerLostExitCode);
      }
      ticks_.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::nanoseconds(tick_ns_));
    }
  }

  // See the constructor. A parent that is gone (or was never ours) is left alone:
  // once it dies this process is re-parented and getppid() changes.
  void end_parent() const {
    if (end_parent_pid_ <= 0 || getppid() != end_parent_pid_) return;
    std::fprintf(stderr, "[a2a_one_sided] watchdog (pid %d): ending its engine process (pid %d) "
                 "too: it may wait on the lost rank in a host collective\n",
                 static_cast<int>(getpid()), static_cast<int>(end_parent_pid_));
    std::fflush(stderr);
    kill(end_parent_pid_, SIGTERM);
    for (int i = 0; i < 20 && getppid() == end_parent_pid_; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (getppid() == end_parent_pid_) kill(end_parent_pid_, SIGKILL);
  }

  const int num_ranks_;
  const std::vector<int> my_ranks_;
  int32_t* const abort_word_;
  const int64_t interval_ns_;
  const int64_t tick_ns_;
  const int64_t exit_after_ns_;
  const pid_t end_parent_pid_;
  std::vector<std::atomic<bool>> paused_;
  std::vector<bool> mine_;
  uint8_t* base_ = nullptr;
  size_t bytes_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> rearm_{false};
  std::atomic<int64_t> ticks_{0};
  std::mutex mutex_;
  bool stopped_ = false;
  std::thread thread_;
};

}  // namespace a2a
