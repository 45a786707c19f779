// XLA FFI CPU handler: int8 weight-only products at decode sizes (csm_jax/kernels/int8_gemv.py).
//
//   y[rows, out] f32 = (x[rows, in] f32 @ q[out, in] s8 .T) * scale[out] f32
//
// Fast path (AVX512-VNNI + AVX512BW/VL): each row of x is quantised to int16 (symmetric, scale max|x| / 32767),
// products of int16 x and sign-extended int8 q are summed by vpdpwssd into int32 partials, which are flushed to
// float32 every kBlock inputs (no int32 overflow). q is streamed once per kMaxRows rows of x. The output channels
// are cut into chunks that XLA's intra-op thread pool and the calling thread take from a shared counter (one
// core alone does not reach the memory bandwidth); a chunk no pool thread has taken yet is run by the caller, so
// the call never waits on a busy pool.
// Error: ~5e-4..1e-3 of the output's std (the int16 rounding of x). A row of x holding inf or NaN gives a NaN
// row. Elsewhere (or with -DCSM_INT8_PORTABLE): a plain loop, exact up to float rounding, for tests.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(CSM_INT8_PORTABLE)
#define CSM_INT8_FAST 1
#include <immintrin.h>
#else
#define CSM_INT8_FAST 0
#endif

namespace ffi = xla::ffi;

namespace {

#if CSM_INT8_FAST
constexpr int64_t kStep = 32;     // int16 lanes of one 512-bit vector
constexpr int64_t kBlock = 4096;  // inputs per int32 partial: 128 vpdpwssd adding <= 2 * 127 * 32767 each < 2^31
constexpr int64_t kPrefetch = 1024;  // bytes ahead of the current weights to prefetch
constexpr int kMaxRows = 4;       // rows of x per pass over q (more: spilled accumulators, slower than 2 passes)

// y[r * ldy + o] for r < R, o0 <= o < o1 (a multiple of O channels) from xq [R, kp] int16 (zero past k),
// per-row scales xs [R]. O channels per pass share each load of x.
template <int R, int O>
void RowsVnni(const int16_t* xq, int64_t kp, const float* xs, const int8_t* q, int64_t k, const float* scale,
              int64_t o0, int64_t o1, float* y, int64_t ldy) {
  const int64_t full = k / kStep * kStep;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (k - full)) - 1);
  for (int64_t o = o0; o < o1; o += O) {
    __m512 total[O][R];
    for (int j = 0; j < O; ++j)
      for (int r = 0; r < R; ++r) total[j][r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < kp; k0 += kBlock) {
      const int64_t k1 = k0 + kBlock < kp ? k0 + kBlock : kp;
      __m512i acc[O][R];
      for (int j = 0; j < O; ++j)
        for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_si512();
      auto step = [&](int64_t i, bool partial) {
        __m512i w16[O];
        for (int j = 0; j < O; ++j) {
          const int8_t* w = q + (o + j) * k + i;
          _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetch, _MM_HINT_T0);
          w16[j] = _mm512_cvtepi8_epi16(partial ? _mm256_maskz_loadu_epi8(tail, w)
                                                : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
        }
        for (int r = 0; r < R; ++r) {
          const __m512i xv = _mm512_loadu_si512(xq + r * kp + i);
          for (int j = 0; j < O; ++j) acc[j][r] = _mm512_dpwssd_epi32(acc[j][r], w16[j], xv);
        }
      };
      const int64_t kf = k1 < full ? k1 : full;
      for (int64_t i = k0; i < kf; i += kStep) step(i, false);
      if (kf < k1) step(kf, true);  // the last, partial vector of q's rows
      for (int j = 0; j < O; ++j)
        for (int r = 0; r < R; ++r) total[j][r] = _mm512_add_ps(total[j][r], _mm512_cvtepi32_ps(acc[j][r]));
    }
    for (int j = 0; j < O; ++j)
      for (int r = 0; r < R; ++r) y[r * ldy + o + j] = _mm512_reduce_add_ps(total[j][r]) * xs[r] * scale[o + j];
  }
}

// All n channels for R rows: 2 channels per pass for 2..4 rows (fewer loads of x per product; 1 row streams one
// weight row at a time), the rest one by one.
template <int R>
void Rows(const int16_t* xq, int64_t kp, const float* xs, const int8_t* q, int64_t k, const float* scale,
          int64_t n, float* y, int64_t ldy) {
  constexpr int O = R >= 2 && R <= 4 ? 2 : 1;
  const int64_t split = n / O * O;
  RowsVnni<R, O>(xq, kp, xs, q, k, scale, 0, split, y, ldy);
  RowsVnni<R, 1>(xq, kp, xs, q, k, scale, split, n, y, ldy);
}

