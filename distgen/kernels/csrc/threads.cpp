// Pins each OpenMP thread of the runtime torch shares with these kernels to one CPU, as the workers'
// thread plan says (distgen/workers/cpu_threads.py). libgomp keeps the same threads for later parallel
// regions of the same size, so the binding holds for every step after it.
#include <sched.h>

#include "common.h"

DG_EXPORT int64_t dg_bind_omp_threads(const int32_t* cpus, int64_t n) {
  int64_t failed = 0;
#pragma omp parallel num_threads(static_cast<int>(n)) reduction(+ : failed)
  {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus[omp_get_thread_num()], &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) failed += 1;
  }
  return failed;
}
