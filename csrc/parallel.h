// Row-parallel loops of the CPU kernels.
//
// std::thread workers over contiguous row ranges, not OpenMP: torch ships its own OpenMP runtime, and a
// second one in the process oversubscribes cores and can clash. Starting a thread costs ~10 us, so the
// kernels ask for as many workers as their work justifies.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace pybilayer {

// Workers for `rows` rows of `row_work` units each: at most `num_threads` (<= 0: all cores), at least
// `min_work_per_thread` units each, and never more than the rows.
inline int64_t worker_count(int64_t rows, int64_t row_work, int64_t min_work_per_thread, int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t by_work = std::max<int64_t>(1, rows * row_work / std::max<int64_t>(1, min_work_per_thread));
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(num_threads), by_work, rows}));
}

// Calls fn(row_begin, row_end) on `workers` threads: worker i takes rows [rows * i / workers,
// rows * (i + 1) / workers). The calling thread takes range 0, and any range whose thread could not be
// started. The first exception thrown by a worker is rethrown here.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t workers, const Fn& fn) {
  if (rows <= 0) return;
  workers = std::max<int64_t>(1, std::min(workers, rows));
  std::vector<std::exception_ptr> errors(workers);
  const auto work = [&](int64_t i) {
    try {
      fn(rows * i / workers, rows * (i + 1) / workers);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  int64_t started = 1;
  try {
    for (; started < workers; ++started) threads.emplace_back(work, started);
  } catch (const std::system_error&) {
  }
  work(0);
  for (int64_t i = started; i < workers; ++i) work(i);
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& error : errors)
    if (error) std::rethrow_exception(error);
}

}  // namespace pybilayer
