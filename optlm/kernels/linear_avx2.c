/* Linear layers for x86 CPUs with AVX2 + FMA: y = x @ W.T (* scale) (+ bias), x (M, K) float32, W (N, K).
 *
 * Why these exist: decoding multiplies a few rows by every weight once per token, so it is bound by how fast
 * weights stream from memory. PyTorch's int8 weight-only and bf16 CPU kernels are vectorised for AVX-512 only
 * and run scalar fallbacks on AVX2, and its fp32 matrix-vector product reads weights at about half the
 * memory bandwidth (the result: benchmarks/kernels.py). What mattered while writing them:
 *   - one weight row at a time, contiguous, with a software prefetch ~1 KiB ahead: on a VM the hardware
 *     prefetcher alone streamed about half as fast from DRAM;
 *   - int8 (and int4) weights meet int16 activations (quantized here, one scale per row of x) through vpmaddwd, 16
 *     products per instruction with no int->float conversion per weight; int16 keeps ~15 bits of each row,
 *     more than bf16's 8, and partial sums are moved to float every CHUNK inputs so int32 cannot overflow;
 *   - up to MB rows of x share each weight load (batched decode, short prompts).
 * Rows of W are split across threads with OpenMP (the runtime PyTorch already loaded). Built and loaded by
 * optlm/kernels/__init__.py; tests/test_kernels.py holds them to float64 references.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MB 8          /* most rows of x per pass over a weight row (bf16: 4, its two sums per row fill the registers) */
#define PREFETCH 1024 /* bytes ahead of the weight row being read */
#define CHUNK 4096    /* int8 inputs summed per int32 lane before moving on: 4096/16 * 2*127*32767 < 2^31 */

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* In 64 bits: each lane may be near 2^31, their sum is not. */
static inline int64_t hsum_epi32(__m256i v) {
    __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)), hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1));
    __m256i s = _mm256_add_epi64(lo, hi);
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }

/* One output column n for rows x[0..mb): out[i] = dot(x[i], w), float weights. */
#define FLOAT_ROW(NAME, WT, LOAD, SCALAR)                                                                        \
    static inline void NAME(const float *x, long K, const WT *w, int mb, float *out) {                          \
        __m256 acc[MB];                                                                                          \
        for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();                                               \
        long k = 0;                                                                                              \
        for (; k + 8 <= K; k += 8) {                                                                             \
            _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);                                        \
            __m256 wv = LOAD(w + k);                                                                             \
            for (int i = 0; i < MB; i++)                                                                         \
                if (i < mb) acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * K + k), acc[i]);                \
        }                                                                                                        \
        for (int i = 0; i < mb; i++) {                                                                           \
            float s = hsum_ps(acc[i]);                                                                           \
            for (long kk = k; kk < K; kk++) s += x[i * K + kk] * SCALAR(w[kk]);                                  \
            out[i] = s;                                                                                          \
        }                                                                                                        \
    }
#define AS_FLOAT(v) (v)
FLOAT_ROW(row_f32, float, load8_f32, AS_FLOAT)

/* bf16 weights, 16 at a time with no widening: a 32-bit lane holding (w[2i], w[2i+1]) is w[2i+1] as a float
 * once its low half is masked off, and w[2i] once shifted left by 16. So the rows of x are split beforehand
 * into even and odd elements (xs: for each row, the K16/2 even ones, then the K16/2 odd ones), and each 16
 * weights cost one load, a shift, an and and two FMAs. Inputs past K16 (the multiple of 16) use x itself. */
static inline void row_bf16(const float *x, const float *xs, long K, const uint16_t *w, int mb, float *out) {
    const long K16 = K & ~15L, H = K16 / 2;
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[MB], acc2[MB];
    for (int i = 0; i < MB; i++) acc[i] = acc2[i] = _mm256_setzero_ps();
    for (long k = 0; k < K16; k += 16) {
        _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + k));
        __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
        for (int i = 0; i < MB; i++)
            if (i < mb) {
                acc[i] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs + i * K + k / 2), acc[i]);
                acc2[i] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs + i * K + H + k / 2), acc2[i]);
            }
    }
    for (int i = 0; i < mb; i++) {
        float s = hsum_ps(_mm256_add_ps(acc[i], acc2[i]));
        for (long kk = K16; kk < K; kk++) s += x[i * K + kk] * bf16_to_float(w[kk]);
        out[i] = s;
    }
}

