/* The float dot product the attention kernels share (paged_attention.c, decode_step.c). */
#ifndef OPTLM_DOT_H
#define OPTLM_DOT_H
#include <immintrin.h>

/* a . b over D floats: two FMA chains of 8 lanes, then the tail. */
static inline float dot(const float *a, const float *b, long D) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    long d = 0;
    for (; d + 16 <= D; d += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), s1);
    }
    for (; d + 8 <= D; d += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
    __m256 v = _mm256_add_ps(s0, s1);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    float acc = _mm_cvtss_f32(t);
    for (; d < D; d++) acc += a[d] * b[d];
    return acc;
}

#endif
