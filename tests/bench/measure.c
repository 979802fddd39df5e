#include "measure.h"

#include <stdlib.h>
#include <sys/resource.h>

double measure_cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

void measure_sort(uint64_t *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_u64);
}

double measure_pct_ms(const uint64_t *v, size_t n, double p)
{
    return n ? (double)v[(size_t)(p * (double)(n - 1))] / 1e6 : 0.0;
}
