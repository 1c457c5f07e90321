// treespec's batch-invariant kernels (models/kernels/invariant_gemm.py): fp32 linear + attention for CPUs with
// AVX-512 or with AVX2 + FMA (the same source, built with the flags of the CPU's best ISA), bf16 on
// AVX512_BF16.
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
#include <math.h>
#include <stdlib.h>

// Weight packing (plain C++, shared by both ISAs). fp32: panels of 16 output columns, P[ceil(N/16)][K][16];
// bf16: the same with pairs of k interleaved, P[ceil(N/16)][ceil(K/2)][16][2] (both zero padded).
typedef unsigned short bf16_t;

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

extern "C" long treespec_packed_bf16(long N, long K) { return (N + 15) / 16 * ((K + 1) / 2) * 32; }

extern "C" int treespec_pack_bf16(const bf16_t* w, long N, long K, bf16_t* out) {
    const long P = (N + 15) / 16, KP = (K + 1) / 2;
    #pragma omp parallel for
    for (long p = 0; p < P; ++p)
        for (long kk = 0; kk < KP; ++kk)
            for (long j = 0; j < 16; ++j)
                for (long e = 0; e < 2; ++e) {
                    const long n = p * 16 + j, k = 2 * kk + e;
                    out[((p * KP + kk) * 16 + j) * 2 + e] = (n < N && k < K) ? w[n * K + k] : (bf16_t)0;
                }
    return 0;
}

#if defined(__AVX512F__)

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

// The driver shared by both dtypes: output columns split evenly across threads; blocks of 8 panels
// (<= 8 * K * 64 bytes, L2-resident) are reused by every block of rows. G::range<R, C> runs the
// R-row x C-panel tiles over a panel range; xk = the row length of x in G's units.
template <class G>
static void drive(const typename G::X* x, long M, long xk, const typename G::W* panels, long N,
                  const typename G::W* bias, typename G::W* y, int threads) {
    const long P = (N + 15) / 16;
    if (threads < 1) threads = 1;
    if (threads > P) threads = (int)P;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const long pa = P * t / T, pb = P * (t + 1) / T;
        for (long blk = pa; blk < pb; blk += 8) {
            const long be = blk + 8 < pb ? blk + 8 : pb;
            long m = 0;
            for (; m + 16 <= M; m += 16) G::template range<16, 1>(x + m * xk, xk, panels, blk, be, y + m * N, N, bias);
            for (; m + 8 <= M; m += 8) G::template range<8, 2>(x + m * xk, xk, panels, blk, be, y + m * N, N, bias);
            for (; m + 4 <= M; m += 4) G::template range<4, 4>(x + m * xk, xk, panels, blk, be, y + m * N, N, bias);
            for (; m + 2 <= M; m += 2) G::template range<2, 4>(x + m * xk, xk, panels, blk, be, y + m * N, N, bias);
            for (; m < M; m += 1) G::template range<1, 8>(x + m * xk, xk, panels, blk, be, y + m * N, N, bias);
        }
    }
}

struct F32Gemm {
    typedef float X;
    typedef float W;
    template <int R, int C>
    static void range(const float* x, long K, const float* panels, long pa, long pb, float* y, long N,
                      const float* bias) {
        panels_range<R, C>(x, K, panels, pa, pb, y, N, bias);
    }
};

extern "C" int treespec_linear(const float* x, long M, long K, const float* panels, long N, const float* bias,
                               float* y, int threads) {
    if (M > 0 && N > 0) drive<F32Gemm>(x, M, K, panels, N, bias, y, threads);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// bf16 weights and activations (CPUs with AVX512_BF16): the same panels, with pairs of k
// interleaved, P[ceil(N/16)][ceil(K/2)][16][2]; every output is one chain of VDPBF16PS over
// k-pairs in order (fp32 accumulation), rounded to bf16 once at the end: batch invariant too.

static inline __m512 bf16_to_f32(const bf16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <int R, int C>
static inline void tile_bf16(const unsigned* __restrict xp, long KP, const bf16_t* __restrict panels, long p0,
                             bf16_t* __restrict y, long N, const bf16_t* __restrict bias) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const bf16_t* w[C];
    for (int c = 0; c < C; ++c) w[c] = panels + (p0 + c) * KP * 32;
    for (long kk = 0; kk < KP; ++kk) {
        __m512bh wv[C];
        for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(w[c] + kk * 32);
        for (int r = 0; r < R; ++r) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[r * KP + kk]);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
        }
    }
    for (int c = 0; c < C; ++c) {
        const long n0 = (p0 + c) * 16;
        const long valid = N - n0 < 16 ? N - n0 : 16;
        const __mmask16 m = (__mmask16)((1u << valid) - 1u);
        const __m512 bv = bias ? bf16_to_f32(bias + n0, m) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) {
            // the bias is added in fp32 and the sum rounded once, like the fp32 kernel
            __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][c], bv));
            _mm256_mask_storeu_epi16(y + r * N + n0, m, (__m256i)out);
        }
    }
}

