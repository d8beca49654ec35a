// The CPU kernels' thread pool (parallel.h).
//
// A parked thread per worker, handed one task at a time: a dispatch takes an idle thread or starts a new
// one, so the workers of one call always run at the same time, whatever other threads are doing with the
// pool (a queue could leave a worker waiting behind another call while its team spins at a barrier). After
// a task a thread spins a while for the next one (kSpinBeforeSleep: a frame's kernels follow each other
// within a millisecond), then sleeps on a condition variable. The pool is never destroyed: its threads are
// detached and may still be parked when the process exits. A forked child starts a pool of its own.
#include "parallel.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <vector>

#include <unistd.h>

namespace pybilayer {
namespace {

// Long enough to span a frame's gaps between kernels (its Python glue, the landmarks): 2.9 sleeps a frame
// with 200 us, 0.1 with 1 ms, and frames ~1 ms faster at the median (six runs in turns, 2 cores).
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(1000);

struct Worker {
  std::mutex mutex;
  std::condition_variable wake;
  std::atomic<bool> has_task{false};
  std::function<void()> task;
};

class Pool {
 public:
  // An idle worker, or a new one; throws std::system_error where no thread can be started.
  Worker* acquire() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!idle_.empty()) {
        Worker* w = idle_.back();
        idle_.pop_back();
        return w;
      }
    }
    auto* w = new Worker;  // never freed: a detached thread owns it for the process's life
    try {
      std::thread([this, w] { serve(w); }).detach();
    } catch (...) {
      delete w;
      throw;
    }
    return w;
  }

  // Back to the idle workers.
  void release(Worker* w) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(w);
  }

  static void hand(Worker* w, std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(w->mutex);
      w->task = std::move(task);
      w->has_task.store(true, std::memory_order_release);
    }
    w->wake.notify_one();
  }

  // This process's pool (a fork's child gets a new one: the parent's threads are not in it).
  static Pool& get() {
    static std::mutex mutex;
    static Pool* pool = nullptr;
    std::lock_guard<std::mutex> lock(mutex);
    if (pool == nullptr || pool->pid_ != getpid()) pool = new Pool;  // the parent's pool, if any, is left
    return *pool;
  }

 private:
  Pool() : pid_(getpid()) {}

  void serve(Worker* w) {
    for (;;) {
      const auto sleep_at = std::chrono::steady_clock::now() + kSpinBeforeSleep;
      while (!w->has_task.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < sleep_at) relax();
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(w->mutex);
        w->wake.wait(lock, [w] { return w->has_task.load(std::memory_order_acquire); });
        task = std::move(w->task);
        w->task = nullptr;
        w->has_task.store(false, std::memory_order_relaxed);
      }
      task();  // never throws: run_concurrently's tasks catch
      release(w);
    }
  }

  const pid_t pid_;
  std::mutex mutex_;
  std::vector<Worker*> idle_;
};

}  // namespace

void run_concurrently(int requested, const std::function<void(int, int)>& task,
                      const std::function<void(int)>& prepare) {
  Pool& pool = Pool::get();
  std::vector<Worker*> helpers;
  for (int i = 1; i < requested; ++i) {
    try {
      helpers.push_back(pool.acquire());
    } catch (const std::system_error&) {
      break;  // run with the workers we have
    }
  }
  const int workers = static_cast<int>(helpers.size()) + 1;
  if (prepare) {
    try {
      prepare(workers);
    } catch (...) {
      for (Worker* w : helpers) pool.release(w);
      throw;
    }
  }
  std::vector<std::exception_ptr> errors(workers);
  std::atomic<int> running{workers - 1};
  const auto run = [&](int i) {
    try {
      task(i, workers);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  for (int i = 1; i < workers; ++i)
    Pool::hand(helpers[i - 1], [&run, &running, i] {
      run(i);
      running.fetch_sub(1, std::memory_order_acq_rel);
    });
  run(0);
  spin_until([&] { return running.load(std::memory_order_acquire) == 0; });
  for (const std::exception_ptr& error : errors)
    if (error) std::rethrow_exception(error);
}

namespace {
// A StealingRanges range as one word: its next item (high half) and its end (low half); next <= end.
constexpr uint64_t pack_range(uint64_t next, uint64_t end) { return next << 32 | end; }
constexpr uint64_t next_of(uint64_t range) { return range >> 32; }
constexpr uint64_t end_of(uint64_t range) { return range & UINT32_MAX; }
}  // namespace

StealingRanges::StealingRanges(int64_t n, int workers) : ranges_(new Range[workers]), workers_(workers) {
  if (n < 0 || n > int64_t(UINT32_MAX)) throw std::invalid_argument("StealingRanges: n out of range");
  for (int w = 0; w < workers; ++w) ranges_[w].bounds.store(pack_range(n * w / workers, n * (w + 1) / workers));
}

int64_t StealingRanges::take(int worker) {
  std::atomic<uint64_t>& own = ranges_[worker].bounds;
  for (uint64_t range = own.load(std::memory_order_acquire); next_of(range) < end_of(range);)
    if (own.compare_exchange_weak(range, pack_range(next_of(range) + 1, end_of(range)), std::memory_order_acq_rel))
      return int64_t(next_of(range));
  for (;;) {  // steal from the fullest range, where at least two items are left (one: its worker is on it)
    int victim = -1;
    uint64_t seen = 0, most = 1;
    for (int w = 0; w < workers_; ++w) {
      const uint64_t range = ranges_[w].bounds.load(std::memory_order_acquire), left = end_of(range) - next_of(range);
      if (w != worker && left > most) victim = w, seen = range, most = left;
    }
    if (victim < 0) return -1;
    const uint64_t next = next_of(seen), end = end_of(seen), split = next + (end - next + 1) / 2;
    if (!ranges_[victim].bounds.compare_exchange_strong(seen, pack_range(next, split), std::memory_order_acq_rel))
      continue;  // the victim took an item meanwhile: look again
    own.store(pack_range(split + 1, end), std::memory_order_release);
    return int64_t(split);
  }
}

}  // namespace pybilayer
