/* The selective scan's forward on the CPU, in C: built on first use by selective_scan_cpu.py
 * (the system's C compiler, -march=native, cached), called through ctypes; plain C with GCC/Clang
 * vector extensions, no Python or torch headers.
 *
 * Per batch row b and channel d, in fp32, with dt after bias and softplus, x = dt * u:
 *     h_t = exp(dt_t A_d) keep_t h_{t-1} + x_t B_t        y_t = C_t . h_t        h: (dstate,)
 * keep_t is 0 where a packed sequence starts (else 1). The reference is _forward_streaming in
 * selective_scan_chunked.py; this is the same function, one step after another per channel.
 *
 * W channels advance together, as W / VW vectors of the machine's width: every state of every
 * channel is its own chain, so the exp and the updates of a step overlap. A tile of TT steps of
 * dt and x is copied into time-major local buffers (the inputs are channel-major, (b, d, L)), and
 * y leaves through one too. exp(dt A) is exp2(dt (A log2 e)) by a polynomial (relative error
 * ~1e-7), 0 below 2^-126: no denormals, which the CPU computes ~100x slower (denormal results of
 * the products are flushed to zero during the call as well).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#define W 16           /* channels advanced together */
#define TT 64          /* steps per tile of the local buffers */
#define MAX_DSTATE 256

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(4 * VW), aligned(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW), aligned(4 * VW)));

static inline __attribute__((always_inline)) vf vselect(vi mask, vf a, vf b)
{
    return (vf)((mask & (vi)a) | (~mask & (vi)b));
}

/* 2^x: round to the nearest integer k, a degree-6 polynomial of f = x - k in [-0.5, 0.5], times 2^k */
static inline __attribute__((always_inline)) vf exp2_vec(vf x)
{
    const vf lo = (vf){0} - 126.0f, hi = (vf){0} + 126.0f;
    vf xc = vselect(x < lo, lo, vselect(x > hi, hi, x));
    vf k = (xc + 12582912.0f) - 12582912.0f;      /* 1.5 * 2^23: rounds to an integer */
    vf f = xc - k;
    vf p = (vf){0} + 1.5337577497120947e-4f;
    p = p * f + 1.3399859890341759e-3f;
    p = p * f + 9.618519805371761e-3f;
    p = p * f + 5.550329014658928e-2f;
    p = p * f + 2.4022646248340607e-1f;
    p = p * f + 6.931471824645996e-1f;
    p = p * f + 1.0f;
    vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
    return vselect(x < lo, (vf){0}, p * (vf)bits);
}

/* Channels [0, cw) of one block (cw <= W), one batch row. dt, x: rows of L (row stride L); y: row
 * stride ldy; A2: (cw, N) = A log2 e; Bt, Ct: (L, N); keep: (L,) or NULL. hs: the state before each
 * chunk of T steps, hs[k * hs_sk + j * hs_sn + c]; last: (cw, N); finals: the state after each
 * position ends[e] (increasing), finals[e * fin_s + c * N + j]. */