/* One output column n for int16 rows xq[0..mb): out[i] = dot(xq[i], w) as float, exact per CHUNK. */
static inline void row_i8(const int16_t *xq, long K, const int8_t *w, int mb, float *out) {
    for (int i = 0; i < mb; i++) out[i] = 0.f;
    for (long c0 = 0; c0 < K; c0 += CHUNK) {
        long c1 = c0 + CHUNK < K ? c0 + CHUNK : K;
        __m256i acc[MB];
        for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_si256();
        long k = c0;
        for (; k + 16 <= c1; k += 16) {
            _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);
            __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
            for (int i = 0; i < MB; i++)
                if (i < mb) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + i * K + k));
                    acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wv, xv));
                }
        }
        for (int i = 0; i < mb; i++) {
            int64_t s = hsum_epi32(acc[i]);
            for (long kk = k; kk < c1; kk++) s += (int64_t)xq[i * K + kk] * w[kk];
            out[i] += (float)s;
        }
    }
}

/* One row of x (batch-1 decoding) against W4 consecutive weight rows at once: out[r] = dot(x, w + r * K).
 * With one weight row at a time, a core had one stream of loads from memory in flight and read weights at about
 * half the speed it reaches with four (benchmarks/kernels.py); the row of x is loaded once for all four. */
#define W4 4
static inline void rows4_f32(const float *x, long K, const float *w, float *out) {
    __m256 acc[W4];
    for (int r = 0; r < W4; r++) acc[r] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        for (int r = 0; r < W4; r++) {
            _mm_prefetch((const char *)(w + r * K + k) + PREFETCH, _MM_HINT_T0);
            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xv, acc[r]);
        }
    }
    for (int r = 0; r < W4; r++) {
        float s = hsum_ps(acc[r]);
        for (long kk = k; kk < K; kk++) s += x[kk] * w[r * K + kk];
        out[r] = s;
    }
}

static inline void rows4_bf16(const float *x, const float *xs, long K, const uint16_t *w, float *out) {
    const long K16 = K & ~15L, H = K16 / 2;
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[W4], acc2[W4];
    for (int r = 0; r < W4; r++) acc[r] = acc2[r] = _mm256_setzero_ps();
    for (long k = 0; k < K16; k += 16) {
        __m256 xe = _mm256_loadu_ps(xs + k / 2), xo = _mm256_loadu_ps(xs + H + k / 2);
        for (int r = 0; r < W4; r++) {
            _mm_prefetch((const char *)(w + r * K + k) + PREFETCH, _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * K + k));
            acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, acc[r]);
            acc2[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), xo, acc2[r]);
        }
    }
    for (int r = 0; r < W4; r++) {
        float s = hsum_ps(_mm256_add_ps(acc[r], acc2[r]));
        for (long kk = K16; kk < K; kk++) s += x[kk] * bf16_to_float(w[r * K + kk]);
        out[r] = s;
    }
}

/* int8: with AVX-512 VNNI (known at build time: -march=native), 32 products per vpdpwssd; else AVX2.
 * Prefetch: int8 rows are short (768 bytes in opt-125m), so 1 KiB ahead in a row lands in the rows being read
 * anyway. The four rows are one contiguous run, and a thread reads its runs one after another, so each step
 * fetches the same share of a run at least I8_AHEAD bytes further on. An opt-125m int8 decode step went from
 * 6.6-6.8 to 5.7-6.0 ms (benchmarks/decode_profile.py); the same scheme made the fp32 and bf16 kernels slower
 * (benchmarks/kernels.py --rows 1 --huge-pages), so they keep theirs. */
