/* The selector's CPU fast path for router-spec layers (biased and grouped gates: DeepSeek-V3/R1,
 * GLM-4.5, Kimi-K2, DeepSeek-V2, Llama-4, sqrtsoftplus, biased plain gates), built into the same
 * library as _cpu_select.c by xshare/selection/backends/c/kernel.py (plain C99, loaded with ctypes).
 *
 * Same decision as xshare.selection.decide's router-spec path (_decide_router) on the same inputs.
 * Torch computes the gate once (gates.router_scores: affinities, choice scores, the experts each
 * token reaches, bitwise SGLang's), the batch's column sums and, afterwards, the weights
 * (gather + gates._finish_weights); this file does the rest in one pass over the rows:
 *
 *   usable          reachable and a finite choice score
 *   own order       usable first, then choice score desc, then the engine's own pick (its column
 *                   order), then the expert index (common.preference_rank)
 *   warm-up W, S    as _cpu_select.c: each valid row's first k0 usable experts, then the best
 *                   (budget - |W|) others by column sum (or the set another set policy chose)
 *   allowed         usable and in S, for the valid rows of a batch the policy applies to whose
 *                   usable experts S cuts (a row S leaves whole keeps the engine's routing); a cut
 *                   row with no such expert is left alone and counted short (engine._decide_router)
 *   restricted row  group scores over the allowed experts (max, or the sum of the best two biased
 *                   scores, rounded to the choice dtype), the topk_group best groups that exist,
 *                   then the best top_k allowed experts of those groups, best first, exact ties to
 *                   the lower index; fewer than top_k: short, routed as the unrestricted gate
 *                   (gates.reference_route)
 *   ranking         every other top-k is torch.topk's own on the CPU (ATen's topk_impl_loop):
 *                   std::partial_sort when k * 64 <= n, else std::nth_element and, when sorted,
 *                   std::sort of the first k - 1, under the comparator "NaN first, then greater".
 *                   Ties then land in the same columns as torch puts them; the routines below do
 *                   what GNU libstdc++'s introselect / introsort / heap select do, step for step
 *                   (written here from the algorithms; torch's Linux builds use libstdc++).
 *   Llama-4 top-1   torch.max's first maximum (first NaN)
 *
 * Out: the route ids [T, W] the weights are gathered from (W = top_k + shared slot), the final ids
 * [T, top_k] (the engine's own on rows the policy did not change, as _decide_router returns them),
 * the replaced rows, S, the activated experts with and without the selector, and the counts.
 */
#include <stdlib.h>

#include "_cpu_common.h"

#define XR_PLAIN 0
#define XR_GROUPED 1
#define XR_BIASED 2
#define XR_LLAMA4 3

typedef struct {
    float v;
    int32_t i;
} xr_item;

/* torch.topk's comparator (largest): NaN above every number, then the greater value */
static int xr_before(xr_item x, xr_item y) {
    return (x.v != x.v && y.v == y.v) || x.v > y.v;
}

static void xr_swap(xr_item *a, int x, int y) {
    xr_item t = a[x];
    a[x] = a[y];
    a[y] = t;
}

static int xr_lg(int n) {
    int r = 0;
    while (n > 1) {
        n >>= 1;
        r++;
    }
    return r;
}

/* shift a[i] left while it is before its left neighbour (no lower bound: something stops it) */
static void xr_linear_insert(xr_item *a, int i) {
    xr_item val = a[i];
    int j = i - 1;
    while (xr_before(val, a[j])) {
        a[i] = a[j];
        i = j;
        j--;
    }
    a[i] = val;
}

static void xr_insertion_sort(xr_item *a, int lo, int hi) {
    if (lo == hi) return;
    for (int i = lo + 1; i < hi; i++) {
        if (xr_before(a[i], a[lo])) {
            xr_item val = a[i];
            for (int j = i; j > lo; j--) a[j] = a[j - 1];
            a[lo] = val;
        } else {
            xr_linear_insert(a, i);
        }
    }
}

/* the median of a[x], a[y], a[z] is swapped into a[r] */
static void xr_median_to(xr_item *a, int r, int x, int y, int z) {
    if (xr_before(a[x], a[y])) {
        if (xr_before(a[y], a[z])) xr_swap(a, r, y);
        else if (xr_before(a[x], a[z])) xr_swap(a, r, z);
        else xr_swap(a, r, x);
    } else if (xr_before(a[x], a[z])) {
        xr_swap(a, r, x);
    } else if (xr_before(a[y], a[z])) {
        xr_swap(a, r, z);
    } else {
        xr_swap(a, r, y);
    }
}