static inline __attribute__((always_inline)) void scan_block(
    const int64_t N, const int64_t cw, const int64_t L, const float *dt, const float *x, const float *A2,
    const float *Bt, const float *Ct, const float *keep, float *y, const int64_t ldy, const int64_t T,
    const int64_t K, float *hs, const int64_t hs_sk, const int64_t hs_sn, float *last, const int64_t *ends,
    const int64_t nends, float *finals, const int64_t fin_s)
{
    float h[MAX_DSTATE][W] __attribute__((aligned(64)));
    float a[MAX_DSTATE][W] __attribute__((aligned(64)));
    float dl[TT][W] __attribute__((aligned(64)));
    float xl[TT][W] __attribute__((aligned(64)));
    float yl[TT][W] __attribute__((aligned(64)));
    for (int64_t j = 0; j < N; j++)
        for (int64_t c = 0; c < W; c++) {
            h[j][c] = 0.0f;
            a[j][c] = c < cw ? A2[c * N + j] : 0.0f;
        }
    if (hs)
        for (int64_t c = 0; c < cw; c++)
            for (int64_t j = 0; j < N; j++) hs[j * hs_sn + c] = 0.0f;
    int64_t e = 0, to_chunk_end = T, k = 0;
    for (int64_t t0 = 0; t0 < L; t0 += TT) {
        const int64_t tn = L - t0 < TT ? L - t0 : TT;
        for (int64_t c = 0; c < W; c++)
            for (int64_t s = 0; s < tn; s++) {
                dl[s][c] = c < cw ? dt[c * L + t0 + s] : 0.0f;
                xl[s][c] = c < cw ? x[c * L + t0 + s] : 0.0f;
            }
        for (int64_t s = 0; s < tn; s++) {
            const int64_t t = t0 + s;
            const float kp = keep ? keep[t] : 1.0f;
            const float *b = Bt + t * N, *cc = Ct + t * N;
            for (int64_t v = 0; v < W; v += VW) {
                vf acc = (vf){0};
                const vf dv = *(const vf *)&dl[s][v], xv = *(const vf *)&xl[s][v];
                for (int64_t j = 0; j < N; j++) {
                    vf hj = exp2_vec(dv * *(const vf *)&a[j][v]) * kp * *(vf *)&h[j][v] + xv * b[j];
                    *(vf *)&h[j][v] = hj;
                    acc += cc[j] * hj;
                }
                *(vf *)&yl[s][v] = acc;
            }
            if (--to_chunk_end == 0) {
                to_chunk_end = T;
                if (hs && ++k < K)
                    for (int64_t c = 0; c < cw; c++)
                        for (int64_t j = 0; j < N; j++) hs[k * hs_sk + j * hs_sn + c] = h[j][c];
            }
            for (; e < nends && ends[e] == t; e++)
                for (int64_t c = 0; c < cw; c++)
                    for (int64_t j = 0; j < N; j++) finals[e * fin_s + c * N + j] = h[j][c];
        }
        for (int64_t c = 0; c < cw; c++)
            for (int64_t s = 0; s < tn; s++) y[c * ldy + t0 + s] = yl[s][c];
    }
    if (last)
        for (int64_t c = 0; c < cw; c++)
            for (int64_t j = 0; j < N; j++) last[c * N + j] = h[j][c];
}

/* dt, x: (batch, dim, L) contiguous fp32; A2: (dim, n); Bt: (batch, GB, L, n); Ct: (batch, GC, L, n);
 * channel d reads B group d / per_B and C group d / per_C. keep: (batch, L) or NULL.
 * y[b * y_sb + d * y_sd + t]. HS: (batch, K, n, dim), the state before each chunk of T steps (or NULL);
 * last: (batch, dim, n) (or NULL); ends: nends increasing positions of batch row 0 whose states go to
 * finals (nends, dim, n). Returns 0, or 1 if n > MAX_DSTATE (nothing written). */
