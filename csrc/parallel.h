// Parallel loops of the CPU kernels.
//
// Our own pooled std::threads, not OpenMP: torch ships its own OpenMP runtime, and a second one in the
// process oversubscribes cores and can clash. Waking a pooled thread still costs a few microseconds, so the
// kernels ask for as many workers as their work justifies.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "cpu_features.h"

namespace pybilayer {

// One step of a busy wait: a pause where the CPU has one, else a yield.
inline void relax() {
#ifdef PYBILAYER_X86_AVX2
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Waits for ready(): spins briefly (what it waits for is microseconds away), then yields the core.
template <typename Ready>
void spin_until(const Ready& ready) {
  for (int spins = 0; !ready(); ++spins) {
    if (spins > 4096)
      std::this_thread::yield();
    else
      relax();
  }
}

// Workers for `rows` rows of `row_work` units each: at most `num_threads` (<= 0: all cores), at least
// `min_work_per_thread` units each, and never more than the rows.
inline int64_t worker_count(int64_t rows, int64_t row_work, int64_t min_work_per_thread, int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t by_work = std::max<int64_t>(1, rows * row_work / std::max<int64_t>(1, min_work_per_thread));
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(num_threads), by_work, rows}));
}

// Runs task(worker, workers) for every worker in [0, workers) at the same time: worker 0 on the calling
// thread, each other one on a pooled thread of its own (so workers may wait for each other). `workers` is
// `requested`, or fewer where no more threads could be started; `prepare(workers)`, where given, runs on
// the calling thread before any task. Returns once every task has returned, and rethrows the first
// exception a task threw. Pooled threads outlive the call: starting a thread costs 30-100 us here, against
// passes of 20-500 us (parallel.cpp).
void run_concurrently(int requested, const std::function<void(int worker, int workers)>& task,
                      const std::function<void(int workers)>& prepare = nullptr);

// Calls fn(row_begin, row_end) on `workers` workers: worker i takes rows [rows * i / workers,
// rows * (i + 1) / workers), worker 0 on the calling thread (run_concurrently).
template <typename Fn>
void parallel_rows(int64_t rows, int64_t workers, const Fn& fn) {
  if (rows <= 0) return;
  workers = std::max<int64_t>(1, std::min(workers, rows));
  run_concurrently(static_cast<int>(workers), [&](int i, int n) { fn(rows * i / n, rows * (i + 1) / n); });
}

// Items [0, n) in one range of consecutive items per worker, taken in order by their worker; a worker done
// with its own takes the back half of what is left of the fullest other range (work stealing). A worker
// slowed by anything else on the machine leaves the rest of its share to the others, while every worker
// still goes through long runs of consecutive items (the heads keep rows from one band to the next).
class StealingRanges {
 public:
  StealingRanges(int64_t n, int workers);
  // The next item for `worker` (< workers), or -1 once none is left.
  int64_t take(int worker);

 private:
  struct alignas(64) Range {
    std::atomic<uint64_t> bounds{0};  // next << 32 | end: one word, so that taking and stealing race safely
  };
  std::unique_ptr<Range[]> ranges_;
  const int workers_;
};

// Calls fn(next) on up to `workers` workers (run_concurrently), next() returning the worker's next item of
// [0, n) from a StealingRanges, or -1 once none is left.
template <typename Fn>
void parallel_stealing(int64_t n, int64_t workers, const Fn& fn) {
  if (n <= 0) return;
  std::unique_ptr<StealingRanges> ranges;
  run_concurrently(
      static_cast<int>(std::max<int64_t>(1, std::min(workers, n))),
      [&](int i, int) { fn([&ranges, i] { return ranges->take(i); }); },
      [&](int started) { ranges = std::make_unique<StealingRanges>(n, started); });
}

}  // namespace pybilayer
