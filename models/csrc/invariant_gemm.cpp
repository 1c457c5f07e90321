// treespec's batch-invariant fp32 linear kernel for CPUs with AVX-512 (models/invariant_gemm.py).
//
//   y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N])
//
// W is packed once into panels of 16 output columns, P[ceil(N/16)][K][16] (zero padded), so a
// panel streams contiguously. Every output element is ONE fused-multiply-add chain over
// k = 0 .. K-1 in order, then + bias, whatever M is and however the rows are tiled: the result for
// a row is bitwise the same whether it is computed alone (one-token decoding) or among M rows
// (tree verification, prefill). Decode steps with few rows are bound by streaming the weights, so
// the tiles keep 8-16 independent accumulators in registers (FMA latency hidden) and read every
// weight byte once per block of rows; the output columns are split evenly across threads.
#include <immintrin.h>
#include <omp.h>

template <int R, int C>
static inline void tile(const float* __restrict x, long K, const float* __restrict panels, long p0,
                        float* __restrict y, long N, const float* __restrict bias) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const float* w[C];
    for (int c = 0; c < C; ++c) w[c] = panels + (p0 + c) * K * 16;
    for (long k = 0; k < K; ++k) {
        __m512 wv[C];
        for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(w[c] + k * 16);
        for (int r = 0; r < R; ++r) {
            const __m512 xv = _mm512_set1_ps(x[r * K + k]);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int c = 0; c < C; ++c) {
        const long n0 = (p0 + c) * 16;
        const long valid = N - n0 < 16 ? N - n0 : 16;
        const __mmask16 m = (__mmask16)((1u << valid) - 1u);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + n0) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * N + n0, m, _mm512_add_ps(acc[r][c], bv));
    }
}

template <int R, int C>
static void panels_range(const float* x, long K, const float* panels, long pa, long pb, float* y, long N,
                         const float* bias) {
    long p = pa;
    for (; p + C <= pb; p += C) tile<R, C>(x, K, panels, p, y, N, bias);
    for (; p < pb; ++p) tile<R, 1>(x, K, panels, p, y, N, bias);
}

extern "C" long treespec_packed_floats(long N, long K) { return (N + 15) / 16 * K * 16; }

extern "C" int treespec_pack(const float* w, long N, long K, float* out) {
    const long P = (N + 15) / 16;
    #pragma omp parallel for
    for (long p = 0; p < P; ++p)
        for (long k = 0; k < K; ++k)
            for (long j = 0; j < 16; ++j) {
                const long n = p * 16 + j;
                out[(p * K + k) * 16 + j] = n < N ? w[n * K + k] : 0.0f;
            }
    return 0;
}

extern "C" int treespec_linear(const float* x, long M, long K, const float* panels, long N, const float* bias,
                               float* y, int threads) {
    const long P = (N + 15) / 16;
    if (M <= 0 || N <= 0) return 0;
    if (threads < 1) threads = 1;
    if (threads > P) threads = (int)P;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const long pa = P * t / T, pb = P * (t + 1) / T;
        // blocks of 8 panels (<= 8 * K * 64 bytes, L2-resident) are reused by every block of rows
        for (long blk = pa; blk < pb; blk += 8) {
            const long be = blk + 8 < pb ? blk + 8 : pb;
            long m = 0;
            for (; m + 16 <= M; m += 16) panels_range<16, 1>(x + m * K, K, panels, blk, be, y + m * N, N, bias);
            for (; m + 8 <= M; m += 8) panels_range<8, 2>(x + m * K, K, panels, blk, be, y + m * N, N, bias);
            for (; m + 4 <= M; m += 4) panels_range<4, 4>(x + m * K, K, panels, blk, be, y + m * N, N, bias);
            for (; m + 2 <= M; m += 2) panels_range<2, 4>(x + m * K, K, panels, blk, be, y + m * N, N, bias);
            for (; m < M; m += 1) panels_range<1, 8>(x + m * K, K, panels, blk, be, y + m * N, N, bias);
        }
    }
    return 0;
}
