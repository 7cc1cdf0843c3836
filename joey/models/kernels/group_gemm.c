/* joey's CPU kernel for low-bit weights: y = x W^T, W stored as 4- or 8-bit codes u in groups of 32
 * input columns with a scale d and an offset z per output column and group (w = d * u + z).
 *
 * Why a kernel of our own: PyTorch's int4/int8 CPU kernels turn every weight into a float for every
 * row of activations, which makes a decode step compute-bound and a forward of k tokens cost about k
 * times one token. Here, as llama.cpp does for the same GGUF blocks, the activations are quantized to
 * 8 bits per group of 32 (scale = max|x| / 127) and each group's dot products are integer sums on the
 * CPU's byte dot-product instruction (AVX512-VNNI vpdpbusd: 64 multiply-adds of unsigned weight bytes
 * by signed activation bytes). A block of codes is loaded once for up to ROWS rows of activations.
 *
 *   y[m, n] = sum_g dx[m, g] * (d[g, n] * sum_k u[n, k] q[m, k] + z[g, n] * sum_k q[m, k])
 *
 * Losslessness needs every row's result to be the same however many rows share a call (verifying k
 * tokens must reproduce decoding them one by one): a row's integer sums are exact, and its float
 * arithmetic is a fixed sequence of intrinsics (no contraction, no reassociation) that does not depend
 * on the other rows. tests/test_weight_formats.py checks it.
 *
 * Layout (made by joey/models/group_kernel.py), output columns in tiles of 16, for tile t, group g:
 *   8-bit: 8 vectors of 64 bytes; vector j, byte 4n + b = u[16t + n, 32g + 4j + b]
 *   4-bit: 4 vectors; vector j, byte 4n + b: low nibble = u[.., 32g + 8j + b], high = u[.., 32g + 8j + 4 + b]
 *   scale, offset: [N/16][K/32][16] fp32.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define GROUP 32
#define LANES 16
#define ROWS 8

/* Each row's activations as int8 codes per group of 32 (q), the group's scale (dx) and the sum of
 * its codes times its scale (dx * sum q), for the offset term. */
void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *dx, float *dsum) {
    const int64_t groups = K / GROUP;
    for (int64_t r = 0; r < M * groups; r++) {
        const float *v = x + r * GROUP;
        float amax = 0.0f;
        for (int i = 0; i < GROUP; i++) amax = fmaxf(amax, fabsf(v[i]));
        const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int s = 0;
        for (int i = 0; i < GROUP; i++) {
            const int c = (int)nearbyintf(v[i] * id);
            q[r * GROUP + i] = (int8_t)c;
            s += c;
        }
        dx[r] = d;
        dsum[r] = d * (float)s;
    }
}

static inline __attribute__((always_inline)) void tile_rows(
    const int8_t *q, const float *dx, const float *dsum, int64_t K, const uint8_t *codes, int bits,
    const float *scale, const float *offset, int64_t groups, const float *bias, float *y, int64_t ldy,
    const int mb) {
    __m512 acc[ROWS];
    for (int m = 0; m < mb; m++) acc[m] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int64_t per_group = bits == 4 ? 4 * 64 : 8 * 64;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * per_group;
        __m512i w[8];
        if (bits == 4) {
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_loadu_si512((const void *)(c + 64 * j));
                w[2 * j] = _mm512_and_si512(v, low);
                w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
        } else {
            for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512((const void *)(c + 64 * j));
        }
        const __m512 d = _mm512_loadu_ps(scale + g * LANES);
        const __m512 z = offset ? _mm512_loadu_ps(offset + g * LANES) : _mm512_setzero_ps();
        for (int m = 0; m < mb; m++) {
            const int32_t *qm = (const int32_t *)(q + m * K + g * GROUP);  /* 8 quads of 4 codes */
            __m512i isum = _mm512_setzero_si512();
            for (int j = 0; j < 8; j++) isum = _mm512_dpbusd_epi32(isum, w[j], _mm512_set1_epi32(qm[j]));
            const int64_t r = m * groups + g;
            const __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(dx[r])));
            acc[m] = _mm512_add_ps(acc[m], part);
            if (offset) acc[m] = _mm512_add_ps(acc[m], _mm512_mul_ps(z, _mm512_set1_ps(dsum[r])));
        }
    }
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int m = 0; m < mb; m++) _mm512_storeu_ps(y + m * ldy, _mm512_add_ps(acc[m], b));
}

/* q [M, K] int8, dx / dsum [M, K/32] from quantize_rows; y [M, N] fp32, N a multiple of 16. */
void group_gemm(const int8_t *q, const float *dx, const float *dsum, int64_t M, int64_t K,
                const uint8_t *codes, int bits, int64_t N, const float *scale, const float *offset,
                const float *bias, float *y) {
    const int64_t groups = K / GROUP, tiles = N / LANES;
    const int64_t tile_bytes = groups * (bits == 4 ? 4 * 64 : 8 * 64);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *c = codes + t * tile_bytes;
        const float *s = scale + t * groups * LANES;
        const float *z = offset ? offset + t * groups * LANES : 0;
        const float *b = bias ? bias + t * LANES : 0;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int64_t mb = M - m0 < ROWS ? M - m0 : ROWS;
            const int8_t *qm = q + m0 * K;
            const float *dxm = dx + m0 * groups, *dsm = dsum + m0 * groups;
            float *ym = y + m0 * N + t * LANES;
            switch (mb) {
#define CASE(n) case n: tile_rows(qm, dxm, dsm, K, c, bits, s, z, groups, b, ym, N, n); break;
                CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2)
#undef CASE
                default: tile_rows(qm, dxm, dsm, K, c, bits, s, z, groups, b, ym, N, 1); break;
            }
        }
    }
}

/* RMSNorm of M rows of K floats: y = x / sqrt(mean(x^2) + eps) * w. Eager PyTorch spends ~25 us of
 * per-op overhead on this at decode time (60 norms a step); one call here takes a few. Each row's
 * sum runs in one fixed order, so a row's result never depends on the call. */
void rms_norm(const float *x, int64_t M, int64_t K, const float *w, float eps, float *y) {
    for (int64_t r = 0; r < M; r++) {
        const float *v = x + r * K;
        float part[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= K; i += 16)
            for (int j = 0; j < 16; j++) part[j] += v[i + j] * v[i + j];
        for (; i < K; i++) part[i % 16] += v[i] * v[i];
        float s = 0.0f;
        for (int j = 0; j < 16; j++) s += part[j];
        const float inv = 1.0f / sqrtf(s / (float)K + eps);
        for (int64_t k = 0; k < K; k++) y[r * K + k] = v[k] * inv * w[k];
    }
}
