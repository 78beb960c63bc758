/* The selector's CPU fast path: the routing decision of `xshare` / `topk` for one MoE layer in one
 * call (built at first use by xshare/selection/backends/c/kernel.py with the system C compiler, loaded
 * with ctypes; plain C99, no Python or torch headers).
 *
 * Same result as xshare.selection.select with `prefer` (the engine's own top-k) on the same inputs
 * (and, given the set S a set policy chose, the routing of any set policy: lynx, des_vote, oea):
 * the gate scores, the batch's column sums and the weights stay in torch (bit-identical floating
 * point); this file does the comparisons, the sets and the bookkeeping that cost the torch path
 * ~100 small tensor ops:
 *
 *   own order of token t   usable first (key = score, unusable = -1), then score desc, then the
 *                          engine's own pick in its column order, then the expert index
 *   warm-up W              union over valid rows of each row's first k0 usable experts
 *   set S                  W plus the best (budget - |W|) other experts by column sum (index asc)
 *   route                  each row takes its first top_k experts by (inside S and usable,
 *                          usable, unusable), then its own order; padded rows and rows of a batch
 *                          the policy does not apply to take their own top_k (vanilla)
 *
 * and the figures the adapter records per call (activated experts with and without the selector,
 * changed rows, the order-sensitive checksum, and the metrics row of xshare.sglang.stats).
 */
#include <stdlib.h>

#include "_cpu_common.h"

/* key desc, then slot asc (engine's pick order; none = pk), then index asc */
static int own_before(const float *key, const int32_t *slot, int a, int b) {
    if (key[a] != key[b]) return key[a] > key[b];
    if (slot[a] != slot[b]) return slot[a] < slot[b];
    return a < b;
}

/* Shared with _cpu_router.c (built into the same library; declared in _cpu_common.h): xshare_prefer_slots,
 * xshare_mark_first, xshare_fill, xshare_row_figures, xshare_start_route. */

/* slot[] of row t from the engine's picks (slot[e] = PK for the others, set by the caller):
 * XS_OK, or XS_BAD_PREFER for an id above E (E itself is the shared slot, -1 none) */
int xshare_prefer_slots(int t, int E, int PK, const int32_t *prefer, int32_t *slot) {
    if (prefer == NULL) return XS_OK;
    const int32_t *p = prefer + (int64_t)t * PK;
    for (int j = 0; j < PK; j++) { /* later duplicates win, as torch's scatter_ */
        int32_t id = p[j];
        if (id < 0 || id == E) continue;
        if (id > E) return XS_BAD_PREFER;
        slot[id] = j;
    }
    return XS_OK;
}

/* the warm-up of one row: its first kw experts in its own order join in_set, usable ones only */
void xshare_mark_first(int E, int kw, const float *key, const int32_t *slot, const uint8_t *usable,
                       uint8_t *taken, uint8_t *in_set) {
    for (int e = 0; e < E; e++) taken[e] = 0;
    for (int r = 0; r < kw && r < E; r++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || own_before(key, slot, e, best))) best = e;
        taken[best] = 1;
        if (usable[best]) in_set[best] = 1;
    }
}

/* the fill: the best budget - |in_set| other experts by column sum join in_set, lower index first on ties */
void xshare_fill(int E, int budget, const double *colsum, uint8_t *taken, uint8_t *in_set) {
    int fill = budget;
    for (int e = 0; e < E; e++) fill -= in_set[e];
    for (int e = 0; e < E; e++) taken[e] = in_set[e];
    for (int r = 0; r < fill; r++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || colsum[e] > colsum[best])) best = e;
        if (best < 0) break;
        taken[best] = 1;
        in_set[best] = 1;
    }
}

/* The start of a routing call: the outputs in_set, active and vanilla_active [E] cleared, and S = given_set
 * (another set policy's) when the policy applies and one is given. Returns n_valid clamped to [0, T]. */
int xshare_start_route(int T, int n_valid, int E, int apply, const uint8_t *given_set, uint8_t *in_set,
                       uint8_t *active, uint8_t *vanilla_active) {
    for (int e = 0; e < E; e++) in_set[e] = 0, active[e] = 0, vanilla_active[e] = 0;
    if (apply && given_set != NULL)
        for (int e = 0; e < E; e++) in_set[e] = given_set[e] != 0;
    return xs_valid_rows(n_valid, T);
}

static int routed_before(const uint8_t *tier, const float *key, const int32_t *slot, int a, int b) {
    if (tier[a] != tier[b]) return tier[a] > tier[b];
    return own_before(key, slot, a, b);
}

/* key[] (usable score or -1) and slot[] of row t; returns XS_OK or XS_BAD_PREFER */
static int row_order(int t, int E, int PK, const float *logits, const float *scores, const int32_t *prefer,
                     float *key, int32_t *slot, uint8_t *usable) {
    const float *lg = logits + (int64_t)t * E;
    const float *sc = scores + (int64_t)t * E;
    for (int e = 0; e < E; e++) {
        float x = lg[e];
        usable[e] = (x == x) && x != 1.0f / 0.0f && x != -1.0f / 0.0f;
        key[e] = usable[e] ? sc[e] : -1.0f;
        slot[e] = PK;
    }
    return xshare_prefer_slots(t, E, PK, prefer, slot);
}