template <int R, int C>
static void panels_range_bf16(const unsigned* xp, long KP, const bf16_t* panels, long pa, long pb, bf16_t* y,
                              long N, const bf16_t* bias) {
    long p = pa;
    for (; p + C <= pb; p += C) tile_bf16<R, C>(xp, KP, panels, p, y, N, bias);
    for (; p < pb; ++p) tile_bf16<R, 1>(xp, KP, panels, p, y, N, bias);
}

struct Bf16Gemm {
    typedef unsigned X;  // a pair of bf16 values of x
    typedef bf16_t W;
    template <int R, int C>
    static void range(const unsigned* xp, long KP, const bf16_t* panels, long pa, long pb, bf16_t* y, long N,
                      const bf16_t* bias) {
        panels_range_bf16<R, C>(xp, KP, panels, pa, pb, y, N, bias);
    }
};

// x [M, K] bf16 -> y [M, N] bf16; xpairs: scratch of M * ceil(K/2) uint32 (x with K padded to even)
extern "C" int treespec_linear_bf16(const bf16_t* x, long M, long K, const bf16_t* panels, long N,
                                    const bf16_t* bias, bf16_t* y, unsigned* xpairs, int threads) {
    const long KP = (K + 1) / 2;
    if (M <= 0 || N <= 0) return 0;
    for (long m = 0; m < M; ++m)
        for (long kk = 0; kk < KP; ++kk) {
            const unsigned lo = x[m * K + 2 * kk], hi = 2 * kk + 1 < K ? x[m * K + 2 * kk + 1] : 0;
            xpairs[m * KP + kk] = lo | (hi << 16);
        }
    drive<Bf16Gemm>(xpairs, M, KP, panels, N, bias, y, threads);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Batch-invariant attention for decode-time forwards (a few queries over a KV cache).
// For query row i of head h it scans the keys that row may see, in cache order (the prefix, then
// its tree ancestors: the same sequence one-token decoding sees), and computes
//   s_j = scale * (q . k_j) + bias_j,   p_j = exp(s_j - max s),   out = sum_j p_j v_j / sum_j p_j
// with every sum taken in that order (the exp sum in lanes by visible-key index), so a row's output
// does not depend on how many other queries, or which masked-out keys, share the call.
// mask: null = causal (query i sits at position L - N + i), else an additive [N, L] row per query
// (values <= -1e30 mean "not visible"). q: [H, N, D] by strides, k/v: [KVH, L, D] by strides, D
// contiguous and a multiple of 16; out: [N, H, D] contiguous.

static inline __m512 exp_ps(__m512 x) {  // x <= 0; ~1 ulp, deterministic
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2_hi = _mm512_set1_ps(0.693359375f),
                 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

struct F32Io {
    typedef float T;
    static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
    static inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
};

struct Bf16Io {
    typedef bf16_t T;
    static inline __m512 load(const bf16_t* p) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
    }
    static inline void store(bf16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
};

template <class Io>
static inline void attend_row(const typename Io::T* q, const typename Io::T* k, long k_sl, const typename Io::T* v,
                              long v_sl, const float* mask_row, long visible_end, long L, long D, float scale,
                              typename Io::T* out, float* s, int* idx) {
    const long nd = D / 16;
    __m512 qv[16];
    for (long t = 0; t < nd; ++t) qv[t] = Io::load(q + t * 16);
    long n = 0;
    float mx = -INFINITY;
    const long end = mask_row ? L : visible_end;
    for (long j = 0; j < end; ++j) {
        float bias = 0.0f;
        if (mask_row) {
            bias = mask_row[j];
            if (!(bias > -1e30f)) continue;  // not visible (also NaN-safe)
        }
        __m512 acc = _mm512_mul_ps(qv[0], Io::load(k + j * k_sl));
        for (long t = 1; t < nd; ++t) acc = _mm512_fmadd_ps(qv[t], Io::load(k + j * k_sl + t * 16), acc);
        const float sj = _mm512_reduce_add_ps(acc) * scale + bias;
        s[n] = sj;
        idx[n++] = (int)j;
        mx = sj > mx ? sj : mx;
    }
    __m512 out_acc[16];
    for (long t = 0; t < nd; ++t) out_acc[t] = _mm512_setzero_ps();
    if (n == 0) {  // nothing visible: zeros (SDPA would give NaN)
        for (long t = 0; t < nd; ++t) Io::store(out + t * 16, out_acc[t]);
        return;
    }
    const __m512 mxv = _mm512_set1_ps(mx);
    __m512 sumv = _mm512_setzero_ps();
    for (long c = 0; c < n; c += 16) {
        const __mmask16 m = n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1u);
        const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + c), mxv)));
        _mm512_mask_storeu_ps(s + c, m, e);
        sumv = _mm512_add_ps(sumv, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sumv);
    for (long c = 0; c < n; ++c) {
        const __m512 p = _mm512_set1_ps(s[c]);
        const typename Io::T* vj = v + (long)idx[c] * v_sl;
        for (long t = 0; t < nd; ++t) out_acc[t] = _mm512_fmadd_ps(p, Io::load(vj + t * 16), out_acc[t]);
    }
    const __m512 invv = _mm512_set1_ps(inv);
    for (long t = 0; t < nd; ++t) Io::store(out + t * 16, _mm512_mul_ps(out_acc[t], invv));
}

