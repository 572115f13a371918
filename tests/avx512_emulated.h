/* The AVX-512 intrinsics quill/csrc/kernels.c uses, emulated in plain C with GCC vector types, so that the
   AVX-512 variant's code (its loops, tails and lane layouts) runs in the tests on a CPU without AVX-512:
   kernels.c compiled with the AVX2 flags, -DQUILL_AVX512=1 and `-include` of this file (tests/conftest.py).
   Each function follows the instruction's definition in Intel's intrinsics guide; the real build of the
   variant uses the compiler's intrinsics, never this file. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
typedef long long e512i __attribute__((vector_size(64)));
typedef float e512 __attribute__((vector_size(64)));
typedef short e512bh __attribute__((vector_size(64)));
#define __m512i e512i
#define __m512 e512
#define __m512bh e512bh
#define IN_REGISTER(v) ((void)0)  /* kernels.c's register pin: an emulated vector is no register */
static inline e512i E_setzero_si512(void) { e512i z = {0}; return z; }
static inline e512 E_setzero_ps(void) { e512 z = {0}; return z; }
static inline e512i E_loadu_si512(const void* p) { e512i r; memcpy(&r, p, 64); return r; }
static inline void E_storeu_si512(void* p, e512i v) { memcpy(p, &v, 64); }
static inline e512 E_loadu_ps(const float* p) { e512 r; memcpy(&r, p, 64); return r; }
static inline void E_storeu_ps(float* p, e512 v) { memcpy(p, &v, 64); }
static inline e512 E_add_ps(e512 a, e512 b) { return a + b; }
static inline e512 E_cvtepi32_ps(e512i a) { int32_t s[16]; e512 r; memcpy(s, &a, 64); for (int i = 0; i < 16; i++) r[i] = (float)s[i]; return r; }
static inline e512i E_set1_epi8(char a) { e512i r; memset(&r, a, 64); return r; }
static inline int E_reduce_add_epi32(e512i v) { int32_t s[16]; memcpy(s, &v, 64); uint32_t t = 0; for (int i = 0; i < 16; i++) t += (uint32_t)s[i]; return (int)t; }
static inline e512i E_set1_epi32(int a) { int32_t d[16]; for (int i = 0; i < 16; i++) d[i] = a; e512i r; memcpy(&r, d, 64); return r; }
static inline e512i E_cvtepi8_epi16(__m256i a) { int8_t s[32]; int16_t d[32]; memcpy(s, &a, 32); for (int i = 0; i < 32; i++) d[i] = s[i]; e512i r; memcpy(&r, d, 64); return r; }
static inline e512i E_dpwssd(e512i src, e512i a, e512i b) {
    int32_t s[16]; int16_t x[32], y[32]; memcpy(s, &src, 64); memcpy(x, &a, 64); memcpy(y, &b, 64);
    for (int j = 0; j < 16; j++) s[j] = (int32_t)((uint32_t)s[j] + (uint32_t)((int32_t)x[2*j] * y[2*j]) + (uint32_t)((int32_t)x[2*j+1] * y[2*j+1]));
    e512i r; memcpy(&r, s, 64); return r; }
static inline e512i E_dpbusd(e512i src, e512i a, e512i b) {
    int32_t s[16]; uint8_t x[64]; int8_t y[64]; memcpy(s, &src, 64); memcpy(x, &a, 64); memcpy(y, &b, 64);
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < 4; i++) s[j] = (int32_t)((uint32_t)s[j] + (uint32_t)((int32_t)x[4*j+i] * y[4*j+i]));
    e512i r; memcpy(&r, s, 64); return r; }
static inline e512i E_mullo_epi32(e512i a, e512i b) {
    int32_t x[16], y[16]; memcpy(x, &a, 64); memcpy(y, &b, 64);
    for (int j = 0; j < 16; j++) x[j] = (int32_t)((uint32_t)x[j] * (uint32_t)y[j]);
    e512i r; memcpy(&r, x, 64); return r; }
static inline e512i E_cast128_512(__m128i a) { e512i r = {0}; memcpy(&r, &a, 16); return r; }
static inline e512i E_permutexvar_epi32(e512i idx, e512i a) {
    int32_t i[16], s[16], d[16]; memcpy(i, &idx, 64); memcpy(s, &a, 64);
    for (int j = 0; j < 16; j++) d[j] = s[i[j] & 15];
    e512i r; memcpy(&r, d, 64); return r; }