#define I8_AHEAD 8192
static inline void rows4_i8(const int16_t *xq, long K, const int8_t *w, float *out) {
    const char *ahead = (const char *)w + W4 * K * ((I8_AHEAD + W4 * K - 1) / (W4 * K));
    for (int r = 0; r < W4; r++) out[r] = 0.f;
    for (long c0 = 0; c0 < K; c0 += CHUNK) {
        long c1 = c0 + CHUNK < K ? c0 + CHUNK : K, k = c0;
        int64_t sum[W4];
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
        __m512i acc[W4];
        for (int r = 0; r < W4; r++) acc[r] = _mm512_setzero_si512();
        for (; k + 32 <= c1; k += 32) {
            __m512i xv = _mm512_loadu_si512((const void *)(xq + k));
            _mm_prefetch(ahead + W4 * k, _MM_HINT_T0); /* 4 x 32 bytes consumed per step: two lines */
            _mm_prefetch(ahead + W4 * k + 64, _MM_HINT_T0);
            for (int r = 0; r < W4; r++) {
                __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + r * K + k)));
                acc[r] = _mm512_dpwssd_epi32(acc[r], wv, xv);
            }
        }
        for (int r = 0; r < W4; r++)
            sum[r] = hsum_epi32(_mm512_castsi512_si256(acc[r])) + hsum_epi32(_mm512_extracti64x4_epi64(acc[r], 1));
#else
        __m256i acc[W4];
        for (int r = 0; r < W4; r++) acc[r] = _mm256_setzero_si256();
        for (; k + 16 <= c1; k += 16) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
            _mm_prefetch(ahead + W4 * k, _MM_HINT_T0); /* 4 x 16 bytes consumed per step: one line */
            for (int r = 0; r < W4; r++) {
                __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + r * K + k)));
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(wv, xv));
            }
        }
        for (int r = 0; r < W4; r++) sum[r] = hsum_epi32(acc[r]);
#endif
        for (int r = 0; r < W4; r++) {
            for (long kk = k; kk < c1; kk++) sum[r] += (int64_t)xq[kk] * w[r * K + kk];
            out[r] += (float)sum[r];
        }
    }
}

/* The three kernels share one loop. Threads take blocks of NBLOCK columns n; within a block, each group of
 * up to ROWS rows of x meets every weight row of the block while both are still in cache (so x is read from
 * L2 once per block, not once per column: that is what makes prompts of 100+ rows fast). Common row counts
 * get a constant so the compiler unrolls the inner loop for them. */
#define NBLOCK 16
#define STORE(EPILOGUE, i_, n_, val)                                                                             \
    {                                                                                                            \
        const long i_at = (i_), n_at = (n_);                                                                     \
        const float v_at = (val);                                                                                \
        {                                                                                                        \
            const long i = i_at, n = n_at; /* the names EPILOGUE uses */                                        \
            float v = v_at;                                                                                      \
            EPILOGUE;                                                                                            \
            y[(m0 + i) * N + n] = bias ? v + bias[n] : v;                                                        \
        }                                                                                                        \
    }
#define DRIVE(ROW, ROW4, XT, X, W, WSTRIDE, ROWS, EPILOGUE)                                                      \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                          \
    for (long n0 = 0; n0 < N; n0 += NBLOCK) {                                                                    \
        float out[MB];                                                                                           \
        long n1 = n0 + NBLOCK < N ? n0 + NBLOCK : N;                                                             \
        for (long m0 = 0; m0 < M; m0 += (ROWS)) {                                                                \
            const XT *xb = (X) + m0 * K;                                                                         \
            int mb = M - m0 < (ROWS) ? (int)(M - m0) : (ROWS);                                                   \
            long n = n0;                                                                                         \
            if (mb == 1)                                                                                         \
                for (; n + W4 <= n1; n += W4) {                                                                  \
                    ROW4(xb, K, (W) + n * (WSTRIDE), out);                                                       \
                    for (int r = 0; r < W4; r++) STORE(EPILOGUE, 0, n + r, out[r])                               \
                }                                                                                                \
            for (; n < n1; n++) {                                                                                \
                const void *wr = (W) + n * (WSTRIDE);                                                            \
                switch (mb) {                                                                                    \
                    case 8: ROW(xb, K, wr, 8, out); break;                                                       \
                    case 1: ROW(xb, K, wr, 1, out); break;                                                       \
                    case 2: ROW(xb, K, wr, 2, out); break;                                                       \
                    case 3: ROW(xb, K, wr, 3, out); break;                                                       \
                    case 4: ROW(xb, K, wr, 4, out); break;                                                       \
                    default: ROW(xb, K, wr, mb, out); break;                                                     \
                }                                                                                                \
                for (long j = 0; j < mb; j++) STORE(EPILOGUE, j, n, out[j])                                      \
            }                                                                                                    \
        }                                                                                                        \
    }