/* Hoare partition of [lo, hi) around a[pivot] (outside the range), no bound checks */
static int xr_partition(xr_item *a, int lo, int hi, int pivot) {
    for (;;) {
        while (xr_before(a[lo], a[pivot])) lo++;
        hi--;
        while (xr_before(a[pivot], a[hi])) hi--;
        if (!(lo < hi)) return lo;
        xr_swap(a, lo, hi);
        lo++;
    }
}

static int xr_pivot_cut(xr_item *a, int lo, int hi) {
    int mid = lo + (hi - lo) / 2;
    xr_median_to(a, lo, lo + 1, mid, hi - 1);
    return xr_partition(a, lo + 1, hi, lo);
}

/* binary max-heap (under xr_before) on h[0, len) */
static void xr_sift_up(xr_item *h, int hole, int top, xr_item val) {
    int parent = (hole - 1) / 2;
    while (hole > top && xr_before(h[parent], val)) {
        h[hole] = h[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    h[hole] = val;
}

static void xr_sift_down(xr_item *h, int hole, int len, xr_item val) {
    int top = hole, child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (xr_before(h[child], h[child - 1])) child--;
        h[hole] = h[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        h[hole] = h[child - 1];
        hole = child - 1;
    }
    xr_sift_up(h, hole, top, val);
}

static void xr_make_heap(xr_item *h, int len) {
    if (len < 2) return;
    for (int parent = (len - 2) / 2;; parent--) {
        xr_sift_down(h, parent, len, h[parent]);
        if (parent == 0) return;
    }
}

/* the heap's top goes to h[out]; h[out]'s old value is sifted into the heap h[0, len) */
static void xr_pop_to(xr_item *h, int len, int out) {
    xr_item val = h[out];
    h[out] = h[0];
    xr_sift_down(h, 0, len, val);
}

/* the first `mid` of h[0, n) become the `mid` best, as a heap */
static void xr_heap_select(xr_item *h, int mid, int n) {
    xr_make_heap(h, mid);
    for (int i = mid; i < n; i++)
        if (xr_before(h[i], h[0])) xr_pop_to(h, mid, i);
}

static void xr_sort_heap(xr_item *h, int len) {
    while (len > 1) {
        len--;
        xr_pop_to(h, len, len);
    }
}

static void xr_partial_sort(xr_item *a, int mid, int n) {
    xr_heap_select(a, mid, n);
    xr_sort_heap(a, mid);
}

static void xr_nth_element(xr_item *a, int nth, int n) {
    if (n == 0 || nth == n) return;
    int lo = 0, hi = n, depth = 2 * xr_lg(n);
    while (hi - lo > 3) {
        if (depth == 0) {
            xr_heap_select(a + lo, nth + 1 - lo, hi - lo);
            xr_swap(a, lo, nth);
            return;
        }
        depth--;
        int cut = xr_pivot_cut(a, lo, hi);
        if (cut <= nth) lo = cut;
        else hi = cut;
    }
    xr_insertion_sort(a, lo, hi);
}

static void xr_introsort(xr_item *a, int lo, int hi, int depth) {
    while (hi - lo > 16) {
        if (depth == 0) {
            xr_partial_sort(a + lo, hi - lo, hi - lo);
            return;
        }
        depth--;
        int cut = xr_pivot_cut(a, lo, hi);
        xr_introsort(a, cut, hi, depth);
        hi = cut;
    }
}

static void xr_sort(xr_item *a, int n) {
    if (n <= 0) return;
    xr_introsort(a, 0, n, 2 * xr_lg(n));
    if (n > 16) {
        xr_insertion_sort(a, 0, 16);
        for (int i = 16; i < n; i++) xr_linear_insert(a, i);
    } else {
        xr_insertion_sort(a, 0, n);
    }
}

/* torch.topk(v[0, n), k, largest=True, sorted) on the CPU: the indices, in torch's column order */
static void xr_topk(const float *v, int n, int k, int sorted, xr_item *q, int64_t *out) {
    for (int j = 0; j < n; j++) q[j].v = v[j], q[j].i = j;
    if ((int64_t)k * 64 <= n) {
        xr_partial_sort(q, k, n);
    } else {
        xr_nth_element(q, k - 1, n);
        if (sorted) xr_sort(q, k - 1);
    }
    for (int j = 0; j < k; j++) out[j] = q[j].i;
}

/* torch.max(v, dim): the first maximum, or the first NaN */
static int64_t xr_argmax(const float *v, int n) {
    int best = 0;
    for (int j = 0; j < n; j++)
        if (!(v[j] <= v[best])) {
            best = j;
            if (v[j] != v[j]) break;
        }
    return best;
}

static float xr_round_bf16(float x) {
    union {
        float f;
        uint32_t u;
    } b;
    b.f = x;
    if (x != x) return x;
    b.u += 0x7FFFu + ((b.u >> 16) & 1u);
    b.u &= 0xFFFF0000u;
    return b.f;
}

static int xr_finite(float x) {
    return x == x && x != 1.0f / 0.0f && x != -1.0f / 0.0f;
}

/* the G group scores of one row (choice c [E]) in SGLang's formula: the best score of the group
 * (grouped gate) or the sum of its best two (biased gate; its best alone when the group has one usable
 * expert), rounded to bf16 when the choice scores are bf16. usable NULL: SGLang's unrestricted gate
 * (every expert counts, the sum taken as is); else only the experts it marks (the re-selection). */
static void xr_group_scores(const float *c, const uint8_t *usable, int G, int per_group, int gate, int bf16,
                            float *gscore) {
    const float neg = -1.0f / 0.0f;
    for (int g = 0; g < G; g++) {
        const float *cg = c + (int64_t)g * per_group;
        const uint8_t *ug = usable ? usable + (int64_t)g * per_group : NULL;
        float b0 = neg, b1 = neg;
        for (int j = 0; j < per_group; j++) {
            float x = (!ug || ug[j]) ? cg[j] : neg;
            if (x > b0) b1 = b0, b0 = x;
            else if (x > b1) b1 = x;
        }
        float s = b0;
        if (gate == XR_BIASED) {
            float total = b0 + b1;
            s = (b1 > neg || !ug) ? total : b0;
            if (bf16) s = xr_round_bf16(s);
        }
        gscore[g] = s;
    }
}

/* own order of row t: key (choice if usable, else -inf) and slot (the engine's column; PK = none) */
static int xr_row(int t, int E, int PK, const float *choice, const uint8_t *reachable, const int32_t *prefer,
                  float *key, int32_t *slot, uint8_t *usable) {
    const float *c = choice + (int64_t)t * E;
    const uint8_t *r = reachable ? reachable + (int64_t)t * E : NULL;
    for (int e = 0; e < E; e++) {
        usable[e] = (!r || r[e]) && xr_finite(c[e]);
        key[e] = usable[e] ? c[e] : -1.0f / 0.0f;
        slot[e] = PK;
    }
    return xshare_prefer_slots(t, E, PK, prefer, slot); /* XS_OK or XS_BAD_PREFER */
}

/* torch.topk(values [R, n], k, sorted=sorted)'s indices [R, k] as this file computes them (for tests) */
int xshare_cpu_topk(int R, int n, int k, int sorted, const float *values, int64_t *out) {
    xr_item *q = malloc(sizeof(xr_item) * (size_t)(n > 0 ? n : 1));
    if (!q) return XS_NO_MEMORY;
    for (int r = 0; r < R; r++) xr_topk(values + (int64_t)r * n, n, k, sorted, q, out + (int64_t)r * k);
    free(q);
    return XS_OK;
}

/* The batch's gate scores for the column sums: masked[t, e] = affinity[t, e] on valid rows where e is
 * usable (reachable, finite choice score), else 0 (engine.router_batch's scores times the valid rows). */
int xshare_cpu_router_scores(int T, int E, const float *choice, const uint8_t *reachable, const float *affinity,
                             int n_valid, float *masked) {
    for (int t = 0; t < T; t++) {
        const float *c = choice + (int64_t)t * E;
        const float *a = affinity + (int64_t)t * E;
        const uint8_t *r = reachable ? reachable + (int64_t)t * E : NULL;
        float *o = masked + (int64_t)t * E;
        for (int e = 0; e < E; e++) o[e] = (t < n_valid && (!r || r[e]) && xr_finite(c[e])) ? a[e] : 0.0f;
    }
    return XS_OK;
}

/* Routing of one router-spec layer.
 *   choice [T,E] f32 (the gate's choice scores), reachable [T,E] u8 or NULL (every expert),
 *   colsum [E] f64 (xshare_cpu_router_scores' fixed-point column sums; read only when apply and no given_set),
 *   prefer [T,PK] i32 or NULL (PK >= K), n_valid, apply (the policy applies to this batch), budget, k0,
 *   given_set [E] u8 or NULL (another set policy's S), exact [T] u8 or NULL (rows that keep the
 *   engine's routing; their own top_k joins W), gate XR_*, groups G (0: none) keeping
 *   topk_group, unreached: the unrestricted key of experts outside a token's groups (SGLang's fill:
 *   0 for the grouped gate, -inf for the biased one), bf16: round the biased group scores to bf16,
 *   W: columns the gate ranks (top_k + shared slot), sorted: torch.topk's sorted flag.
 * Out: route [T,W] i64, ids [T,K] i32, replaced [T] u8, in_set [E] u8, active [E] u8 (experts of ids
 *   on valid rows), vanilla_active [E] u8 (of prefer[:, :K] on valid rows, ids < 0 as 0), counts [3]
 *   i64: valid rows whose expert set differs from prefer[:, :K], the checksum of ids over valid rows
 *   (sum of (id + 1)(t + 1)(j + 1)), valid rows left to the engine because they were short or empty.
 */
int xshare_cpu_router(int T, int E, int K, int W, int PK, const float *choice, const uint8_t *reachable,
                      const double *colsum, const int32_t *prefer, int n_valid, int apply, int budget, int k0,
                      const uint8_t *given_set, const uint8_t *exact, int gate, int G, int topk_group,
                      float unreached, int bf16,
                      int sorted, int64_t *route, int32_t *ids, uint8_t *replaced, uint8_t *in_set,
                      uint8_t *active, uint8_t *vanilla_active, int64_t *counts) {
    int n_items = E > G ? E : G;
    float *key = malloc(sizeof(float) * (size_t)E);
    float *row_key = malloc(sizeof(float) * (size_t)E);
    int32_t *slot = malloc(sizeof(int32_t) * (size_t)E);
    uint8_t *usable = malloc((size_t)E);
    uint8_t *cand = malloc((size_t)E);
    uint8_t *taken = malloc((size_t)E);
    xr_item *items = malloc(sizeof(xr_item) * (size_t)(n_items > 0 ? n_items : 1));
    float *gscore = malloc(sizeof(float) * (size_t)(G > 0 ? G : 1));
    int64_t *gpick = malloc(sizeof(int64_t) * (size_t)(G > 0 ? G : 1));
    uint8_t *gkeep = malloc((size_t)(G > 0 ? G : 1));
    int64_t *a = malloc(sizeof(int64_t) * (size_t)(2 * K + 1));
    const float neg = -1.0f / 0.0f;
    int status = XS_OK;
    if (!key || !row_key || !slot || !usable || !cand || !taken || !items || !gscore || !gpick || !gkeep || !a) {
        status = XS_NO_MEMORY;
        goto done;
    }
    n_valid = xshare_start_route(T, n_valid, E, apply, given_set, in_set, active, vanilla_active);
    if (apply && given_set == NULL) {
        for (int t = 0; t < n_valid; t++) { /* warm-up W: first k0 (exact rows: top_k) of valid rows, usable */
            int kw = (exact != NULL && exact[t]) ? K : k0;
            if (kw <= 0) continue;
            status = xr_row(t, E, PK, choice, reachable, prefer, key, slot, usable);
            if (status != XS_OK) goto done;
            xshare_mark_first(E, kw, key, slot, usable, taken, in_set);
        }
        xshare_fill(E, budget, colsum, taken, in_set); /* the best budget - |W| others by column sum */
    }

    int per_group = G > 0 ? E / G : E;
    int64_t changed = 0, checksum = 0, short_rows = 0;
    for (int t = 0; t < T; t++) {
        const float *c = choice + (int64_t)t * E;
        const uint8_t *reach = reachable ? reachable + (int64_t)t * E : NULL;
        status = xr_row(t, E, PK, choice, reachable, prefer, key, slot, usable);
        if (status != XS_OK) goto done;
        int restricted = 0, is_short = 0;
        if (apply && t < n_valid && !(exact != NULL && exact[t])) { /* exact rows keep the engine's routing */
            int any = 0, all = 1;
            for (int e = 0; e < E; e++) {
                cand[e] = usable[e] && in_set[e];
                any |= cand[e];
                all &= cand[e] || !usable[e]; /* S keeps every expert the row can use: not cut */
            }
            if (!all) {
                if (!any) is_short = 1; /* nothing of S reachable: the engine's routing, counted */
                else restricted = 1;
            }
        }
        if (restricted && G > 0) { /* group re-selection over the allowed experts */
            xr_group_scores(c, cand, G, per_group, gate, bf16, gscore);
            xr_topk(gscore, G, topk_group, 0, items, gpick);
            for (int g = 0; g < G; g++) gkeep[g] = 0;
            for (int j = 0; j < topk_group; j++) gkeep[gpick[j]] = gscore[gpick[j]] > neg;
            for (int e = 0; e < E; e++) cand[e] = cand[e] && gkeep[e / per_group];
        }
        if (restricted) {
            int n = 0;
            for (int e = 0; e < E; e++) n += cand[e];
            if (n < K) restricted = 0, is_short = 1;
        }
        for (int e = 0; e < E; e++) {
            if (restricted) row_key[e] = cand[e] ? c[e] : neg;
            else if (reach != NULL && !reach[e]) row_key[e] = unreached;
            else row_key[e] = c[e];
        }
        int64_t *rt = route + (int64_t)t * W;
        if (restricted) { /* best first, exact ties to the lower index (a stable descending sort) */
            for (int e = 0; e < E; e++) taken[e] = 0;
            for (int r = 0; r < W; r++) {
                int best = -1;
                for (int e = 0; e < E; e++)
                    if (!taken[e] && (best < 0 || row_key[e] > row_key[best])) best = e;
                taken[best] = 1;
                rt[r] = best;
            }
        } else if (gate == XR_LLAMA4 && W == 1) {
            rt[0] = xr_argmax(row_key, E);
        } else {
            xr_topk(row_key, E, W, sorted, items, rt);
        }
        replaced[t] = (uint8_t)restricted;
        int32_t *out = ids + (int64_t)t * K;
        const int32_t *p = prefer ? prefer + (int64_t)t * PK : NULL;
        for (int j = 0; j < K; j++) {
            out[j] = (restricted || p == NULL) ? (int32_t)rt[j] : p[j];
            if (out[j] < 0 || out[j] >= E) { /* an engine id out of range, on any row (torch's scatter) */
                status = XS_BAD_ID;
                goto done;
            }
        }
        if (t >= n_valid) continue;
        short_rows += is_short;
        status = xshare_row_figures(t, E, K, PK, out, p, active, vanilla_active, a, &checksum, &changed);
        if (status != XS_OK) goto done;
    }
    counts[0] = changed;
    counts[1] = checksum;
    counts[2] = short_rows;
done:
    free(key);
    free(row_key);
    free(slot);
    free(usable);
    free(cand);
    free(taken);
    free(items);
    free(gscore);
    free(gpick);
    free(gkeep);
    free(a);
    return status;
}

/* the row sum of w [0, K) in the order Inductor's CPU reduction adds (gates.inductor_row_sum): one
 * vector accumulator of `lanes` lanes over the row (the tail zero-padded), then a halving tree */
static float xr_lane_sum(const float *w, int K, int lanes, float *acc) {
    for (int l = 0; l < lanes; l++) acc[l] = l < K ? w[l] : 0.0f;
    for (int start = lanes; start < K; start += lanes)
        for (int l = 0; l < lanes; l++) acc[l] = acc[l] + (start + l < K ? w[start + l] : 0.0f);
    for (int half = lanes / 2; half >= 1; half /= 2)
        for (int l = 0; l < half; l++) acc[l] = acc[l] + acc[l + half];
    return acc[0];
}

/* The served path of one grouped or biased-grouped layer in one call: the rest of SGLang's gate, the
 * decision of xshare_cpu_router and the replacement outputs in SGLang's layout.
 *   score [T,E] f32: the gate's scores as torch computed them (the sigmoid / softmax, float32 math),
 *   bias [E] f32 or NULL (choice = score + bias, rounded to bf16 when choice_bf16), round_aff: the
 *   affinity is the score rounded to bf16 (bf16 logits), G groups keeping topk_group (SGLang's
 *   unrestricted group choice gives each token's reachable experts), the set as xshare_cpu_router
 *   (budget, k0, exact, prefer [T,PK] = the engine's routed picks), then src_ids / src_w [T,OW]
 *   (SGLang's outputs, routed columns first) copied to dst_ids / dst_w with the routed columns of the
 *   replaced rows overwritten: the affinities of the new experts, renormalised over the routed columns
 *   by the Inductor lane sum (`lanes`) plus `eps` when renorm, times `scale` when it is not 0 (the
 *   routed scaling factor SGLang folds into the weights).
 * Deferred gate (src_ids NULL; OW = PK = K, prefer unused): SGLang's gate was not run, this call is
 *   it: each row's picks are the unrestricted gate's (torch.topk of the group-masked choice scores with
 *   `engine_sorted` as its sorted flag) into engine_out [T,K] i32, their weights as the replaced rows'
 *   (the affinities, renormalised, scaled), and these outputs stand for SGLang's (biased_grouped_topk /
 *   grouped_topk without fused shared slots return exactly them, float32 and int32).
 * Out: affinity [T,E] f32, ids [T,K] i32, replaced [T] u8, flags [3,E] u8 (S, active, vanilla active),
 *   counts [5] i64: changed rows, checksum, short rows, |active|, |vanilla active|.
 */
/* the routed columns rt [K] of one row written as SGLang's gate writes them: ids, and the affinities
 * renormalised by the Inductor lane sum (+ eps) when renorm, times scale when it is not 0 */
static void xr_write_row(const int64_t *rt, const float *a, int K, int renorm, float eps, int lanes, float scale,
                         float *w, float *acc, int32_t *di, float *dw) {
    for (int j = 0; j < K; j++) w[j] = a[rt[j]];
    float denom = renorm ? xr_lane_sum(w, K, lanes, acc) + eps : 1.0f;
    for (int j = 0; j < K; j++) {
        float x = renorm ? w[j] / denom : w[j];
        di[j] = (int32_t)rt[j];
        dw[j] = scale != 0.0f ? x * scale : x;
    }
}

int xshare_cpu_router_served(int T, int E, int K, int OW, int PK, const float *score, const float *bias,
                             int round_aff, int choice_bf16, int gate, int G, int topk_group, const int32_t *prefer,
                             int n_valid, int apply, int budget, int k0, const uint8_t *exact,
                             const int32_t *src_ids, const float *src_w, int renorm, float eps, int lanes,
                             float scale, float sum_scale,
                             float *affinity, int32_t *ids, uint8_t *replaced, uint8_t *flags, int64_t *counts,
                             int32_t *dst_ids, float *dst_w, int engine_sorted, int32_t *engine_out) {
    int64_t n = (int64_t)T * E;
    float *choice = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    uint8_t *reach = G > 0 ? malloc((size_t)(n > 0 ? n : 1)) : NULL;
    double *colsum = malloc(sizeof(double) * (size_t)(E > 0 ? E : 1));
    int64_t *route = malloc(sizeof(int64_t) * (size_t)(T > 0 ? T * (int64_t)K : 1));
    float *gscore = malloc(sizeof(float) * (size_t)(G > 0 ? G : 1));
    int64_t *gpick = malloc(sizeof(int64_t) * (size_t)(G > 0 ? G : 1));
    xr_item *items = malloc(sizeof(xr_item) * (size_t)(G > 0 ? G : 1));
    float *w = malloc(sizeof(float) * (size_t)(K > 0 ? K : 1));
    float *acc = malloc(sizeof(float) * (size_t)(lanes > 0 ? lanes : 1));
    int deferred = src_ids == NULL;
    float *engine_w = deferred ? malloc(sizeof(float) * (size_t)(T > 0 ? T * (int64_t)K : 1)) : NULL;
    float *row_key = deferred ? malloc(sizeof(float) * (size_t)(E > 0 ? E : 1)) : NULL;
    xr_item *row_items = deferred ? malloc(sizeof(xr_item) * (size_t)(E > 0 ? E : 1)) : NULL;
    int status = XS_OK;
    if (!choice || (G > 0 && !reach) || !colsum || !route || !gscore || !gpick || !items || !w || !acc
        || (deferred && (!engine_w || !row_key || !row_items || !engine_out))) {
        status = XS_NO_MEMORY;
        goto done;
    }
    n_valid = xs_valid_rows(n_valid, T);
    for (int64_t i = 0; i < n; i++) {
        float s = score[i];
        affinity[i] = round_aff ? xr_round_bf16(s) : s;
        float c = bias ? s + bias[i % E] : s;
        choice[i] = choice_bf16 ? xr_round_bf16(c) : c;
    }
    int per_group = G > 0 ? E / G : E;
    for (int t = 0; G > 0 && t < T; t++) { /* SGLang's group choice: the experts each token reaches */
        const float *c = choice + (int64_t)t * E;
        uint8_t *r = reach + (int64_t)t * E;
        xr_group_scores(c, NULL, G, per_group, gate, choice_bf16, gscore);
        xr_topk(gscore, G, topk_group, 0, items, gpick);
        for (int e = 0; e < E; e++) r[e] = 0;
        for (int j = 0; j < topk_group; j++)
            for (int e = 0; e < per_group; e++) r[gpick[j] * per_group + e] = 1;
    }
    if (deferred) { /* SGLang's gate: the unrestricted picks and their weights */
        const float unreached = gate == XR_GROUPED ? 0.0f : -1.0f / 0.0f;
        for (int t = 0; t < T; t++) {
            const float *c = choice + (int64_t)t * E;
            const uint8_t *r = reach ? reach + (int64_t)t * E : NULL;
            for (int e = 0; e < E; e++) row_key[e] = (r && !r[e]) ? unreached : c[e];
            int64_t *rt = route + (int64_t)t * K;
            xr_topk(row_key, E, K, engine_sorted, row_items, rt);
            xr_write_row(rt, affinity + (int64_t)t * E, K, renorm, eps, lanes, scale, w, acc,
                         engine_out + (int64_t)t * K, engine_w + (int64_t)t * K);
        }
        prefer = engine_out, src_ids = engine_out, src_w = engine_w, PK = K, OW = K;
    }
    for (int e = 0; e < E; e++) colsum[e] = 0.0;
    if (apply) { /* the reference's fixed-point column sums (common.fixed_point_totals, units of 1/sum_scale) */
        for (int e = 0; e < E; e++) {
            int64_t total = 0;
            for (int t = 0; t < n_valid; t++) {
                int64_t i = (int64_t)t * E + e;
                if ((!reach || reach[i]) && xr_finite(choice[i])) total += (int64_t)(affinity[i] * sum_scale);
            }
            colsum[e] = (double)total;
        }
    }
    status = xshare_cpu_router(T, E, K, K, PK, choice, reach, colsum, prefer, n_valid, apply, budget, k0, NULL,
                               exact, gate, G, topk_group, gate == XR_GROUPED ? 0.0f : -1.0f / 0.0f, choice_bf16, 1,
                               route, ids, replaced, flags, flags + E, flags + 2 * E, counts);
    if (status != XS_OK) goto done;
    int64_t n_active = 0, n_vanilla = 0;
    for (int e = 0; e < E; e++) n_active += flags[E + e], n_vanilla += flags[2 * E + e];
    counts[3] = n_active;
    counts[4] = n_vanilla;
    for (int t = 0; t < T; t++) {
        int32_t *di = dst_ids + (int64_t)t * OW;
        float *dw = dst_w + (int64_t)t * OW;
        const int32_t *si = src_ids + (int64_t)t * OW;
        const float *sw = src_w + (int64_t)t * OW;
        for (int j = 0; j < OW; j++) di[j] = si[j], dw[j] = sw[j];
        if (replaced[t])
            xr_write_row(route + (int64_t)t * K, affinity + (int64_t)t * E, K, renorm, eps, lanes, scale, w, acc,
                         di, dw);
    }
done:
    free(engine_w);
    free(row_key);
    free(row_items);
    free(choice);
    free(reach);
    free(colsum);
    free(route);
    free(gscore);
    free(gpick);
    free(items);
    free(w);
    free(acc);
    return status;
}
