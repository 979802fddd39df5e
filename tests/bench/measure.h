/* What the bench generators measure: their own CPU time (so that a generator that is the
 * bottleneck says so) and latency percentiles. */
#ifndef BENCH_MEASURE_H
#define BENCH_MEASURE_H

#include <stddef.h>
#include <stdint.h>

/* user + system seconds this process has used so far. */
double measure_cpu_seconds(void);
/* Sorts n latencies (ns) in place, for measure_pct_ms. */
void measure_sort(uint64_t *v, size_t n);
/* The p-quantile (0..1) of n sorted latencies (ns), in ms; 0 when there are none. */
double measure_pct_ms(const uint64_t *v, size_t n, double p);

#endif
