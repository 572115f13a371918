"""Decode kernels for x86-64 CPUs with AVX2/FMA: small-batch matrix-vector products and one-query attention.

Why they exist (measured, see docs/performance.md): a decode step is a chain of matrix-*vector* products
whose cost is reading the weights once. On the 2-core AVX2 machine Quill is tuned on, torch's fp32 path
(MKL sgemv) reads weights at about half the memory bandwidth, torch's int8 weight-only kernels
(`_weight_int8pack_mm`, fbgemm's dynamic int8) run at 2-6 GB/s because their fast paths need AVX-512, and
SDPA's CPU kernel on a slice of the preallocated cache costs far more than the arithmetic. The kernels
here read each weight row once, convert it to fp32 in registers (bf16/fp16/int8 weights) and accumulate
in fp32, so one decode step runs at the memory bound for every weight format.

They are plain C (no torch headers: builds in about a second), compiled on first use with the system C
compiler into the user cache and called through ctypes on tensors' data pointers. Threads come from
OpenMP: the library links `libgomp.so.1`, which resolves to the copy torch already loaded, so both share
one thread pool. Anything unsupported (no compiler, not x86-64/AVX2, `QUILL_KERNELS=0`) leaves
`available()` False and the model uses its plain torch path; results agree to float rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger("quill.kernels")

# dtype codes shared with the C source
F32, BF16, F16, I8 = 0, 1, 2, 3
DTYPE_CODES = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16, torch.int8: I8}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 32  # the matrix-vector kernel serves up to this many activation rows; beyond, BLAS GEMM wins

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

enum { F32 = 0, BF16 = 1, F16 = 2, I8 = 3 };

static inline float bf16_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float ld(const void* p, int dt, int64_t i) {
    switch (dt) {
        case F32: return ((const float*)p)[i];
        case BF16: return bf16_f32(((const uint16_t*)p)[i]);
        case F16: return _cvtsh_ss(((const uint16_t*)p)[i]);
        default: return (float)((const int8_t*)p)[i];
    }
}
static inline void st(void* p, int dt, int64_t i, float v) {
    switch (dt) {
        case F32: ((float*)p)[i] = v; break;
        case BF16: ((uint16_t*)p)[i] = f32_bf16(v); break;
        default: ((uint16_t*)p)[i] = _cvtss_sh(v, 0); break;
    }
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define VLOAD_F32(p) _mm256_loadu_ps(p)
#define VLOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p))), 16))
#define VLOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
#define VLOAD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p))))
#define SLOAD_F32(p) (p)[0]
#define SLOAD_BF16(p) bf16_f32((p)[0])
#define SLOAD_F16(p) _cvtsh_ss((p)[0])
#define SLOAD_I8(p) ((float)(p)[0])

/* Dot products of activation rows x[M, K] (fp32, row stride K) with weight rows W[n0:n1, K], results into
   acc[m * ldacc + (n - n0)]. Weight rows are read once per pair of activation rows. */
#define DEFINE_ROWS(SUF, WT, VLOAD, SLOAD)                                                                  \
static void rows_##SUF(const float* x, int64_t M, int64_t K, const WT* W, int64_t n0, int64_t n1,            \
                       float* acc, int64_t ldacc) {                                                        \
    const int64_t K8 = K & ~(int64_t)7, K16 = K & ~(int64_t)15;                                               \
    for (int64_t m = 0; m < M; m += 2) {                                                                     \
        const float* x0 = x + m * K;                                                                         \
        float* r0 = acc + m * ldacc;                                                                         \
        int64_t n = n0;                                                                                      \
        if (M - m >= 2) {                                                                                    \
            const float* x1 = x0 + K;                                                                        \
            float* r1 = r0 + ldacc;                                                                          \
            for (; n + 4 <= n1; n += 4) {                                                                    \
                const WT *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                          \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
                for (int64_t k = 0; k < K8; k += 8) {                                                        \
                    __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k);                         \
                    __m256 c0 = VLOAD(w0 + k), c1 = VLOAD(w1 + k), c2 = VLOAD(w2 + k), c3 = VLOAD(w3 + k);    \
                    a0 = _mm256_fmadd_ps(u, c0, a0); a1 = _mm256_fmadd_ps(u, c1, a1);                        \
                    a2 = _mm256_fmadd_ps(u, c2, a2); a3 = _mm256_fmadd_ps(u, c3, a3);                        \
                    b0 = _mm256_fmadd_ps(v, c0, b0); b1 = _mm256_fmadd_ps(v, c1, b1);                        \
                    b2 = _mm256_fmadd_ps(v, c2, b2); b3 = _mm256_fmadd_ps(v, c3, b3);                        \
                }                                                                                            \
                float s[8] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3), hsum(b0), hsum(b1), hsum(b2), hsum(b3)}; \
                for (int64_t k = K8; k < K; k++) {                                                           \
                    float c0 = SLOAD(w0 + k), c1 = SLOAD(w1 + k), c2 = SLOAD(w2 + k), c3 = SLOAD(w3 + k);     \
                    s[0] += x0[k] * c0; s[1] += x0[k] * c1; s[2] += x0[k] * c2; s[3] += x0[k] * c3;          \
                    s[4] += x1[k] * c0; s[5] += x1[k] * c1; s[6] += x1[k] * c2; s[7] += x1[k] * c3;          \
                }                                                                                            \
                for (int j = 0; j < 4; j++) { r0[n - n0 + j] = s[j]; r1[n - n0 + j] = s[4 + j]; }            \
            }                                                                                                \
            for (; n < n1; n++) {                                                                            \
                const WT* w0 = W + n * K;                                                                    \
                __m256 a0 = _mm256_setzero_ps(), b0 = a0;                                                    \
                for (int64_t k = 0; k < K8; k += 8) {                                                        \
                    __m256 c0 = VLOAD(w0 + k);                                                               \
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), c0, a0);                                   \
                    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), c0, b0);                                   \
                }                                                                                            \
                float s0 = hsum(a0), s1 = hsum(b0);                                                          \
                for (int64_t k = K8; k < K; k++) { float c = SLOAD(w0 + k); s0 += x0[k] * c; s1 += x1[k] * c; } \
                r0[n - n0] = s0; r1[n - n0] = s1;                                                            \
            }                                                                                                \
        } else {                                                                                             \
            for (; n + 4 <= n1; n += 4) {                                                                    \
                const WT *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                          \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
                int64_t k = 0;                                                                               \
                for (; k < K16; k += 16) {                                                                   \
                    __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x0 + k + 8);                     \
                    a0 = _mm256_fmadd_ps(u, VLOAD(w0 + k), a0); a1 = _mm256_fmadd_ps(u, VLOAD(w1 + k), a1);  \
                    a2 = _mm256_fmadd_ps(u, VLOAD(w2 + k), a2); a3 = _mm256_fmadd_ps(u, VLOAD(w3 + k), a3);  \
                    b0 = _mm256_fmadd_ps(v, VLOAD(w0 + k + 8), b0); b1 = _mm256_fmadd_ps(v, VLOAD(w1 + k + 8), b1); \
                    b2 = _mm256_fmadd_ps(v, VLOAD(w2 + k + 8), b2); b3 = _mm256_fmadd_ps(v, VLOAD(w3 + k + 8), b3); \
                }                                                                                            \
                for (; k < K8; k += 8) {                                                                     \
                    __m256 u = _mm256_loadu_ps(x0 + k);                                                      \
                    a0 = _mm256_fmadd_ps(u, VLOAD(w0 + k), a0); a1 = _mm256_fmadd_ps(u, VLOAD(w1 + k), a1);  \
                    a2 = _mm256_fmadd_ps(u, VLOAD(w2 + k), a2); a3 = _mm256_fmadd_ps(u, VLOAD(w3 + k), a3);  \
                }                                                                                            \
                float s[4] = {hsum(_mm256_add_ps(a0, b0)), hsum(_mm256_add_ps(a1, b1)),                      \
                              hsum(_mm256_add_ps(a2, b2)), hsum(_mm256_add_ps(a3, b3))};                     \
                for (k = K8; k < K; k++) {                                                                   \
                    s[0] += x0[k] * SLOAD(w0 + k); s[1] += x0[k] * SLOAD(w1 + k);                            \
                    s[2] += x0[k] * SLOAD(w2 + k); s[3] += x0[k] * SLOAD(w3 + k);                            \
                }                                                                                            \
                for (int j = 0; j < 4; j++) r0[n - n0 + j] = s[j];                                           \
            }                                                                                                \
            for (; n < n1; n++) {                                                                            \
                const WT* w0 = W + n * K;                                                                    \
                __m256 a0 = _mm256_setzero_ps();                                                             \
                for (int64_t k = 0; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), VLOAD(w0 + k), a0); \
                float s0 = hsum(a0);                                                                         \
                for (int64_t k = K8; k < K; k++) s0 += x0[k] * SLOAD(w0 + k);                                \
                r0[n - n0] = s0;                                                                             \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
}

DEFINE_ROWS(f32, float, VLOAD_F32, SLOAD_F32)
DEFINE_ROWS(bf16, uint16_t, VLOAD_BF16, SLOAD_BF16)
DEFINE_ROWS(f16, uint16_t, VLOAD_F16, SLOAD_F16)
DEFINE_ROWS(i8, int8_t, VLOAD_I8, SLOAD_I8)

static float* scratch(int64_t n) {  /* per-thread buffer, grown on demand and kept */
    static __thread float* buf = NULL;
    static __thread int64_t cap = 0;
    if (n > cap) { free(buf); buf = (float*)malloc((size_t)n * sizeof(float)); cap = buf ? n : 0; }
    return buf;
}

/* y[m, n] = (residual[m, n] +) scale[n] * sum_k x[m, k] W[n, k] + bias[n]
   x: [M, K] with row stride ldx, dtype xdt; W: [N, K] contiguous, dtype wdt; scale: fp32 [N] or NULL;
   bias: [N] of dtype bdt or NULL; residual and y: [M, N] with row stride ldy, dtype ydt (may alias). */
int quill_linear(const void* x, int xdt, int64_t M, int64_t ldx, const void* W, int wdt, const float* scale,
                 const void* bias, int bdt, const void* residual, void* y, int ydt, int64_t ldy,
                 int64_t N, int64_t K, int nthreads, const void* lnw, const void* lnb, int lndt, float eps) {
    if (M <= 0 || N <= 0) return 0;
    const float* xf = (const float*)x;
    if (xdt != F32 || ldx != K || lnw) {
        float* buf = scratch(M * K);
        if (!buf) return -1;
        for (int64_t m = 0; m < M; m++) {
            float* r = buf + m * K;
            for (int64_t k = 0; k < K; k++) r[k] = ld(x, xdt, m * ldx + k);
            if (lnw) {  /* LayerNorm of the row (biased variance, as torch), then the affine transform */
                double mean = 0.0, var = 0.0;
                for (int64_t k = 0; k < K; k++) mean += r[k];
                mean /= (double)K;
                for (int64_t k = 0; k < K; k++) { double d = r[k] - mean; var += d * d; }
                const float rstd = (float)(1.0 / sqrt(var / (double)K + (double)eps)), mu = (float)mean;
                for (int64_t k = 0; k < K; k++)
                    r[k] = (r[k] - mu) * rstd * ld(lnw, lndt, k) + (lnb ? ld(lnb, lndt, k) : 0.f);
            }
        }
        xf = buf;
    }
    int64_t chunk = (8192 + K - 1) / K;                 /* about 8K weights per task */
    chunk = chunk < 4 ? 4 : (chunk + 3) & ~(int64_t)3;
    if (chunk > 64) chunk = 64;
    const int64_t tasks = (N + chunk - 1) / chunk;
    const int parallel = nthreads > 1 && tasks > 1 && M * N * K >= (1 << 16);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (parallel)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        float acc[64 * 32];
        for (int64_t m0 = 0; m0 < M; m0 += 32) {
            const int64_t mb = M - m0 < 32 ? M - m0 : 32;
            const float* xm = xf + m0 * K;
            switch (wdt) {
                case F32: rows_f32(xm, mb, K, (const float*)W, n0, n1, acc, 64); break;
                case BF16: rows_bf16(xm, mb, K, (const uint16_t*)W, n0, n1, acc, 64); break;
                case F16: rows_f16(xm, mb, K, (const uint16_t*)W, n0, n1, acc, 64); break;
                default: rows_i8(xm, mb, K, (const int8_t*)W, n0, n1, acc, 64); break;
            }
            for (int64_t m = 0; m < mb; m++) {
                for (int64_t n = n0; n < n1; n++) {
                    float v = acc[m * 64 + n - n0];
                    if (scale) v *= scale[n];
                    if (bias) v += ld(bias, bdt, n);
                    const int64_t o = (m0 + m) * ldy + n;
                    if (residual) v += ld(residual, ydt, o);
                    st(y, ydt, o, v);
                }
            }
        }
    }
    return 0;
}

/* exp for x <= 0 (softmax after subtracting the max), Cephes-style: 2^n * p(r), relative error ~2e-7 */
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* One new token per row: write its key and value at position pos[b] (or pos0) of the cache, then attend
   over positions 0..pos. qkv: [B, 3*H*D] (q | k | v) with row stride ldq; caches: element (b, h, l, d) at
   b*sb + h*sh + l*sl + d; out: [B, H*D] with row stride ldo. Everything in dtype dt; arithmetic in fp32. */
int quill_attn_decode(const void* qkv, int dt, int64_t B, int64_t H, int64_t D, int64_t ldq,
                      void* kc, void* vc, int64_t sb, int64_t sh, int64_t sl,
                      const int64_t* pos, int64_t pos0, float scale, void* out, int64_t ldo, int nthreads) {
    const int64_t C = H * D, esz = dt == F32 ? 4 : 2;
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) work += (pos ? pos[b] : pos0) + 1;
    const int parallel = nthreads > 1 && B * H > 1 && work * C >= (1 << 15);
    int err = 0;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (parallel)
    for (int64_t t = 0; t < B * H; t++) {
        const int64_t b = t / H, h = t % H, p = pos ? pos[b] : pos0, L = p + 1;
        const char* row = (const char*)qkv + (b * ldq) * esz;
        char* kbase = (char*)kc + (b * sb + h * sh) * esz;
        char* vbase = (char*)vc + (b * sb + h * sh) * esz;
        memcpy(kbase + p * sl * esz, row + (C + h * D) * esz, D * esz);
        memcpy(vbase + p * sl * esz, row + (2 * C + h * D) * esz, D * esz);
        float* buf = scratch(D + L + D);
        if (!buf) { err = -1; continue; }
        float *q = buf, *s = buf + D, *o = buf + D + L;
        for (int64_t d = 0; d < D; d++) q[d] = ld(row, dt, h * D + d) * scale;
        float mx = -INFINITY;
        for (int64_t l = 0; l < L; l++) {
            const void* kl = kbase + l * sl * esz;
            float acc = 0.f;
            int64_t d = 0;
            if (dt == F32) {
                __m256 a = _mm256_setzero_ps();
                for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), VLOAD_F32((const float*)kl + d), a);
                acc = hsum(a);
            } else if (dt == BF16) {
                __m256 a = _mm256_setzero_ps();
                for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), VLOAD_BF16((const uint16_t*)kl + d), a);
                acc = hsum(a);
            } else {
                __m256 a = _mm256_setzero_ps();
                for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), VLOAD_F16((const uint16_t*)kl + d), a);
                acc = hsum(a);
            }
            for (; d < D; d++) acc += q[d] * ld(kl, dt, d);
            s[l] = acc;
            mx = acc > mx ? acc : mx;
        }
        float sum = 0.f;
        int64_t l = 0;
        __m256 vs = _mm256_setzero_ps(), vm = _mm256_set1_ps(mx);
        for (; l + 8 <= L; l += 8) {
            __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + l), vm));
            _mm256_storeu_ps(s + l, e);
            vs = _mm256_add_ps(vs, e);
        }
        sum = hsum(vs);
        for (; l < L; l++) { s[l] = expf(s[l] - mx); sum += s[l]; }
        for (int64_t d = 0; d < D; d++) o[d] = 0.f;
        for (l = 0; l < L; l++) {
            const void* vl = vbase + l * sl * esz;
            const float w = s[l];
            int64_t d = 0;
            __m256 wv = _mm256_set1_ps(w);
            if (dt == F32) for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, VLOAD_F32((const float*)vl + d), _mm256_loadu_ps(o + d)));
            else if (dt == BF16) for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, VLOAD_BF16((const uint16_t*)vl + d), _mm256_loadu_ps(o + d)));
            else for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, VLOAD_F16((const uint16_t*)vl + d), _mm256_loadu_ps(o + d)));
            for (; d < D; d++) o[d] += w * ld(vl, dt, d);
        }
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < D; d++) st(out, dt, b * ldo + h * D + d, o[d] * inv);
    }
    return err;
}

/* Rows of an int8 matrix dequantised: out[i, :] = W[idx[i], :] * scale[idx[i]] (embedding lookups). */
void quill_gather_i8(const int8_t* W, const float* scale, const int64_t* idx, int64_t n, int64_t K,
                     void* out, int odt) {
    for (int64_t i = 0; i < n; i++) {
        const int8_t* w = W + idx[i] * K;
        const float s = scale[idx[i]];
        for (int64_t k = 0; k < K; k++) st(out, odt, i * K + k, (float)w[k] * s);
    }
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    line = next((ln for ln in flags.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return {"avx2", "fma", "f16c"} <= have


def _cache_dir() -> Path:
    base = os.environ.get("QUILL_CACHE_DIR")
    if base:
        return Path(base) / "kernels"
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("quill")) / "kernels"
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".cache" / "quill" / "kernels"


def _build() -> Path:
    """Compile the C source once per source version into the cache; returns the shared library's path."""
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
    digest = hashlib.sha256((_SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"quill_kernels_{digest}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "quill_kernels.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:2000]}")
        os.replace(out, target)  # atomic: concurrent builders each rename a complete file
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("QUILL_KERNELS", "1").lower() in ("0", "false", "off", "no"):
            return None
        if not _cpu_supported():
            log.info("quill kernels: CPU lacks AVX2/FMA/F16C; using torch kernels")
            return None
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("quill kernels unavailable (%s); using torch kernels", e)
            return None
        P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.quill_linear.argtypes = [P, C, I, I, P, C, P, P, C, P, P, C, I, I, I, C, P, P, C, ctypes.c_float]
        lib.quill_linear.restype = C
        lib.quill_attn_decode.argtypes = [P, C, I, I, I, I, P, P, I, I, I, P, I, ctypes.c_float, P, I, C]
        lib.quill_attn_decode.restype = C
        lib.quill_gather_i8.argtypes = [P, P, P, I, I, P, C]
        lib.quill_gather_i8.restype = None
        _lib = lib
        return lib