void optlm_linear_f32(const float *x, const float *w, const float *bias, float *y, long M, long N, long K,
                      int nthreads) {
    DRIVE(row_f32, rows4_f32, float, x, w, K, 8, (void)0)
}

/* Returns 0, or -1 when scratch memory could not be allocated (y untouched). */
int optlm_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *y, long M, long N, long K,
                      int nthreads) {
    float *xs = malloc(sizeof(float) * M * K);
    if (!xs) return -1;
    const long K16 = K & ~15L, H = K16 / 2;
    for (long m = 0; m < M; m++)
        for (long j = 0; j < H; j++) {
            xs[m * K + j] = x[m * K + 2 * j];
            xs[m * K + H + j] = x[m * K + 2 * j + 1];
        }
#define ROW_BF16(xb, K, wr, mb, out) row_bf16(xb, xs + m0 * K, K, wr, mb, out)
#define ROW4_BF16(xb, K, wr, out) rows4_bf16(xb, xs + m0 * K, K, wr, out)
    DRIVE(ROW_BF16, ROW4_BF16, float, x, w, K, 4, (void)0)
#undef ROW_BF16
#undef ROW4_BF16
    free(xs);
    return 0;
}

/* Symmetric int16 per row of x: xq = round(x / sx), sx = max|x| / 32767. */
static void quantize_rows_i16(const float *x, int16_t *xq, float *sx, long M, long K, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K >= 65536)
    for (long m = 0; m < M; m++) {
        const float *r = x + m * K;
        float mx = 0.f;
        for (long k = 0; k < K; k++) mx = fmaxf(mx, fabsf(r[k]));
        float s = mx > 0.f ? mx / 32767.f : 1.f, inv = 1.f / s;
        sx[m] = s;
        for (long k = 0; k < K; k++) xq[m * K + k] = (int16_t)lrintf(r[k] * inv);
    }
}

#define AMX_MIN_ROWS 4 /* from here on the tile kernel wins (at 2 rows the AVX loop still does) */
int optlm_gemm_i8_amx(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, long M,
                      long N, long K, int nthreads);

/* Returns 0, or -1 when scratch memory could not be allocated (y untouched). */
int optlm_linear_i8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, long M,
                    long N, long K, int nthreads) {
    /* Prompts and big batches: the same sums on AMX tiles where the CPU has them (gemm_amx.c). */
    if (M >= AMX_MIN_ROWS && optlm_gemm_i8_amx(x, w, scale, bias, y, M, N, K, nthreads) == 0) return 0;
    int16_t *xq = malloc(sizeof(int16_t) * M * K);
    float *sx = malloc(sizeof(float) * M);
    if (!xq || !sx) {
        free(xq);
        free(sx);
        return -1;
    }
    quantize_rows_i16(x, xq, sx, M, K, nthreads);
    DRIVE(row_i8, rows4_i8, int16_t, xq, w, K, 8, v *= sx[m0 + i] * scale[n])
    free(xq);
    free(sx);
    return 0;
}