int selective_scan_fwd_f32(
    int64_t batch, int64_t dim, int64_t L, int64_t n, const float *dt, const float *x, const float *A2,
    const float *Bt, const float *Ct, int64_t GB, int64_t GC, int64_t per_B, int64_t per_C,
    const float *keep, float *y, int64_t y_sb, int64_t y_sd, int64_t T, int64_t K, float *HS, float *last,
    const int64_t *ends, int64_t nends, float *finals)
{
    if (n > MAX_DSTATE || n < 1) return 1;
#if defined(__x86_64__) || defined(__i386__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);     /* flush-to-zero and denormals-are-zero, for this thread, this call */
#endif
    for (int64_t bi = 0; bi < batch; bi++) {
        for (int64_t d = 0; d < dim;) {
            /* a block never straddles a group of B or of C */
            int64_t end = d + W;
            const int64_t gb_end = (d / per_B + 1) * per_B, gc_end = (d / per_C + 1) * per_C;
            if (end > gb_end) end = gb_end;
            if (end > gc_end) end = gc_end;
            if (end > dim) end = dim;
            const int64_t cw = end - d;
            const float *Bb = Bt + (bi * GB + d / per_B) * L * n;
            const float *Cb = Ct + (bi * GC + d / per_C) * L * n;
            const float *dtr = dt + (bi * dim + d) * L, *xr = x + (bi * dim + d) * L;
            const float *kp = keep ? keep + bi * L : 0;
            float *yr = y + bi * y_sb + d * y_sd;
            float *hs = HS ? HS + bi * K * n * dim + d : 0;
            float *ls = last ? last + (bi * dim + d) * n : 0;
            const int64_t *en = bi == 0 ? ends : 0;
            const int64_t ne = bi == 0 ? nends : 0;
            float *fn = finals ? finals + d * n : 0;
            if (n == 16)   /* Mamba's dstate: a constant trip count the compiler unrolls */
                scan_block(16, cw, L, dtr, xr, A2 + d * n, Bb, Cb, kp, yr, y_sd, T, K, hs, n * dim, dim, ls, en,
                           ne, fn, dim * n);
            else
                scan_block(n, cw, L, dtr, xr, A2 + d * n, Bb, Cb, kp, yr, y_sd, T, K, hs, n * dim, dim, ls, en,
                           ne, fn, dim * n);
            d = end;
        }
    }
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(csr);
#endif
    return 0;
}

/* the sum of a vector's lanes, by halves (the compiler makes each split a lane extract) */
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf2 __attribute__((vector_size(8)));

static inline __attribute__((always_inline)) float hsum4(vf4 v)
{
    vf2 a, b;
    memcpy(&a, &v, 8);
    memcpy(&b, (const char *)&v + 8, 8);
    a += b;
    return a[0] + a[1];
}

static inline __attribute__((always_inline)) float hsum(vf v)
{
#if VW == 16
    vf8 a8, b8;
    memcpy(&a8, &v, 32);
    memcpy(&b8, (const char *)&v + 32, 32);
    a8 += b8;
    vf4 a, b;
    memcpy(&a, &a8, 16);
    memcpy(&b, (const char *)&a8 + 16, 16);
    return hsum4(a + b);
#elif VW == 8
    vf4 a, b;
    memcpy(&a, &v, 16);
    memcpy(&b, (const char *)&v + 16, 16);
    return hsum4(a + b);
#else
    return hsum4(v);
#endif
}

/* The backward of one block of channels [0, cw) (cw <= W) of one batch row, chunk by chunk from the
 * end: each chunk's states are rebuilt from its start state in hs (hs[k * hs_sk + j * hs_sn + c]),
 * then the state gradient runs back through it, g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}.
 * Rows of dt, x, u, gy, gdt, gu have stride L; gdt is written, gu added to. ga (N, W) receives
 * sum_t dt_t M_t; gB, gC (L, N) receive sum_c g_t x_t and sum_c gy_t h_t. glast: (cw, N) added to
 * g at step L-1, or NULL; ends / gfin: the states at positions ends[e] get gfin[e * fin_s + c * N + j]. */