def available() -> bool:
    """Whether the compiled kernels can be used (built on first call)."""
    return _load() is not None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None,
           residual: Tensor | None = None, out: Tensor | None = None, ln: nn.LayerNorm | None = None) -> Tensor:
    """`(residual +) (ln(x) @ weight.T) * scale + bias` for x [M, K] (M <= MAX_ROWS, last dim contiguous).

    weight: [N, K] contiguous float32/bfloat16/float16/int8; scale: float32 [N] (int8 weights) or None;
    ln: an optional LayerNorm applied to each row of x first (in fp32, fused); the result has x's dtype.
    `out` and `residual` are [M, N] with a contiguous last dim and may be the same tensor (an in-place
    residual add).
    """
    lib = _lib if _lib is not None else _load()
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype)
    rc = lib.quill_linear(
        x.data_ptr(), DTYPE_CODES[x.dtype], M, x.stride(0), weight.data_ptr(), DTYPE_CODES[weight.dtype],
        None if scale is None else scale.data_ptr(),
        None if bias is None else bias.data_ptr(), 0 if bias is None else DTYPE_CODES[bias.dtype],
        None if residual is None else residual.data_ptr(), out.data_ptr(), DTYPE_CODES[out.dtype], out.stride(0),
        N, K, torch.get_num_threads(),
        None if ln is None else ln.weight.data_ptr(), None if ln is None or ln.bias is None else ln.bias.data_ptr(),
        0 if ln is None else DTYPE_CODES[ln.weight.dtype], 0.0 if ln is None else ln.eps)
    if rc:
        raise MemoryError("quill_linear: out of memory")
    return out