static void sort_small(int64_t *v, int n) {
    for (int i = 1; i < n; i++) {
        int64_t x = v[i];
        int j = i - 1;
        while (j >= 0 && v[j] > x) {
            v[j + 1] = v[j];
            j--;
        }
        v[j + 1] = x;
    }
}

/* The bookkeeping of valid row t routed to out[K]: its experts in active, its term of the checksum,
 * the engine's picks p (PK columns, or NULL) in vanilla_active (ids < 0 as 0), and whether the two
 * expert sets differ (added to *changed). a: scratch of 2K. XS_OK, or XS_BAD_ID for a pick >= E. */
int xshare_row_figures(int t, int E, int K, int PK, const int32_t *out, const int32_t *p, uint8_t *active,
                       uint8_t *vanilla_active, int64_t *a, int64_t *checksum, int64_t *changed) {
    for (int r = 0; r < K; r++) {
        active[out[r]] = 1;
        *checksum += (int64_t)(out[r] + 1) * (t + 1) * (r + 1);
    }
    if (p == NULL) return XS_OK;
    int kk = K < PK ? K : PK;
    for (int j = 0; j < kk; j++) {
        int64_t id = p[j] < 0 ? 0 : p[j];
        if (id >= E) return XS_BAD_ID;
        vanilla_active[id] = 1;
    }
    if (kk == K) { /* set comparison: both sorted */
        for (int j = 0; j < K; j++) a[j] = p[j], a[K + j] = out[j];
        sort_small(a, K);
        sort_small(a + K, K);
        for (int j = 0; j < K; j++)
            if (a[j] != a[K + j]) {
                (*changed)++;
                break;
            }
    }
    return XS_OK;
}

/* XS_OK when every logit is finite or -inf and (softmax) every row has a finite one: then the
 * plain softmax / sigmoid of the logits are the gate scores exactly (see cpu.py). */
int xshare_cpu_plain(int T, int E, int softmax, const float *logits) {
    for (int t = 0; t < T; t++) {
        const float *lg = logits + (int64_t)t * E;
        int finite = 0;
        for (int e = 0; e < E; e++) {
            float x = lg[e];
            if (x != x || x == 1.0f / 0.0f) return XS_NOT_PLAIN;
            finite |= x != -1.0f / 0.0f;
        }
        if (softmax && !finite) return XS_NOT_PLAIN;
    }
    return XS_OK;
}

/* Routing of one layer.
 *   logits [T,E] f32 (usable = finite), scores [T,E] f32 (gate scores, 0 where unusable),
 *   colsum [E] f64 (fixed-point column sums of scores over the valid rows), prefer [T,PK] i32 or NULL,
 *   n_valid: rows >= n_valid are padding; apply: whether the policy applies to this batch;
 *   budget (>= 1), k0 (>= 0); given_set [E] u8 or NULL: the set S of another set policy (computed
 *   by the policy in torch); NULL = the xshare set from k0 and budget.
 * Out: ids [T,K] i32, in_set [E] u8 (S; all 0 when not applied), active [E] u8 (experts routed
 *   by a valid row), vanilla_active [E] u8 (experts of prefer[:, :K] on valid rows, ids < 0 count
 *   as 0), counts [2] i64: rows whose expert set differs from prefer[:, :K], checksum
 *   sum over valid t, j of (ids[t,j] + 1) * (t + 1) * (j + 1).
 */
int xshare_cpu_route(int T, int E, int K, int PK, const float *logits, const float *scores, const double *colsum,
                     const int32_t *prefer, int n_valid, int apply, int budget, int k0,
                     const uint8_t *given_set, int32_t *ids,
                     uint8_t *in_set, uint8_t *active, uint8_t *vanilla_active, int64_t *counts) {
    float *key = malloc(sizeof(float) * (size_t)E);
    int32_t *slot = malloc(sizeof(int32_t) * (size_t)E);
    uint8_t *usable = malloc((size_t)E);
    uint8_t *tier = malloc((size_t)E);
    uint8_t *taken = malloc((size_t)E);
    int64_t *a = malloc(sizeof(int64_t) * (size_t)(2 * K + 1));
    int status = XS_OK;
    if (!key || !slot || !usable || !tier || !taken || !a) {
        status = XS_NO_MEMORY;
        goto done;
    }
    n_valid = xshare_start_route(T, n_valid, E, apply, given_set, in_set, active, vanilla_active);
    if (apply && given_set == NULL) {
        /* warm-up W: each valid row's first k0 positions of its own order, usable ones only */
        for (int t = 0; t < n_valid && k0 > 0; t++) {
            status = row_order(t, E, PK, logits, scores, prefer, key, slot, usable);
            if (status != XS_OK) goto done;
            xshare_mark_first(E, k0, key, slot, usable, taken, in_set);
        }
        xshare_fill(E, budget, colsum, taken, in_set); /* the best budget - |W| others by column sum */
    }

    int64_t changed = 0, checksum = 0;
    for (int t = 0; t < T; t++) {
        status = row_order(t, E, PK, logits, scores, prefer, key, slot, usable);
        if (status != XS_OK) goto done;
        int use_set = apply && t < n_valid;
        for (int e = 0; e < E; e++) {
            tier[e] = usable[e] ? (uint8_t)((use_set && in_set[e]) ? 2 : 1) : 0;
            taken[e] = 0;
        }
        int32_t *out = ids + (int64_t)t * K;
        for (int r = 0; r < K; r++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || routed_before(tier, key, slot, e, best))) best = e;
            taken[best] = 1;
            out[r] = best;
        }
        if (t >= n_valid) continue;
        status = xshare_row_figures(t, E, K, PK, out, prefer ? prefer + (int64_t)t * PK : NULL, active, vanilla_active,
                                    a, &checksum, &changed);
        if (status != XS_OK) goto done;
    }
    counts[0] = changed;
    counts[1] = checksum;