template <class Io>
static int attention(const typename Io::T* q, long q_sh, long q_sn, const typename Io::T* k, long k_sh, long k_sl,
                     const typename Io::T* v, long v_sh, long v_sl, const float* mask, long mask_sn, typename Io::T* out,
                     long H, long KVH, long N, long L, long D, float scale, int threads) {
    if (D % 16 != 0 || D > 256 || KVH <= 0 || H % KVH != 0) return 1;
    const long group = H / KVH, rows = H * N;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = (int)rows;
    #pragma omp parallel num_threads(threads)
    {
        float* s = (float*)malloc(sizeof(float) * (L + 16));
        int* idx = (int*)malloc(sizeof(int) * (L + 16));
        #pragma omp for schedule(static)
        for (long r = 0; r < rows; ++r) {
            const long h = r / N, i = r % N, kh = h / group;
            attend_row<Io>(q + h * q_sh + i * q_sn, k + kh * k_sh, k_sl, v + kh * v_sh, v_sl,
                           mask ? mask + i * mask_sn : nullptr, L - N + i + 1, L, D, scale,
                           out + (i * H + h) * D, s, idx);
        }
        free(s);
        free(idx);
    }
    return 0;
}

extern "C" int treespec_attention_f32(const float* q, long q_sh, long q_sn, const float* k, long k_sh, long k_sl,
                                      const float* v, long v_sh, long v_sl, const float* mask, long mask_sn, float* out,
                                      long H, long KVH, long N, long L, long D, float scale, int threads) {
    return attention<F32Io>(q, q_sh, q_sn, k, k_sh, k_sl, v, v_sh, v_sl, mask, mask_sn, out, H, KVH, N, L, D, scale,
                            threads);
}

extern "C" int treespec_attention_bf16(
        const bf16_t* q, long q_sh, long q_sn, const bf16_t* k, long k_sh, long k_sl, const bf16_t* v, long v_sh,
        long v_sl, const float* mask, long mask_sn, bf16_t* out, long H, long KVH, long N, long L, long D, float scale,
        int threads) {
    return attention<Bf16Io>(q, q_sh, q_sn, k, k_sh, k_sl, v, v_sh, v_sl, mask, mask_sn, out, H, KVH, N, L, D, scale,
                             threads);
}

#else  // AVX2 + FMA: models/kernels/csrc/invariant_gemm_avx2.inc
#include "invariant_gemm_avx2.inc"
#endif