static inline __attribute__((always_inline)) void scan_block_bwd(
    const int64_t N, const int64_t cw, const int64_t L, const float *dt, const float *x, const float *u,
    const float *gy, const float *A2, const float *A, const float *Bt, const float *Ct, const float *keep,
    const int64_t T, const int64_t K, const float *hs, const int64_t hs_sk, const int64_t hs_sn,
    const float *glast, const int64_t *ends, const int64_t nends, const float *gfin, const int64_t fin_s,
    float *gdt, float *gu, float *gA, float *gB, float *gC, float *work)
{
    float a2[MAX_DSTATE][W] __attribute__((aligned(64)));
    float an[MAX_DSTATE][W] __attribute__((aligned(64)));
    float g[MAX_DSTATE][W] __attribute__((aligned(64)));
    float ga[MAX_DSTATE][W] __attribute__((aligned(64)));
    /* work: H (T + 1, N, W) states, DA (T, N, W) decays, then (T, W) tiles of dt, x, u, gy, gdt, gu */
    float *Hw = work, *DAw = Hw + (T + 1) * N * W, *tl = DAw + T * N * W;
    float *dl = tl, *xl = dl + T * W, *ul = xl + T * W, *gyl = ul + T * W, *gdl = gyl + T * W, *gul = gdl + T * W;
    for (int64_t j = 0; j < N; j++)
        for (int64_t c = 0; c < W; c++) {
            a2[j][c] = c < cw ? A2[c * N + j] : 0.0f;
            an[j][c] = c < cw ? A[c * N + j] : 0.0f;
            g[j][c] = 0.0f;
            ga[j][c] = 0.0f;
        }
    int64_t e = nends - 1;
    for (int64_t k = K - 1; k >= 0; k--) {
        const int64_t ts = k * T, tn = L - ts < T ? L - ts : T;
        for (int64_t c = 0; c < W; c++)
            for (int64_t s = 0; s < tn; s++) {
                const int in = c < cw;
                dl[s * W + c] = in ? dt[c * L + ts + s] : 0.0f;
                xl[s * W + c] = in ? x[c * L + ts + s] : 0.0f;
                ul[s * W + c] = in ? u[c * L + ts + s] : 0.0f;
                gyl[s * W + c] = in ? gy[c * L + ts + s] : 0.0f;
            }
        /* the chunk's states, from its start state */
        for (int64_t j = 0; j < N; j++)
            for (int64_t c = 0; c < W; c++) Hw[j * W + c] = c < cw ? hs[k * hs_sk + j * hs_sn + c] : 0.0f;
        for (int64_t s = 0; s < tn; s++) {
            const float kp = keep ? keep[ts + s] : 1.0f;
            const float *b = Bt + (ts + s) * N;
            for (int64_t v = 0; v < W; v += VW) {
                const vf dv = *(const vf *)&dl[s * W + v], xv = *(const vf *)&xl[s * W + v];
                for (int64_t j = 0; j < N; j++) {
                    vf da = exp2_vec(dv * *(const vf *)&a2[j][v]) * kp;
                    *(vf *)&DAw[(s * N + j) * W + v] = da;
                    *(vf *)&Hw[((s + 1) * N + j) * W + v] = da * *(const vf *)&Hw[(s * N + j) * W + v] + xv * b[j];
                }
            }
        }
        /* back through the chunk */
        for (int64_t s = tn - 1; s >= 0; s--) {
            const int64_t t = ts + s;
            if (glast && t == L - 1)
                for (int64_t c = 0; c < cw; c++)
                    for (int64_t j = 0; j < N; j++) g[j][c] += glast[c * N + j];
            for (; gfin && e >= 0 && ends[e] == t; e--)
                for (int64_t c = 0; c < cw; c++)
                    for (int64_t j = 0; j < N; j++) g[j][c] += gfin[e * fin_s + c * N + j];
            const float *b = Bt + t * N, *cc = Ct + t * N;
            float *gb = gB + t * N, *gc = gC + t * N;
            for (int64_t v = 0; v < W; v += VW) {
                const vf dv = *(const vf *)&dl[s * W + v], xv = *(const vf *)&xl[s * W + v];
                const vf gyv = *(const vf *)&gyl[s * W + v];
                vf gx = (vf){0}, gd = (vf){0};
                for (int64_t j = 0; j < N; j++) {
                    const vf da = *(const vf *)&DAw[(s * N + j) * W + v];
                    const vf gj = *(vf *)&g[j][v] + cc[j] * gyv;
                    gc[j] += hsum(gyv * *(const vf *)&Hw[((s + 1) * N + j) * W + v]);
                    gb[j] += hsum(gj * xv);
                    gx += gj * b[j];
                    const vf m = gj * da * *(const vf *)&Hw[(s * N + j) * W + v];
                    gd += *(const vf *)&an[j][v] * m;
                    *(vf *)&ga[j][v] += dv * m;
                    *(vf *)&g[j][v] = da * gj;
                }
                *(vf *)&gdl[s * W + v] = gd + gx * *(const vf *)&ul[s * W + v];
                *(vf *)&gul[s * W + v] = gx * dv;
            }
        }
        for (int64_t c = 0; c < cw; c++)
            for (int64_t s = 0; s < tn; s++) {
                gdt[c * L + ts + s] = gdl[s * W + c];
                gu[c * L + ts + s] += gul[s * W + c];
            }
    }
    for (int64_t c = 0; c < cw; c++)
        for (int64_t j = 0; j < N; j++) gA[c * N + j] += ga[j][c];
}

