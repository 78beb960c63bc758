/* What the two C files of the selector's CPU library share (_cpu_select.c and _cpu_router.c include it;
 * xshare/selection/backends/c/kernel.py compiles both into one library and hashes this header into the
 * library's cache key): the return codes (kernel.py's _ERRORS names them), the routines _cpu_select.c
 * defines for both, and the row count clamp. Plain C99.
 */
#ifndef XSHARE_CPU_COMMON_H
#define XSHARE_CPU_COMMON_H

#include <stdint.h>

#define XS_OK 0
#define XS_BAD_PREFER (-2)
#define XS_BAD_ID (-3)
#define XS_NO_MEMORY (-4)
#define XS_NOT_PLAIN (-5)

/* rows >= n_valid are padding: the count clamped to [0, T] */
static inline int xs_valid_rows(int n_valid, int T) {
    return n_valid < 0 ? 0 : (n_valid > T ? T : n_valid);
}

/* defined in _cpu_select.c: the engine's pick slots of a row, the warm-up of a row, the fill by column
 * sum, a valid row's bookkeeping, and the start of a routing call */
int xshare_prefer_slots(int t, int E, int PK, const int32_t *prefer, int32_t *slot);
void xshare_mark_first(int E, int kw, const float *key, const int32_t *slot, const uint8_t *usable,
                       uint8_t *taken, uint8_t *in_set);
void xshare_fill(int E, int budget, const double *colsum, uint8_t *taken, uint8_t *in_set);
int xshare_row_figures(int t, int E, int K, int PK, const int32_t *out, const int32_t *p, uint8_t *active,
                       uint8_t *vanilla_active, int64_t *a, int64_t *checksum, int64_t *changed);
int xshare_start_route(int T, int n_valid, int E, int apply, const uint8_t *given_set, uint8_t *in_set,
                       uint8_t *active, uint8_t *vanilla_active);

#endif
