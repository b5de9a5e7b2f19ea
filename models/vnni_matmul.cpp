// y = x @ W^T for weights stored as unsigned codes with a float16 scale per (row, group of 32):
// 4-bit codes with an offset per group (w = scale * code + offset, ggml's Q4_0/Q4_1/Q4_K maps) or
// symmetric 8-bit codes (w = scale * (code - 128)). Activations are quantized to int8 per group of 32
// and multiplied with AVX-512 VNNI (vpdpbusd: u8 codes x s8 activations -> int32), which is what
// makes the 4-bit path cheap on CPUs: the codes never become floats. The offset term uses the sum
// of the same quantized activations, so the result is exactly w . x_q: with an exact float sum
// the two large, nearly cancelling terms (ggml's offsets are big) would amplify the rounding.
//
// Layout (made by models/vnni_matmul.py): rows in tiles of 16, one int32 lane per row. For a
// tile and a group, the codes are S vectors of 64 bytes; byte 4*r + j of step s is the code of
// row r at k = 4*s + j. 4-bit: 4 vectors, low nibbles are steps 0-3, high nibbles steps 4-7.
// 8-bit: 8 vectors. scale/offset: float16 [tiles, groups, 16] (8-bit has no offset tensor).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kRows = 16;
constexpr int64_t kGroup = 32;
constexpr int64_t kTokens = 6;  // tokens per register tile (2 int32 + 1 float accumulators each)
constexpr int64_t kPrefetch = 8192;  // bytes ahead in the tile stream

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

inline void store16(at::BFloat16* p, __m512 v) {
  // Round to nearest even, as torch's float -> bfloat16 conversion does (NaNs stay NaNs).
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// One row of activations -> int8 codes, a scale per group, and scale * sum(codes) per group.
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* xq, float* xs, float* sx) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m512 a = load16(x + g * kGroup), b = load16(x + g * kGroup + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    __m512 vinv = _mm512_set1_ps(inv);
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vinv));
    __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * kGroup), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * kGroup + 16), _mm512_cvtsepi32_epi8(qb));
    xs[g] = amax / 127.f;
    sx[g] = xs[g] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One tile of 16 rows against NT tokens. Two int32 chains per token keep vpdpbusd's latency
// hidden when NT is small.
template <int NT, int BITS, typename Out>
void tile_kernel(const uint8_t* codes, const at::Half* scale, const at::Half* offset, int64_t G,
                 const int8_t* xq, const float* xs, const float* sx, int64_t K, Out* y,
                 int64_t ldy) {
  constexpr int S = BITS == 4 ? 4 : 8;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* c = codes + g * S * 64;
    const int8_t* xg = xq + g * kGroup;
    // The tile is one sequential stream; asking for it 8 KiB ahead keeps more cache-line fills
    // in flight than the hardware prefetcher does (one thread streaming 103 MB of 4-bit tiles:
    // 15 GB/s without, 25 GB/s with, about what a plain read of memory gets here).
    for (int v = 0; v < S; ++v)
      _mm_prefetch(reinterpret_cast<const char*>(c + kPrefetch + v * 64), _MM_HINT_T0);
    __m512i d0[NT], d1[NT];
    for (int t = 0; t < NT; ++t) d0[t] = d1[t] = _mm512_setzero_si512();
    if constexpr (BITS == 4) {
      for (int v = 0; v < 4; ++v) {
        __m512i w = _mm512_loadu_si512(c + v * 64);
        __m512i lo = _mm512_and_si512(w, nib);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
        for (int t = 0; t < NT; ++t) {
          d0[t] = _mm512_dpbusd_epi32(d0[t], lo, bcast4(xg + t * K + 4 * v));
          d1[t] = _mm512_dpbusd_epi32(d1[t], hi, bcast4(xg + t * K + 4 * (v + 4)));
        }
      }
    } else {
      for (int s = 0; s < 8; s += 2) {
        __m512i w0 = _mm512_loadu_si512(c + s * 64);
        __m512i w1 = _mm512_loadu_si512(c + (s + 1) * 64);
        for (int t = 0; t < NT; ++t) {
          d0[t] = _mm512_dpbusd_epi32(d0[t], w0, bcast4(xg + t * K + 4 * s));
          d1[t] = _mm512_dpbusd_epi32(d1[t], w1, bcast4(xg + t * K + 4 * (s + 1)));
        }
      }
    }
    const __m512 d = load16(scale + g * kRows);
    if constexpr (BITS == 4) {
      const __m512 o = load16(offset + g * kRows);
      for (int t = 0; t < NT; ++t) {
        __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(d0[t], d1[t]));
        __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xs[t * (K / kGroup) + g]));
        acc[t] = _mm512_fmadd_ps(dot, ds, acc[t]);
        acc[t] = _mm512_fmadd_ps(o, _mm512_set1_ps(sx[t * (K / kGroup) + g]), acc[t]);
      }
    } else {  // scale * (xs * dot - 128 * xs * sum(xq))
      for (int t = 0; t < NT; ++t) {
        __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(d0[t], d1[t]));
        __m512 v = _mm512_fmsub_ps(dot, _mm512_set1_ps(xs[t * (K / kGroup) + g]),
                                   _mm512_set1_ps(128.f * sx[t * (K / kGroup) + g]));
        acc[t] = _mm512_fmadd_ps(d, v, acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) store16(y + t * ldy, acc[t]);
}