/* Gradients of channels [c0, c1) (the backward of selective_scan_fwd_f32, before the softplus of dt):
 * dt, x = dt u, u, gy (the gradient of y): (batch, dim, L); A2 = A log2 e and A: (dim, n); Bt, Ct, keep,
 * T, K, HS as the forward's (HS from it). glast: (batch, dim, n) gradient of the last state, or NULL;
 * ends, gfinals (nends, dim, n): gradients of the states after positions ends[e] of row 0 (packed).
 * gdt: written; gu, gA (dim, n), gBt (batch, GB, L, n), gCt (batch, GC, L, n): added to.
 * Returns 0, 1 if n > MAX_DSTATE, 2 if out of memory (nothing written in either case). */
int selective_scan_bwd_f32(
    int64_t batch, int64_t dim, int64_t L, int64_t n, int64_t c0, int64_t c1, const float *dt, const float *x,
    const float *u, const float *gy, const float *A2, const float *A, const float *Bt, const float *Ct, int64_t GB,
    int64_t GC, int64_t per_B, int64_t per_C, const float *keep, int64_t T, int64_t K, const float *HS,
    const float *glast, const int64_t *ends, int64_t nends, const float *gfinals, float *gdt, float *gu, float *gA,
    float *gBt, float *gCt)
{
    if (n > MAX_DSTATE || n < 1) return 1;
    /* 64-byte aligned: the vector loads and stores assume their type's alignment */
    const size_t bytes = sizeof(float) * (size_t)((2 * T + 1) * n * W + 6 * T * W);
    float *work = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!work) return 2;
#if defined(__x86_64__) || defined(__i386__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
#endif
    for (int64_t bi = 0; bi < batch; bi++) {
        for (int64_t d = c0; d < c1;) {
            int64_t end = d + W;
            const int64_t gb_end = (d / per_B + 1) * per_B, gc_end = (d / per_C + 1) * per_C;
            if (end > gb_end) end = gb_end;
            if (end > gc_end) end = gc_end;
            if (end > c1) end = c1;
            const int64_t cw = end - d;
            const int64_t row = (bi * dim + d) * L;
            const float *Bb = Bt + (bi * GB + d / per_B) * L * n, *Cb = Ct + (bi * GC + d / per_C) * L * n;
            float *gBb = gBt + (bi * GB + d / per_B) * L * n, *gCb = gCt + (bi * GC + d / per_C) * L * n;
            const float *kp = keep ? keep + bi * L : 0;
            const float *hs = HS + bi * K * n * dim + d;
            const float *gl = glast ? glast + (bi * dim + d) * n : 0;
            const int64_t ne = bi == 0 ? nends : 0;
            const float *gf = gfinals ? gfinals + d * n : 0;
            if (n == 16)
                scan_block_bwd(16, cw, L, dt + row, x + row, u + row, gy + row, A2 + d * n, A + d * n, Bb, Cb, kp,
                               T, K, hs, n * dim, dim, gl, ends, ne, gf, dim * n, gdt + row, gu + row, gA + d * n,
                               gBb, gCb, work);
            else
                scan_block_bwd(n, cw, L, dt + row, x + row, u + row, gy + row, A2 + d * n, A + d * n, Bb, Cb, kp,
                               T, K, hs, n * dim, dim, gl, ends, ne, gf, dim * n, gdt + row, gu + row, gA + d * n,
                               gBb, gCb, work);
            d = end;
        }
    }
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(csr);
#endif
    free(work);
    return 0;
}