static inline __m256i E_cast256(e512i v) { __m256i r; memcpy(&r, &v, 32); return r; }
static inline __m256i E_extract4(e512i v, int i) { __m256i r; memcpy(&r, (char*)&v + 32 * i, 32); return r; }
static inline e512i E_cvtepi32_epi64(__m256i a) { int32_t s[8]; int64_t d[8]; memcpy(s, &a, 32); for (int i = 0; i < 8; i++) d[i] = s[i]; e512i r; memcpy(&r, d, 64); return r; }
static inline e512i E_add_epi64(e512i a, e512i b) { return a + b; }
static inline long long E_reduce_add_epi64(e512i v) { long long s = 0; for (int i = 0; i < 8; i++) s += v[i]; return s; }
static inline float E_bf(short h) { uint32_t u = (uint32_t)(uint16_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline e512 E_dpbf16(e512 src, e512bh a, e512bh b) { for (int j = 0; j < 16; j++) src[j] += E_bf(a[2*j]) * E_bf(b[2*j]) + E_bf(a[2*j+1]) * E_bf(b[2*j+1]); return src; }
static inline float E_reduce_add_ps(e512 v) { float s = 0; for (int i = 0; i < 16; i++) s += v[i]; return s; }
static inline short E_rne(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); return (short)(u >> 16); }
static inline e512bh E_cvtne2(e512 a, e512 b) { e512bh r; for (int j = 0; j < 16; j++) { r[j] = E_rne(b[j]); r[j + 16] = E_rne(a[j]); } return r; }
static inline e512 E_div_ps(e512 a, e512 b) { return a / b; }
static inline e512 E_mul_ps(e512 a, e512 b) { return a * b; }
static inline e512 E_set1_ps(float a) { e512 r; for (int i = 0; i < 16; i++) r[i] = a; return r; }
static inline e512 E_fmadd_ps(e512 a, e512 b, e512 c) { e512 r; for (int i = 0; i < 16; i++) r[i] = fmaf(a[i], b[i], c[i]); return r; }
static inline e512i E_permutexvar_epi16(e512i idx, e512i a) {
    int16_t i[32], s[32], d[32]; memcpy(i, &idx, 64); memcpy(s, &a, 64);
    for (int j = 0; j < 32; j++) d[j] = s[i[j] & 31];
    e512i r; memcpy(&r, d, 64); return r; }
static inline e512i E_permutex2var_epi16(e512i a, e512i idx, e512i b) {
    int16_t i[32], s[64], d[32]; memcpy(i, &idx, 64); memcpy(s, &a, 64); memcpy(s + 32, &b, 64);
    for (int j = 0; j < 32; j++) d[j] = s[i[j] & 63];
    e512i r; memcpy(&r, d, 64); return r; }
static inline e512i E_slli_epi32(e512i a, unsigned n) { uint32_t s[16]; memcpy(s, &a, 64); for (int j = 0; j < 16; j++) s[j] <<= n; e512i r; memcpy(&r, s, 64); return r; }
static inline e512i E_and_si512(e512i a, e512i b) { return a & b; }
static inline e512 E_castsi512_ps(e512i a) { e512 r; memcpy(&r, &a, 64); return r; }
static inline e512i E_cast256_512(__m256i a) { e512i r = {0}; memcpy(&r, &a, 32); return r; }
static inline e512i E_set_epi16(short e31, short e30, short e29, short e28, short e27, short e26, short e25, short e24,
                                short e23, short e22, short e21, short e20, short e19, short e18, short e17, short e16,
                                short e15, short e14, short e13, short e12, short e11, short e10, short e9, short e8,
                                short e7, short e6, short e5, short e4, short e3, short e2, short e1, short e0) {
    const int16_t d[32] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15,
                           e16, e17, e18, e19, e20, e21, e22, e23, e24, e25, e26, e27, e28, e29, e30, e31};
    e512i r; memcpy(&r, d, 64); return r; }
#define _mm512_setzero_si512 E_setzero_si512
#define _mm512_setzero_ps E_setzero_ps
#define _mm512_loadu_si512 E_loadu_si512
#define _mm512_storeu_si512 E_storeu_si512
#define _mm512_loadu_ps E_loadu_ps
#define _mm512_storeu_ps E_storeu_ps
#define _mm512_add_ps E_add_ps
#define _mm512_cvtepi32_ps E_cvtepi32_ps
#define _mm512_set1_epi32 E_set1_epi32
#define _mm512_set1_epi8 E_set1_epi8
#define _mm512_reduce_add_epi32 E_reduce_add_epi32
#define _mm512_cvtepi8_epi16 E_cvtepi8_epi16
#define _mm512_dpwssd_epi32 E_dpwssd
#define _mm512_dpbusd_epi32 E_dpbusd
#define _mm512_mullo_epi32 E_mullo_epi32
#define _mm512_castsi512_si256 E_cast256
#define _mm512_castsi128_si512 E_cast128_512
#define _mm512_permutexvar_epi32 E_permutexvar_epi32
#define _mm512_extracti64x4_epi64 E_extract4
#define _mm512_cvtepi32_epi64 E_cvtepi32_epi64
#define _mm512_add_epi64 E_add_epi64
#define _mm512_reduce_add_epi64 E_reduce_add_epi64
#define _mm512_dpbf16_ps E_dpbf16
#define _mm512_reduce_add_ps E_reduce_add_ps
#define _mm512_cvtne2ps_pbh E_cvtne2
#define _mm512_div_ps E_div_ps
#define _mm512_permutexvar_epi16 E_permutexvar_epi16
#define _mm512_permutex2var_epi16 E_permutex2var_epi16
#define _mm512_slli_epi32 E_slli_epi32
#define _mm512_and_si512 E_and_si512
#define _mm512_castsi512_ps E_castsi512_ps
#define _mm512_castsi256_si512 E_cast256_512
#define _mm512_set_epi16 E_set_epi16
#define _mm512_mul_ps E_mul_ps
#define _mm512_set1_ps E_set1_ps
#define _mm512_fmadd_ps E_fmadd_ps