template <int BITS, typename Out>
void run_tokens(int64_t nt, const uint8_t* codes, const at::Half* scale, const at::Half* offset,
                int64_t G, const int8_t* xq, const float* xs, const float* sx, int64_t K, Out* y,
                int64_t ldy) {
  switch (nt) {
#define SLED_CASE(n)                                                                      \
  case n:                                                                                 \
    tile_kernel<n, BITS, Out>(codes, scale, offset, G, xq, xs, sx, K, y, ldy);           \
    break;
    SLED_CASE(1)
    SLED_CASE(2)
    SLED_CASE(3)
    SLED_CASE(4)
    SLED_CASE(5)
    SLED_CASE(6)
#undef SLED_CASE
    default:
      TORCH_CHECK(false, "vnni_matmul: bad token tile ", nt);
  }
}

template <typename In>
at::Tensor matmul_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t bits, int64_t n_out) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t tiles = codes.size(0), G = codes.size(1);
  TORCH_CHECK(K == G * kGroup, "vnni_matmul: input width ", K, " != groups * 32 = ", G * kGroup);
  TORCH_CHECK(n_out <= tiles * kRows, "vnni_matmul: ", n_out, " rows > ", tiles * kRows);
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xs = at::empty({M, G}, x.options().dtype(at::kFloat));
  auto sx = at::empty({M, G}, x.options().dtype(at::kFloat));
  const In* xp = x.data_ptr<In>();
  int8_t* xqp = xq.data_ptr<int8_t>();
  float* xsp = xs.data_ptr<float>();
  float* sxp = sx.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xp + m * K, K, xqp + m * K, xsp + m * G, sxp + m * G);

  // Tiles write 16 whole rows; the padded output is sliced to n_out afterwards.
  auto y = at::empty({M, tiles * kRows}, x.options());
  In* yp = y.data_ptr<In>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* op = bits == 4 ? offset.data_ptr<at::Half>() : nullptr;
  const int64_t tile_bytes = G * (bits == 4 ? 4 : 8) * 64;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t m0 = 0; m0 < M; m0 += kTokens) {
        const int64_t nt = std::min(kTokens, M - m0);
        if (bits == 4)
          run_tokens<4, In>(nt, cp + i * tile_bytes, sp + i * G * kRows, op + i * G * kRows, G,
                            xqp + m0 * K, xsp + m0 * G, sxp + m0 * G, K,
                            yp + m0 * tiles * kRows + i * kRows, tiles * kRows);
        else
          run_tokens<8, In>(nt, cp + i * tile_bytes, sp + i * G * kRows, nullptr, G,
                            xqp + m0 * K, xsp + m0 * G, sxp + m0 * G, K,
                            yp + m0 * tiles * kRows + i * kRows, tiles * kRows);
      }
    }
  });
  return n_out == tiles * kRows ? y : y.narrow(1, 0, n_out);
}

at::Tensor vnni_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t bits, int64_t n_out) {
  TORCH_CHECK(bits == 4 || bits == 8, "vnni_matmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "vnni_matmul: x must be contiguous [M, K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.is_contiguous() &&
                  codes.size(2) == (bits == 4 ? 4 : 8) && codes.size(3) == 64,
              "vnni_matmul: codes must be uint8 [tiles, groups, steps, 64]");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  scale.numel() == codes.size(0) * codes.size(1) * kRows,
              "vnni_matmul: scale must be float16 [tiles, groups, 16]");
  TORCH_CHECK(bits == 8 || (offset.scalar_type() == at::kHalf && offset.is_contiguous() &&
                            offset.numel() == scale.numel()),
              "vnni_matmul: 4-bit offset must be float16 [tiles, groups, 16]");
  if (x.scalar_type() == at::kBFloat16)
    return matmul_impl<at::BFloat16>(x, codes, scale, offset, bits, n_out);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "vnni_matmul: x must be float32 or bfloat16");
  return matmul_impl<float>(x, codes, scale, offset, bits, n_out);
}

}  // namespace

TORCH_LIBRARY(sled_vnni, m) {
  m.def("matmul(Tensor x, Tensor codes, Tensor scale, Tensor offset, int bits, int n_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(sled_vnni, CPU, m) { m.impl("matmul", &vnni_matmul); }
