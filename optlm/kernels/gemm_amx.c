/* int8 weights times int16 activations for many rows at once (prompts, big batches) on Intel AMX tiles.
 *
 * The same product as optlm_linear_i8 in linear_avx2.c, with the same rounding: rows of x quantized to int16
 * (one scale per row), exact integer sums against the int8 weight, one conversion to float, times the row's
 * and the output channel's scales, plus bias. Only the arithmetic moves to AMX's int8 tile multiply, which
 * takes bytes: each int16 activation is split into a signed high byte and an unsigned low byte,
 * xq = 256 * hi + lo, and the two products are summed in 64 bits (tdpbssd for hi, tdpbsud for lo).
 *
 * Layout: AMX multiplies A (16 rows x 64 bytes) by B (16 rows of 4-byte groups) into C (16 x 16 int32),
 * C[i][j] = sum over k of A[i][k] * B[k/4][4j + k%4]. A is read straight from the weight (rows = output
 * channels, 64 inputs each, stride K): weights need no repacking. B holds 16 rows of x per tile, packed per
 * call in that 4-byte-group order (hi and lo separately), which costs one pass over x. C comes out as
 * [channel][row] and is written to y transposed.
 *
 * Needs a CPU with AMX-INT8 (Sapphire Rapids and later), a compiler that knows it (the build is
 * -march=native), and Linux's permission for the process to use tile data (arch_prctl, Linux 5.16+), asked
 * for once. optlm_gemm_i8_amx returns -3 when any of that is missing, and the caller runs its AVX loop.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static int amx_permission(void) {
    static int state = 0; /* 0 unknown, 1 granted, -1 refused */
    if (state == 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

/* Tiles: 0-1 hi sums and 2-3 lo sums for two blocks of 16 channels, 4-5 the two weight blocks, 6-7 x (hi, lo). */
static void configure(void) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* Rows of x quantized to int16 exactly as linear_avx2.c's quantize_rows_i16 does (same scale, same rounding),
 * straight into B tiles: tile (m / 16, k / 64), row (k % 64) / 4, bytes 4 * (m % 16) + k % 4; rows past M are
 * zeros. Each 16 inputs become 16 high and 16 low bytes, stored as four 4-byte groups 64 bytes apart. */
static void pack_rows(const float *x, float *sx, uint8_t *hi, uint8_t *lo, long M, long Mp, long K, int nthreads) {
    const long KS = K / 64;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long m = 0; m < Mp; m++) {
        const long mt = m / 16, jm = m % 16;
        const float *r = x + m * K;
        float inv = 0.f;
        if (m < M) {
            __m512 mx16 = _mm512_setzero_ps();
            for (long k = 0; k < K; k += 16) mx16 = _mm512_max_ps(mx16, _mm512_abs_ps(_mm512_loadu_ps(r + k)));
            const float mx = _mm512_reduce_max_ps(mx16);
            const float s = mx > 0.f ? mx / 32767.f : 1.f;
            inv = 1.f / s;
            sx[m] = s;
        }
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i low8 = _mm512_set1_epi32(255);
        for (long ks = 0; ks < KS; ks++) {
            uint8_t *dh = hi + (mt * KS + ks) * 1024 + jm * 4, *dl = lo + (mt * KS + ks) * 1024 + jm * 4;
            for (int q = 0; q < 4; q++) {
                __m512i v = m < M ? _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + ks * 64 + q * 16), vinv))
                                  : _mm512_setzero_si512();
                uint32_t h[4], l[4];
                _mm_storeu_si128((__m128i *)h, _mm512_cvtepi32_epi8(_mm512_srai_epi32(v, 8))); /* -128 .. 127 */
                _mm_storeu_si128((__m128i *)l, _mm512_cvtepi32_epi8(_mm512_and_si512(v, low8))); /* 0 .. 255 */
                for (int g = 0; g < 4; g++) {
                    memcpy(dh + (q * 4 + g) * 64, &h[g], 4);
                    memcpy(dl + (q * 4 + g) * 64, &l[g], 4);
                }
            }
        }
    }
}

/* 1 when this build has the tile kernel and the process may use tiles. */
int optlm_amx_int8(void) { return amx_permission(); }

int optlm_gemm_i8_amx(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, long M,
                      long N, long K, int nthreads) {
    /* K in whole tiles; N in pairs of 16-channel blocks; lo sums 255 * 127 * K within int32 */
    if (K % 64 || N % 32 || K >= 65536 || M < 1 || !amx_permission()) return -3;
    const long Mp = (M + 15) / 16 * 16, KS = K / 64, MT = Mp / 16;
    uint8_t *hi = aligned_alloc(64, Mp * K), *lo = aligned_alloc(64, Mp * K);
    float *sx = malloc(sizeof(float) * M);
    if (!hi || !lo || !sx) {
        free(hi), free(lo), free(sx);
        return -1;
    }
    pack_rows(x, sx, hi, lo, M, Mp, K, nthreads);
    /* Rows go in chunks whose packed x (2 bytes per input) stays in L2 while every weight block meets it: the
     * weights are read once per chunk, x once in all. */
    long chunk = (256 * 1024) / (16 * K);
    chunk = chunk < 1 ? 1 : chunk > 16 ? 16 : chunk;
#pragma omp parallel num_threads(nthreads)
    {
        configure(); /* tile configuration is per thread */
        int32_t c[4][16][16];
        for (long mc = 0; mc < MT; mc += chunk)
#pragma omp for schedule(static) nowait
        for (long n0 = 0; n0 < N; n0 += 32) {
            for (long mt = mc; mt < MT && mt < mc + chunk; mt++) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (long ks = 0; ks < KS; ks++) {
                    _tile_loadd(4, w + n0 * K + ks * 64, K);
                    _tile_loadd(5, w + (n0 + 16) * K + ks * 64, K);
                    _tile_loadd(6, hi + (mt * KS + ks) * 1024, 64);
                    _tile_loadd(7, lo + (mt * KS + ks) * 1024, 64);
                    _tile_dpbssd(0, 4, 6);
                    _tile_dpbssd(1, 5, 6);
                    _tile_dpbsud(2, 4, 7);
                    _tile_dpbsud(3, 5, 7);
                }
                _tile_stored(0, c[0], 64);
                _tile_stored(1, c[1], 64);
                _tile_stored(2, c[2], 64);
                _tile_stored(3, c[3], 64);
                for (long j = 0; j < 16 && mt * 16 + j < M; j++) {
                    const long m = mt * 16 + j;
                    for (int h = 0; h < 2; h++)
                        for (int i = 0; i < 16; i++) {
                            const long n = n0 + 16 * h + i;
                            float v = (float)((int64_t)c[h][i][j] * 256 + c[2 + h][i][j]);
                            v *= sx[m] * scale[n];
                            y[m * N + n] = bias ? v + bias[n] : v;
                        }
                }
            }
        }
        _tile_release();
    }
    free(hi), free(lo), free(sx);
    return 0;
}

#else

int optlm_amx_int8(void) { return 0; }

int optlm_gemm_i8_amx(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, long M,
                      long N, long K, int nthreads) {
    (void)x, (void)w, (void)scale, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return -3; /* built without AMX-INT8 */
}

#endif