/* int4 weights, asymmetric per group of GS inputs: w = q * scale + min, q in [0, 15]. Packed two per byte,
 * byte j of a row = q[2j] | q[2j+1] << 4. Rows of x are int16 as above and, per 32 inputs, reordered into
 * their 16 even then 16 odd elements (xs), so a byte's low nibbles meet the even inputs and its high nibbles
 * the odd ones with no shuffles. Per group: exact integer dot product * scale, plus min * (sum of the
 * group's inputs, xg). Everything is then times the row's int16 scale (the epilogue). */
#define ROWS4 4
static inline void row_i4(const int16_t *xs, const float *xg, long K, long gs, const uint8_t *w, const float *sc,
                          const float *mn, int mb, float *out) {
    const long G = K / gs;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256 facc[ROWS4];
    float minpart[ROWS4];
    for (int i = 0; i < ROWS4; i++) facc[i] = _mm256_setzero_ps(), minpart[i] = 0.f;
    for (long g = 0; g < G; g++) {
        __m256i iacc[ROWS4];
        for (int i = 0; i < ROWS4; i++) iacc[i] = _mm256_setzero_si256();
        for (long k = g * gs; k < (g + 1) * gs; k += 32) {
            _mm_prefetch((const char *)(w + k / 2) + PREFETCH, _MM_HINT_T0);
            __m128i bytes = _mm_loadu_si128((const __m128i *)(w + k / 2));
            __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, low4));
            __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
            for (int i = 0; i < ROWS4; i++)
                if (i < mb) {
                    const int16_t *xr = xs + i * K + k;
                    __m256i e = _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xr));
                    __m256i o = _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xr + 16)));
                    iacc[i] = _mm256_add_epi32(iacc[i], _mm256_add_epi32(e, o));
                }
        }
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int i = 0; i < mb; i++) {
            facc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[i]), s, facc[i]);
            minpart[i] += mn[g] * xg[i * G + g];
        }
    }
    for (int i = 0; i < mb; i++) out[i] = hsum_ps(facc[i]) + minpart[i];
}

/* Returns 0; -1 when scratch memory could not be allocated; -2 when gs is not a multiple of 32 dividing K. */
int optlm_linear_i4(const float *x, const uint8_t *w, const float *scale, const float *minv, const float *bias,
                    float *y, long M, long N, long K, long gs, int nthreads) {
    if (gs <= 0 || gs % 32 || K % gs) return -2;
    const long G = K / gs;
    int16_t *xq = malloc(sizeof(int16_t) * M * K), *xs = malloc(sizeof(int16_t) * M * K);
    float *sx = malloc(sizeof(float) * M), *xg = malloc(sizeof(float) * M * G);
    if (!xq || !xs || !sx || !xg) {
        free(xq), free(xs), free(sx), free(xg);
        return -1;
    }
    quantize_rows_i16(x, xq, sx, M, K, nthreads);
    for (long m = 0; m < M; m++) {
        for (long k = 0; k < K; k += 32)
            for (long j = 0; j < 16; j++) {
                xs[m * K + k + j] = xq[m * K + k + 2 * j];
                xs[m * K + k + 16 + j] = xq[m * K + k + 2 * j + 1];
            }
        for (long g = 0; g < G; g++) {
            int64_t s = 0;
            for (long k = g * gs; k < (g + 1) * gs; k++) s += xq[m * K + k];
            xg[m * G + g] = (float)s;
        }
    }
#define ROW_I4(xb, K, wr, mb, out) row_i4(xb, xg + m0 * G, K, gs, wr, scale + n * G, minv + n * G, mb, out)
#define ROW4_I4(xb, K, wr, out)                                                                                    \
    for (int r = 0; r < W4; r++)                                                                                 \
        row_i4(xb, xg + m0 * G, K, gs, (const uint8_t *)(wr) + r * (K / 2), scale + (n + r) * G, minv + (n + r) * G, 1, \
               out + r)
    DRIVE(ROW_I4, ROW4_I4, int16_t, xs, w, K / 2, 4, v *= sx[m0 + i])
#undef ROW_I4
#undef ROW4_I4
    free(xq), free(xs), free(sx), free(xg);
    return 0;
}
