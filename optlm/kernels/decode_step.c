/* One decode step of a pre-LN or post-LN transformer decoder, all layers in one call: one new token per row.
 *
 * Why: a decode step of a small model is many small operations. Run from Python, each layer norm, residual add,
 * reshape and attention call costs its own dispatch (tens of microseconds), and PyTorch's CPU attention for a
 * single query was ~0.5 ms per layer; together they took more time than reading the weights. Here the whole
 * step is plain loops between the matmul kernels of linear_avx2.c, driven by a description of the model built
 * once (optlm/decode_step.py). Per row b: the embedded token x[b] goes through every layer
 *
 *   pre-LN:  x += out(attn(qkv(norm1(x))));  x += fc2(act(fc1(norm2(x))))
 *   post-LN: x = norm1(x + out(attn(qkv(x))));  x = norm2(x + fc2(act(fc1(x))))
 *
 * then the final norm (if any), the output projection (if any) and the head give its logits. q is scaled
 * after its projection and before q·k (fairseq's order, as the reference). Attention reads each row's cached
 * keys/values in place and writes the new ones first, wherever the cache keeps them: the key of row b, head h,
 * slot s lies at k + b * batch_stride + h * head_stride + slot * slot_stride (floats), where slot is column s
 * of the row's slot table (or s itself without one). That covers the contiguous cache (slots numbered per
 * row) and the paged one (slots in a shared pool).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dot.h"

void optlm_linear_f32(const float *x, const float *w, const float *bias, float *y, long M, long N, long K,
                      int nthreads);
int optlm_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *y, long M, long N, long K,
                      int nthreads);
int optlm_linear_i8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, long M,
                    long N, long K, int nthreads);
int optlm_linear_i4(const float *x, const uint8_t *w, const float *scale, const float *minv, const float *bias,
                    float *y, long M, long N, long K, long gs, int nthreads);

enum { LIN_F32 = 0, LIN_BF16 = 1, LIN_I8 = 2, LIN_I4 = 3 };
enum { ACT_RELU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2 };

typedef struct {
    int kind;
    const void *w;
    const float *scales, *mins, *bias; /* scales: int8 (n,), int4 (n, k / group); mins: int4 only */
    long n, k, group;
} optlm_linear;

typedef struct {
    const float *w, *b; /* NULL: no elementwise affine */
} optlm_norm;

typedef struct {
    optlm_norm norm1, norm2; /* before (pre-LN) or after (post-LN) attention and MLP */
    optlm_linear q, k, v, out, fc1, fc2; /* q, k, v may be row blocks of one fused weight */
    optlm_linear qkv;                    /* that fused weight, run in one call; n = 0: none */
} optlm_layer;

typedef struct {
    long layers, hidden, heads, head_dim;
    int pre_ln, act, final_norm; /* final_norm: 0 none, 1 apply */
    float scaling, eps;
    const optlm_layer *layer;
    optlm_norm norm_f;
    const optlm_linear *project_out; /* NULL: none */
    const optlm_linear *head;
} optlm_model;

/* Where this step's keys/values live (see the top of the file); strides in floats. */
typedef struct {
    float *k, *v;
    long layer_stride, batch_stride, head_stride, slot_stride;
    const int64_t *slots; /* (B, S), or NULL: slot s of every row is s */
    long S;
    const int64_t *lens;  /* (B,): keys row b reads, its new one last */
    const uint8_t *valid; /* (B, S), or NULL: every key is real (else left padding is 0) */
} optlm_cache;

static int linear(const optlm_linear *L, const float *x, float *y, long M, int nt) {
    switch (L->kind) {
        case LIN_F32: optlm_linear_f32(x, L->w, L->bias, y, M, L->n, L->k, nt); return 0;
        case LIN_BF16: return optlm_linear_bf16(x, L->w, L->bias, y, M, L->n, L->k, nt);
        case LIN_I8: return optlm_linear_i8(x, L->w, L->scales, L->bias, y, M, L->n, L->k, nt);
        case LIN_I4: return optlm_linear_i4(x, L->w, L->scales, L->mins, L->bias, y, M, L->n, L->k, L->group, nt);
    }
    return -3;
}