using RowsFn = void (*)(const int16_t*, int64_t, const float*, const int8_t*, int64_t, const float*, int64_t,
                        float*, int64_t);
constexpr RowsFn kRows[kMaxRows] = {Rows<1>, Rows<2>, Rows<3>, Rows<4>};

constexpr int64_t kChunkBytes = 256 << 10;  // weights per chunk of output channels (~10-20 us of streaming)

// Chunks [0, count) of a call, taken by the caller and pool threads from `next`; `done` counts finished ones.
struct Work {
  std::atomic<int64_t> next{0}, done{0};
  int64_t count = 0;
};

void Gemv(const float* x, const int8_t* q, const float* scale, float* y, int64_t rows, int64_t k, int64_t n,
          ffi::ThreadPool* pool) {
  const int64_t kp = (k + kStep - 1) / kStep * kStep;
  thread_local std::vector<int16_t> xq;
  xq.assign(static_cast<size_t>(rows * kp), 0);
  std::vector<float> xs(static_cast<size_t>(rows));
  std::vector<char> finite(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    float m = 0.f;
    bool ok = true;
    for (int64_t i = 0; i < k; ++i) {
      const float a = std::fabs(xr[i]);
      ok &= a <= std::numeric_limits<float>::max();  // false for inf and NaN
      m = a > m ? a : m;
    }
    finite[r] = ok;
    xs[r] = m / 32767.f;
    const float inv = m > 0.f && ok ? 32767.f / m : 0.f;
    int16_t* dst = xq.data() + r * kp;
    for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<int16_t>(std::nearbyint(xr[i] * inv));
  }
  // chunk c covers channels [c * per, min(n, (c + 1) * per)), per even (Rows pairs channels)
  const int64_t per = std::max<int64_t>(2, (kChunkBytes / std::max<int64_t>(k, 1)) / 2 * 2);
  auto work = std::make_shared<Work>();
  work->count = (n + per - 1) / per;
  const int16_t* xqd = xq.data();
  const float* xsd = xs.data();
  // run chunks until none is left; the buffers are touched only by a chunk taken before the caller returns
  auto drain = [=, w = work.get()] {
    for (int64_t c; (c = w->next.fetch_add(1, std::memory_order_relaxed)) < w->count;) {
      const int64_t o0 = c * per, o1 = std::min(n, o0 + per);
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int64_t rr = rows - r0 < kMaxRows ? rows - r0 : kMaxRows;
        kRows[rr - 1](xqd + r0 * kp, kp, xsd + r0, q + o0 * k, k, scale + o0, o1 - o0, y + r0 * n + o0, n);
      }
      w->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = pool == nullptr ? 0 : std::min<int64_t>(pool->num_threads(), work->count) - 1;
  for (int64_t t = 0; t < helpers; ++t)
    pool->Schedule([work, drain] { drain(); });  // `work` keeps the counters alive for late tasks
  drain();
  while (work->done.load(std::memory_order_acquire) < work->count) _mm_pause();
  for (int64_t r = 0; r < rows; ++r)
    if (!finite[r])
      for (int64_t o = 0; o < n; ++o) y[r * n + o] = std::numeric_limits<float>::quiet_NaN();
}
#else
void Gemv(const float* x, const int8_t* q, const float* scale, float* y, int64_t rows, int64_t k, int64_t n,
          ffi::ThreadPool*) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < n; ++o) {
      double acc = 0.0;
      for (int64_t i = 0; i < k; ++i) acc += static_cast<double>(q[o * k + i]) * x[r * k + i];
      y[r * n + o] = static_cast<float>(acc * scale[o]);
    }
}
#endif

using Matrix = ffi::Buffer<ffi::F32, 2>;
using Int8Matrix = ffi::Buffer<ffi::S8, 2>;
using Vector = ffi::Buffer<ffi::F32, 1>;

ffi::Error Int8GemvImpl(ffi::ThreadPool pool, Matrix x, Int8Matrix q, Vector scale,
                        ffi::ResultBuffer<ffi::F32, 2> y) {
  const int64_t rows = x.dimensions()[0], k = x.dimensions()[1], n = q.dimensions()[0];
  if (q.dimensions()[1] != k || scale.dimensions()[0] != n || y->dimensions()[0] != rows ||
      y->dimensions()[1] != n)
    return ffi::Error::InvalidArgument("int8_gemv: expected x [rows, in], q [out, in], scale [out], y [rows, out]");
  Gemv(x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), rows, k, n, &pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CsmInt8Gemv, Int8GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Int8Matrix>()
                                  .Arg<Vector>()
                                  .Ret<Matrix>());

// 1 when the AVX512-VNNI path was compiled in, else 0 (the portable loop).
extern "C" int csm_int8_gemv_fast_path() { return CSM_INT8_FAST; }