done:
    free(key);
    free(slot);
    free(usable);
    free(tier);
    free(taken);
    free(a);
    return status;
}

/* The metrics row of xshare.sglang.stats.call_figures (float32 [9 + 2G]) from the same inputs:
 * layer, activated, vanilla activated, peak GPU, vanilla peak GPU, peak/mean ratio, gate mass kept,
 * top-1 kept, valid rows, then activated experts per GPU, then valid rows routed to each GPU.
 * probs [T,E] (gate probabilities), chosen [T,K] i32, vanilla [T,PK] i32 (first K columns used),
 * expert_gpu [E] i64 in [0, G). */
int xshare_cpu_figures(int T, int E, int K, int PK, int G, int layer, const float *logits, const float *probs,
                       const int32_t *chosen, const int32_t *vanilla, const uint8_t *active,
                       const uint8_t *vanilla_active, int n_valid, const int64_t *expert_gpu, float *row) {
    float *gpu_active = row + 9;
    float *gpu_tokens = row + 9 + G;
    float *gpu_vanilla = calloc((size_t)G, sizeof(float));
    uint8_t *hit = malloc((size_t)G);
    if (!gpu_vanilla || !hit) {
        free(gpu_vanilla);
        free(hit);
        return XS_NO_MEMORY;
    }
    n_valid = xs_valid_rows(n_valid, T);
    for (int g = 0; g < G; g++) gpu_active[g] = 0.0f, gpu_tokens[g] = 0.0f;
    int n_active = 0, n_vanilla = 0;
    for (int e = 0; e < E; e++) {
        int64_t g = expert_gpu[e];
        if (g < 0 || g >= G) {
            free(gpu_vanilla);
            free(hit);
            return XS_BAD_ID;
        }
        gpu_active[g] += active[e];
        gpu_vanilla[g] += vanilla_active[e];
        n_active += active[e];
        n_vanilla += vanilla_active[e];
    }
    double mass = 0.0, top1 = 0.0;
    int kv = K < PK ? K : PK;
    for (int t = 0; t < n_valid; t++) {
        const float *p = probs + (int64_t)t * E;
        const float *lg = logits + (int64_t)t * E;
        const int32_t *c = chosen + (int64_t)t * K;
        const int32_t *v = vanilla + (int64_t)t * PK;
        double kept = 0.0, own = 0.0;
        int best = 0;
        for (int e = 1; e < E; e++)
            if (lg[e] > lg[best]) best = e;
        int has_top1 = 0;
        for (int g = 0; g < G; g++) hit[g] = 0;
        for (int j = 0; j < K; j++) {
            int id = c[j] < 0 ? 0 : (c[j] >= E ? E - 1 : c[j]);
            kept += p[id];
            has_top1 |= id == best;
            hit[expert_gpu[id]] = 1;
        }
        for (int j = 0; j < kv; j++) {
            int64_t id = v[j] < 0 ? 0 : (v[j] >= E ? E - 1 : v[j]);
            own += p[id];
        }
        double r = kept / (own > 1e-30 ? own : 1e-30);
        mass += r > 1.0 ? 1.0 : r;
        top1 += has_top1;
        for (int g = 0; g < G; g++) gpu_tokens[g] += hit[g];
    }
    float peak = 0.0f, vpeak = 0.0f;
    for (int g = 0; g < G; g++) {
        if (gpu_active[g] > peak) peak = gpu_active[g];
        if (gpu_vanilla[g] > vpeak) vpeak = gpu_vanilla[g];
    }
    double denom = n_valid > 0 ? n_valid : 1;
    row[0] = (float)layer;
    row[1] = (float)n_active;
    row[2] = (float)n_vanilla;
    row[3] = peak;
    row[4] = vpeak;
    row[5] = n_active > 0 ? peak * (float)G / (float)n_active : 1.0f;
    row[6] = (float)(mass / denom);
    row[7] = (float)(top1 / denom);
    row[8] = (float)n_valid;
    free(gpu_vanilla);
    free(hit);
    return XS_OK;
}