/* Layer norm of each of M rows of width d, from x into y (which may be x). Two passes, as PyTorch's kernel. */
static void norm(const optlm_norm *n, const float *x, float *y, long M, long d, float eps) {
    for (long m = 0; m < M; m++) {
        const float *r = x + m * d;
        float *o = y + m * d;
        float mean = 0.f, var = 0.f;
        for (long i = 0; i < d; i++) mean += r[i];
        mean /= (float)d;
        for (long i = 0; i < d; i++) var += (r[i] - mean) * (r[i] - mean);
        float inv = 1.f / sqrtf(var / (float)d + eps);
        for (long i = 0; i < d; i++) {
            float v = (r[i] - mean) * inv;
            o[i] = n->w ? v * n->w[i] + n->b[i] : v;
        }
    }
}

static void activate(float *x, long n, int act) {
    for (long i = 0; i < n; i++) {
        float v = x[i];
        if (act == ACT_RELU) x[i] = v > 0.f ? v : 0.f;
        else if (act == ACT_GELU) x[i] = 0.5f * v * (1.f + erff(v * (float)M_SQRT1_2));
        else x[i] = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

static inline long slot_of(const int64_t *slots, long S, long b, long s) { return slots ? slots[b * S + s] : s; }

/* Attention of row b's new query over its keys 0 .. len[b] - 1 (the last is the new token, written here first).
 * q (already scaled), k, v: (B, d) each; out: (B, d); scores: (B, H, S) scratch. */
static void attend(const optlm_model *m, const optlm_cache *c, long l, const float *q_new, const float *k_new,
                   const float *v_new, float *out, float *scores, long B, int nt) {
    const long H = m->heads, D = m->head_dim, d = m->hidden, S = c->S;
    float *kc = c->k + l * c->layer_stride, *vc = c->v + l * c->layer_stride;
    const int64_t *slots = c->slots, *lens = c->lens;
    const uint8_t *valid = c->valid;
    for (long b = 0; b < B; b++) { /* store the new keys/values */
        long slot = slot_of(slots, S, b, lens[b] - 1);
        for (long h = 0; h < H; h++) {
            long at = b * c->batch_stride + h * c->head_stride + slot * c->slot_stride;
            memcpy(kc + at, k_new + b * d + h * D, sizeof(float) * D);
            memcpy(vc + at, v_new + b * d + h * D, sizeof(float) * D);
        }
    }
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
    for (long b = 0; b < B; b++) {
        for (long h = 0; h < H; h++) {
            const float *q = q_new + b * d + h * D;
            float *sc = scores + (b * H + h) * S, *o = out + b * d + h * D;
            const long n = lens[b], base = b * c->batch_stride + h * c->head_stride;
            float mx = -INFINITY;
            for (long s = 0; s < n; s++) {
                if (valid && !valid[b * S + s]) {
                    sc[s] = -INFINITY; /* left padding: weight exactly 0, as the reference's masked softmax */
                    continue;
                }
                const float *k = kc + base + slot_of(slots, S, b, s) * c->slot_stride;
                float acc = dot(q, k, D);
                sc[s] = acc;
                mx = acc > mx ? acc : mx;
            }
            float sum = 0.f;
            for (long s = 0; s < n; s++) sum += (sc[s] = expf(sc[s] - mx));
            float inv = 1.f / sum;
            memset(o, 0, sizeof(float) * D);
            for (long s = 0; s < n; s++) {
                if (sc[s] == 0.f) continue;
                const float *v = vc + base + slot_of(slots, S, b, s) * c->slot_stride, p = sc[s] * inv;
                for (long i = 0; i < D; i++) o[i] += p * v[i];
            }
        }
    }
}

/* Parts of a step, for optlm_decode_step's optional timing (seconds added per part). */
enum { T_QKV, T_ATTN, T_OUT, T_FC1, T_FC2, T_HEAD, T_OTHER, T_PARTS };

/* x (B, d): the embedded new tokens, overwritten. hidden (B, e) and logits (B, V) receive the outputs.
 * timing: NULL, or T_PARTS doubles to which each part's seconds are added (OTHER: norms, residuals, activation).
 * Returns 0; -1 when scratch memory could not be allocated. */
int optlm_decode_step(const optlm_model *m, const optlm_cache *c, float *x, long B, float *hidden, float *logits,
                      int nt, double *timing) {
    const long d = m->hidden, S = c->S;
    long ffn = 0;
    for (long l = 0; l < m->layers; l++) ffn = m->layer[l].fc1.n > ffn ? m->layer[l].fc1.n : ffn;
    float *h = malloc(sizeof(float) * B * d), *q = malloc(sizeof(float) * B * 3 * d),
          *att = malloc(sizeof(float) * B * d), *f = malloc(sizeof(float) * B * (ffn > d ? ffn : d)),
          *sc = malloc(sizeof(float) * B * m->heads * (S > 0 ? S : 1)),
          *rows3 = B > 1 ? malloc(sizeof(float) * B * 3 * d) : q; /* a fused q/k/v call's (B, 3d) output */
    float *k = q + B * d, *v = q + 2 * B * d;
    int rc = (!h || !q || !att || !f || !sc || !rows3) ? -1 : 0;
    double t = timing ? omp_get_wtime() : 0;
#define LAP(part)                                       \
    if (timing) {                                       \
        double now = omp_get_wtime();                   \
        timing[part] += now - t;                        \
        t = now;                                        \
    }
    for (long l = 0; l < m->layers && rc == 0; l++) {
        const optlm_layer *L = m->layer + l;
        if (m->pre_ln) norm(&L->norm1, x, h, B, d, m->eps);
        LAP(T_OTHER);
        const float *in = m->pre_ln ? h : x;
        if (L->qkv.n == 3 * d) {
            rc |= linear(&L->qkv, in, rows3, B, nt);
            for (long b = 0; b < B && rows3 != q; b++) { /* rows [q_b k_b v_b] into q, k, v (B, d) each */
                memcpy(q + b * d, rows3 + b * 3 * d, sizeof(float) * d);
                memcpy(k + b * d, rows3 + b * 3 * d + d, sizeof(float) * d);
                memcpy(v + b * d, rows3 + b * 3 * d + 2 * d, sizeof(float) * d);
            }
        } else
            rc |= linear(&L->q, in, q, B, nt) | linear(&L->k, in, k, B, nt) | linear(&L->v, in, v, B, nt);
        LAP(T_QKV);
        for (long i = 0; i < B * d; i++) q[i] *= m->scaling;
        attend(m, c, l, q, k, v, att, sc, B, nt);
        LAP(T_ATTN);
        rc |= linear(&L->out, att, h, B, nt);
        LAP(T_OUT);
        for (long i = 0; i < B * d; i++) x[i] += h[i];
        if (!m->pre_ln) norm(&L->norm1, x, x, B, d, m->eps);
        if (m->pre_ln) norm(&L->norm2, x, h, B, d, m->eps);
        LAP(T_OTHER);
        rc |= linear(&L->fc1, m->pre_ln ? h : x, f, B, nt);
        LAP(T_FC1);
        activate(f, B * L->fc1.n, m->act);
        LAP(T_OTHER);
        rc |= linear(&L->fc2, f, h, B, nt);
        LAP(T_FC2);
        for (long i = 0; i < B * d; i++) x[i] += h[i];
        if (!m->pre_ln) norm(&L->norm2, x, x, B, d, m->eps);
        LAP(T_OTHER);
    }
    if (rc == 0) {
        if (m->final_norm) norm(&m->norm_f, x, x, B, d, m->eps);
        if (m->project_out) rc |= linear(m->project_out, x, hidden, B, nt);
        else memcpy(hidden, x, sizeof(float) * B * d);
        LAP(T_OTHER);
        rc |= linear(m->head, hidden, logits, B, nt);
        LAP(T_HEAD);
    }
#undef LAP
    if (rows3 != q) free(rows3);
    free(h), free(q), free(att), free(f), free(sc);
    return rc ? -1 : 0;
}
