/* Decode-step attention straight from a paged key/value cache (optlm/cache.py), float32.
 *
 * Why: with many sequences decoding at once, attention reads every cached key and value once per step, and in
 * plain PyTorch each sequence's scattered slots must first be gathered into a padded (B, S) copy — written and
 * read again, at the longest sequence's length — which cost more than the attention itself. These two passes
 * read each sequence's own slots where they lie, and only up to its own length:
 *   optlm_paged_qk: scores[b, h, s] = q[b, h] . k[slot(b, s), h]         (s < len[b])
 *   optlm_paged_pv: out[b, h]       = sum_s p[b, h, s] * v[slot(b, s), h] (s < len[b])
 * The softmax between them runs in PyTorch on the small (B, H, S) score tensor. Keys/values are laid out
 * (slots, H, D) for one layer; slot(b, s) = slots[b * S + s]. Work is split over (sequence, head) pairs.
 */
#include <stdint.h>
#include <string.h>

#include "dot.h"

void optlm_paged_qk(const float *restrict q, const float *restrict k, const int64_t *restrict slots,
                    const int64_t *restrict lens, float *restrict scores, long B, long H, long D, long S,
                    int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (long b = 0; b < B; b++) {
        for (long h = 0; h < H; h++) {
            const float *qv = q + (b * H + h) * D;
            float *out = scores + (b * H + h) * S;
            const int64_t *sl = slots + b * S;
            for (long s = 0; s < lens[b]; s++) {
                out[s] = dot(qv, k + (sl[s] * H + h) * D, D);
            }
        }
    }
}

void optlm_paged_pv(const float *restrict p, const float *restrict v, const int64_t *restrict slots,
                    const int64_t *restrict lens, float *restrict out, long B, long H, long D, long S,
                    int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (long b = 0; b < B; b++) {
        for (long h = 0; h < H; h++) {
            const float *w = p + (b * H + h) * S;
            float *o = out + (b * H + h) * D;
            const int64_t *sl = slots + b * S;
            memset(o, 0, (size_t)D * sizeof(float));
            for (long s = 0; s < lens[b]; s++) {
                const float *vv = v + (sl[s] * H + h) * D;
                const float ws = w[s];
                for (long d = 0; d < D; d++) o[d] += ws * vv[d];
            }
        }
    }
}