def attn_decode(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor | int, n_head: int, scale: float,
                out: Tensor) -> Tensor:
    """Write each row's new key/value (from qkv [B, 3C]) at its position and attend over the row's prefix.

    k_cache, v_cache: [B, H, L, D] with a contiguous last dim (one layer of the KV cache); pos: LongTensor [B]
    (contiguous, CPU) or an int shared by all rows; out: [B, C].
    """
    lib = _lib if _lib is not None else _load()
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    sb, sh, sl, _ = k_cache.stride()
    ragged = isinstance(pos, Tensor)
    rc = lib.quill_attn_decode(
        qkv.data_ptr(), DTYPE_CODES[qkv.dtype], B, n_head, D, qkv.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        sb, sh, sl, pos.data_ptr() if ragged else None, 0 if ragged else pos, scale, out.data_ptr(), out.stride(0),
        torch.get_num_threads())
    if rc:
        raise MemoryError("quill_attn_decode: out of memory")
    return out


def gather_int8(weight: Tensor, scale: Tensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows `idx` (any shape) of an int8 matrix [V, K], dequantised with per-row `scale` into `dtype`."""
    lib = _lib if _lib is not None else _load()
    flat = idx.reshape(-1).contiguous()
    out = torch.empty(flat.numel(), weight.shape[1], dtype=dtype)
    lib.quill_gather_i8(weight.data_ptr(), scale.data_ptr(), flat.data_ptr(), flat.numel(), weight.shape[1],
                        out.data_ptr(), DTYPE_CODES[dtype])
    return out.view(*idx.shape, weight.shape[1])


__all__ = ["available", "linear", "attn_decode", "gather_int8", "MAX_ROWS", "FLOAT_DTYPES"]
