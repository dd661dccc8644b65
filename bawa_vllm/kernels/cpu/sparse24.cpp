// 2:4 sparse linear y = x Wᵀ (+ bias) on x86 CPUs with AVX-512, reading the packed weight directly.
//
// Layout (made at load by `retile_`, in place, same tensors and bytes as the on-disk format):
//   mask: the 2-bit positions become a column bitmask, bit b of byte j set when column 8j+b is kept. A
//     little-endian 32-bit word of it is exactly the lane mask of 32 columns (a "word"), and since every
//     group of 4 keeps exactly 2, those columns own exactly 16 values at a fixed offset. One plain 32-byte
//     load plus `vpexpandw` rebuilds 32 dense weights in a register: no prefix sums, no gather.
//   tiling: rows are interleaved in blocks of 4 (kNR), word by word: block b holds, for each word w, the 16
//     values of row 4b, then of 4b+1, 4b+2, 4b+3 (and likewise 4 mask bytes per row). The micro-kernel
//     works on 4 rows at once, and this way it reads one contiguous stream of values and one of mask bytes
//     instead of eight: measured on a DRAM-sized weight, the row-major layout ran at about half the
//     bandwidth. The K % 32 tail columns of a block follow its whole words the same way; the N % 4 last
//     rows stay row-major.
//
// Small M (decode): each thread takes a range of output rows and streams their packed weight once for all
// M rows of x, expanding in registers and accumulating in fp32 (`vdpbf16ps` for bf16 where the CPU has
// AVX512_BF16, FMA on fp32 otherwise). Large M (prefill): each thread decompresses a panel of rows into a
// private L2-sized scratch buffer and runs a dense GEMM (`at::mm`, oneDNN/MKL) on it; no full dense copy.
//
// Threads come from torch's intra-op pool (`at::parallel_for`), so vLLM's OpenMP thread binding applies.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kWord = 32;  // columns per 32-bit mask word (16 kept values)

inline uint32_t load_mask4(const uint8_t* p) {
  uint32_t m;
  std::memcpy(&m, p, 4);
  return m;
}

inline uint32_t load_mask(const uint8_t* p, int64_t nbytes) {
  uint32_t m = 0;
  std::memcpy(&m, p, nbytes);
  return m;
}

// ---------------------------------------------------------------- layout conversion and validation
// Nibble p0 | p1 << 2 (p0 < p1) -> 4-bit mask (1 << p0) | (1 << p1); 0xFF marks an invalid nibble.
uint8_t nibble_mask(int nib) {
  int p0 = nib & 3, p1 = nib >> 2;
  return p0 < p1 ? static_cast<uint8_t>((1 << p0) | (1 << p1)) : 0xFF;
}

constexpr int kNR = 4;  // rows of W per micro-kernel call, and per tile

// Interleaves the first N / kNR * kNR rows of `data` ([N, row_len] elements, row-major) block by block: per
// word, `word` elements of each row of the block; the `tail` elements after the whole words likewise.
// In place, with one block (kNR rows) of scratch.
template <typename E>
void tile_rows(E* data, int64_t N, int64_t row_len, int64_t word, int64_t tail) {
  const int64_t words = (row_len - tail) / word;
  at::parallel_for(0, N / kNR, 64, [&](int64_t begin, int64_t end) {
    std::vector<E> block(kNR * row_len);
    for (int64_t b = begin; b < end; ++b) {
      E* dst = data + b * kNR * row_len;
      std::memcpy(block.data(), dst, sizeof(E) * kNR * row_len);
      for (int64_t w = 0; w < words; ++w)
        for (int r = 0; r < kNR; ++r)
          std::memcpy(dst + (w * kNR + r) * word, block.data() + r * row_len + w * word, sizeof(E) * word);
      for (int r = 0; r < kNR; ++r)
        std::memcpy(dst + words * kNR * word + r * tail, block.data() + r * row_len + words * word, sizeof(E) * tail);
    }
  });
}

// On-disk (values, meta) -> the kernel's layout, in place. Returns {} on success, else {row, group} of the
// first invalid nibble, in which case both tensors are left exactly as loaded (so the caller can report it).
std::vector<int64_t> retile_(torch::Tensor values, torch::Tensor meta) {
  TORCH_CHECK(meta.dtype() == torch::kUInt8 && meta.dim() == 2 && meta.is_contiguous() && meta.device().is_cpu(),
              "bawa_sparse_cpu.retile_: expected a contiguous 2-D uint8 CPU meta tensor");
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu() && values.size(0) == meta.size(0) &&
                  values.size(1) == meta.size(1) * 4 && (values.element_size() == 2 || values.element_size() == 4),
              "bawa_sparse_cpu.retile_: values must be a contiguous [N, K/2] 16- or 32-bit CPU tensor for meta [N, K/8]");
  uint8_t lut[256];
  bool ok[256];
  for (int b = 0; b < 256; ++b) {
    uint8_t lo = nibble_mask(b & 0xF), hi = nibble_mask(b >> 4);
    ok[b] = lo != 0xFF && hi != 0xFF;
    lut[b] = static_cast<uint8_t>(lo | (hi << 4));
  }
  const int64_t rows = meta.size(0), cols = meta.size(1);
  uint8_t* data = meta.data_ptr<uint8_t>();
  // Validate everything first, so that a bad file leaves the tensor as it was loaded.
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = data + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      if (!ok[row[j]]) return {r, 2 * j + (nibble_mask(row[j] & 0xF) == 0xFF ? 0 : 1)};
    }
  }
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* row = data + r * cols;
      for (int64_t j = 0; j < cols; ++j) row[j] = lut[row[j]];
    }
  });
  const int64_t K = cols * 8, tail = K % kWord;
  tile_rows<uint8_t>(data, rows, cols, kWord / 8, tail / 8);
  if (values.element_size() == 2) tile_rows<uint16_t>(reinterpret_cast<uint16_t*>(values.data_ptr()), rows, K / 2, kWord / 2, tail / 2);
  else tile_rows<uint32_t>(reinterpret_cast<uint32_t*>(values.data_ptr()), rows, K / 2, kWord / 2, tail / 2);
  return {};
}

// ---------------------------------------------------------------- expand 32 columns of one row
// Loads the kept values of columns [32w, 32w + width) (width 8, 16, 24 or 32) and places them in their lanes.
inline __m512i expand16(const uint16_t* vals, uint32_t mask, int64_t width) {
  __m256i v = width == kWord ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vals))
                             : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << (width / 2)) - 1), vals);
  return _mm512_maskz_expand_epi16(mask, _mm512_castsi256_si512(v));
}

inline __m512 bf16_lo(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16)); }
inline __m512 bf16_hi(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16)); }
inline __m512 fp16_lo(__m512i v) { return _mm512_cvtph_ps(_mm512_castsi512_si256(v)); }
inline __m512 fp16_hi(__m512i v) { return _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1)); }

// The 32 weights of one word as two fp32 vectors, for each storage dtype.
struct W32 {
  __m512 lo, hi;
};

template <typename T> inline W32 expand_w(const T* vals, uint32_t mask, int64_t width);

template <> inline W32 expand_w<float>(const float* vals, uint32_t mask, int64_t width) {
  // Every 16 columns keep exactly 8 values: the high half starts 8 values in.
  __mmask16 mlo = static_cast<__mmask16>(mask & 0xFFFF), mhi = static_cast<__mmask16>(mask >> 16);
  __m256 vlo = width >= 16 ? _mm256_loadu_ps(vals) : _mm256_maskz_loadu_ps(0x0F, vals);
  __m256 vhi = width == kWord ? _mm256_loadu_ps(vals + 8)
               : width > 16   ? _mm256_maskz_loadu_ps(0x0F, vals + 8)
                              : _mm256_setzero_ps();
  return {_mm512_maskz_expand_ps(mlo, _mm512_castps256_ps512(vlo)), _mm512_maskz_expand_ps(mhi, _mm512_castps256_ps512(vhi))};
}

template <> inline W32 expand_w<c10::BFloat16>(const c10::BFloat16* vals, uint32_t mask, int64_t width) {
  __m512i v = expand16(reinterpret_cast<const uint16_t*>(vals), mask, width);
  return {bf16_lo(v), bf16_hi(v)};
}

template <> inline W32 expand_w<c10::Half>(const c10::Half* vals, uint32_t mask, int64_t width) {
  __m512i v = expand16(reinterpret_cast<const uint16_t*>(vals), mask, width);
  return {fp16_lo(v), fp16_hi(v)};
}

inline __m512 load_x(const float* x, int64_t width) {
  return width >= 16 ? _mm512_loadu_ps(x) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << width) - 1), x);
}

// Where the kernel finds rows of W: value of row r, word w at v + w * v_word + r * v_row, its mask at
// m + w * m_word + r * m_row; the K % 32 tail word at vt + r * vt_row and mt + r * mt_row.
template <typename T>
struct Rows {
  const T* v;
  int64_t v_row, v_word;
  const uint8_t* m;
  int64_t m_row, m_word;
  const T* vt;
  int64_t vt_row;
  const uint8_t* mt;
  int64_t mt_row;
};

// Tiled block b (rows kNR*b ..), or a single row-major row n >= N / kNR * kNR, repeated kNR times.
template <typename T>
Rows<T> rows_of(const T* values, const uint8_t* mask, int64_t N, int64_t K, int64_t b) {
  const int64_t full = K / kWord, tail = K % kWord;
  if (b < N / kNR) {
    const T* v = values + b * kNR * (K / 2);
    const uint8_t* m = mask + b * kNR * (K / 8);
    return {v, kWord / 2, kNR * kWord / 2, m, kWord / 8, kNR * kWord / 8,
            v + full * kNR * kWord / 2, tail / 2, m + full * kNR * kWord / 8, tail / 8};
  }
  const int64_t n = N / kNR * kNR + (b - N / kNR);
  const T* v = values + n * (K / 2);
  const uint8_t* m = mask + n * (K / 8);
  return {v, 0, kWord / 2, m, 0, kWord / 8, v + full * kWord / 2, 0, m + full * kWord / 8, 0};
}

// Number of row groups rows_of() knows: the tiled blocks, then each leftover row.
inline int64_t row_groups(int64_t N) { return N / kNR + N % kNR; }
inline int64_t rows_in_group(int64_t N, int64_t b) { return b < N / kNR ? kNR : 1; }
inline int64_t first_row(int64_t N, int64_t b) { return b < N / kNR ? b * kNR : N / kNR * kNR + (b - N / kNR); }

// ---------------------------------------------------------------- small M: fp32 FMA micro-kernel
// kNR rows of W x MR rows of x (fp32); out[m * kNR + r] = dot(x[m], W[r]).
template <typename T, int MR>
void dot_fp32(const float* const* xs, const Rows<T>& w, int64_t K, float* out) {
  __m512 acc[kNR][MR];
  for (int r = 0; r < kNR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t full = K / kWord;
  for (int64_t i = 0; i < full; ++i) {  // whole words: no masks on the loads
    W32 wv[kNR];
    for (int r = 0; r < kNR; ++r)
      wv[r] = expand_w<T>(w.v + i * w.v_word + r * w.v_row, load_mask4(w.m + i * w.m_word + r * w.m_row), kWord);
    for (int m = 0; m < MR; ++m) {
      const __m512 xlo = _mm512_loadu_ps(xs[m] + i * kWord), xhi = _mm512_loadu_ps(xs[m] + i * kWord + 16);
      for (int r = 0; r < kNR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r].hi, xhi, _mm512_fmadd_ps(wv[r].lo, xlo, acc[r][m]));
    }
  }
  if (const int64_t width = K % kWord) {  // 8, 16 or 24 columns left
    W32 wv[kNR];
    for (int r = 0; r < kNR; ++r)
      wv[r] = expand_w<T>(w.vt + r * w.vt_row, load_mask(w.mt + r * w.mt_row, width / 8), width);
    for (int m = 0; m < MR; ++m) {
      const __m512 xlo = load_x(xs[m] + full * kWord, width);
      const __m512 xhi = width > 16 ? load_x(xs[m] + full * kWord + 16, width - 16) : _mm512_setzero_ps();
      for (int r = 0; r < kNR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r].hi, xhi, _mm512_fmadd_ps(wv[r].lo, xlo, acc[r][m]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kNR; ++r) out[m * kNR + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// ---------------------------------------------------------------- small M: bf16 dot-product micro-kernel
// Same contract with bf16 x: `vdpbf16ps` multiplies bf16 pairs and accumulates in fp32.
template <int MR>
__attribute__((target("avx512bf16"))) void dot_bf16(const uint16_t* const* xs, const Rows<uint16_t>& w, int64_t K,
                                                     float* out) {
  __m512 acc[kNR][MR];
  for (int r = 0; r < kNR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t full = K / kWord;
  for (int64_t i = 0; i < full; ++i) {  // whole words: no masks on the loads
    __m512i wv[kNR];
    for (int r = 0; r < kNR; ++r)
      wv[r] = expand16(w.v + i * w.v_word + r * w.v_row, load_mask4(w.m + i * w.m_word + r * w.m_row), kWord);
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_loadu_si512(xs[m] + i * kWord);
      for (int r = 0; r < kNR; ++r)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], reinterpret_cast<__m512bh>(wv[r]), reinterpret_cast<__m512bh>(xv));
    }
  }
  if (const int64_t width = K % kWord) {  // 8, 16 or 24 columns left
    __m512i wv[kNR];
    for (int r = 0; r < kNR; ++r) wv[r] = expand16(w.vt + r * w.vt_row, load_mask(w.mt + r * w.mt_row, width / 8), width);
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16((1u << width) - 1, xs[m] + full * kWord);
      for (int r = 0; r < kNR; ++r)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], reinterpret_cast<__m512bh>(wv[r]), reinterpret_cast<__m512bh>(xv));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kNR; ++r) out[m * kNR + r] = _mm512_reduce_add_ps(acc[r][m]);
}

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// y[M, N] (fp32) for small M: each task streams its row groups' packed weight once, for all M rows of x
// (in blocks of 4 rows of x; 3 runs as 4 with the last repeated). XT is how the micro-kernel reads x.
template <typename T, typename XT, typename K1, typename K2, typename K4>
void small_m(const XT* x, int64_t M, const T* values, const uint8_t* mask, int64_t N, int64_t K, float* y, K1 k1,
             K2 k2, K4 k4) {
  // Grain: enough rows per task that each streams a few hundred KB, so tasks are not dominated by overhead.
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, K * kNR));
  at::parallel_for(0, row_groups(N), grain, [&](int64_t begin, int64_t end) {
    float out[kNR * 4];
    for (int64_t b = begin; b < end; ++b) {
      const Rows<T> w = rows_of(values, mask, N, K, b);
      const int64_t n0 = first_row(N, b), nr = rows_in_group(N, b);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
        const XT* xs[4];
        for (int m = 0; m < 4; ++m) xs[m] = x + (m0 + std::min(m, mr - 1)) * K;
        if (mr == 1) k1(xs, w, K, out);
        else if (mr == 2) k2(xs, w, K, out);
        else k4(xs, w, K, out);
        for (int m = 0; m < mr; ++m)
          for (int64_t r = 0; r < nr; ++r) y[(m0 + m) * N + n0 + r] = out[m * kNR + r];
      }
    }
  });
}

// ---------------------------------------------------------------- large M: decompress panels, dense GEMM
// The dense rows of row group b, written to dst (rows_in_group x K, row-major).
template <typename T>
void decompress_group(const Rows<T>& w, int64_t nr, int64_t K, T* dst) {
  const int64_t full = K / kWord, width = K % kWord;
  for (int64_t r = 0; r < nr; ++r) {
    T* d = dst + r * K;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i <= full; ++i) {
        const int64_t wd = i < full ? kWord : width;
        if (wd == 0) break;
        const W32 v = i < full ? expand_w<float>(w.v + i * w.v_word + r * w.v_row, load_mask4(w.m + i * w.m_word + r * w.m_row), kWord)
                               : expand_w<float>(w.vt + r * w.vt_row, load_mask(w.mt + r * w.mt_row, wd / 8), wd);
        _mm512_mask_storeu_ps(d + i * kWord, static_cast<__mmask16>(wd >= 16 ? 0xFFFF : (1u << wd) - 1), v.lo);
        if (wd > 16) _mm512_mask_storeu_ps(d + i * kWord + 16, static_cast<__mmask16>(wd == kWord ? 0xFFFF : (1u << (wd - 16)) - 1), v.hi);
      }
    } else {
      const auto* v16 = reinterpret_cast<const uint16_t*>(w.v);
      for (int64_t i = 0; i < full; ++i)
        _mm512_storeu_si512(d + i * kWord, expand16(v16 + i * w.v_word + r * w.v_row, load_mask4(w.m + i * w.m_word + r * w.m_row), kWord));
      if (width)
        _mm512_mask_storeu_epi16(d + full * kWord, (1u << width) - 1,
                                 expand16(reinterpret_cast<const uint16_t*>(w.vt) + r * w.vt_row, load_mask(w.mt + r * w.mt_row, width / 8), width));
    }
  }
}

template <typename T>
void large_m(const torch::Tensor& x2, const torch::Tensor& values, const torch::Tensor& mask, torch::Tensor& y,
             int64_t panel_bytes) {
  const int64_t N = values.size(0), K = values.size(1) * 2, M = x2.size(0);
  const int64_t groups = row_groups(N);
  // Row groups per panel: the dense panel takes about `panel_bytes` (at least 4 groups).
  const int64_t per_panel = std::max<int64_t>(4, panel_bytes / (K * static_cast<int64_t>(sizeof(T)) * kNR));
  const int64_t panels = (groups + per_panel - 1) / per_panel;
  const T* vals = values.data_ptr<T>();
  const uint8_t* mk = mask.data_ptr<uint8_t>();
  // One panel per task: each thread owns its scratch and runs a single-threaded GEMM on it (nested
  // parallel regions run inline), so a panel stays in the thread's own cache between decompression and use.
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    torch::Tensor scratch = torch::empty({per_panel * kNR, K}, values.options());
    torch::Tensor part = torch::empty({M, per_panel * kNR}, y.options());
    for (int64_t p = begin; p < end; ++p) {
      const int64_t g0 = p * per_panel, g1 = std::min(groups, g0 + per_panel);
      const int64_t n0 = first_row(N, g0);
      int64_t rows = 0;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t nr = rows_in_group(N, g);
        decompress_group<T>(rows_of(vals, mk, N, K, g), nr, K, scratch.data_ptr<T>() + rows * K);
        rows += nr;
      }
      auto out = part.narrow(1, 0, rows);
      at::mm_out(out, x2, scratch.narrow(0, 0, rows).t());
      y.narrow(1, n0, rows).copy_(out);
    }
  });
}

// ---------------------------------------------------------------- entry point
torch::Tensor linear(torch::Tensor x2, torch::Tensor values, torch::Tensor mask, c10::optional<torch::Tensor> bias,
                     int64_t small_m_max, int64_t panel_bytes) {
  TORCH_CHECK(x2.dim() == 2 && values.dim() == 2 && mask.dim() == 2, "bawa_sparse_cpu.linear: 2-D tensors expected");
  TORCH_CHECK(x2.device().is_cpu() && values.device().is_cpu() && mask.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(mask.scalar_type() == torch::kUInt8, "mask must be uint8");
  const int64_t N = values.size(0), K = values.size(1) * 2, M = x2.size(0);
  TORCH_CHECK(K % 8 == 0 && mask.size(0) == N && mask.size(1) == K / 8,
              "bawa_sparse_cpu.linear: values [N, K/2] and mask [N, K/8] disagree");
  TORCH_CHECK(x2.size(1) == K, "bawa_sparse_cpu.linear: x has ", x2.size(1), " features, the weight ", K);
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "bawa_sparse_cpu.linear: values must be float32, bfloat16 or float16");
  x2 = x2.to(dtype).contiguous();
  values = values.contiguous();
  mask = mask.contiguous();
  torch::Tensor y;
  if (M > small_m_max) {
    y = torch::empty({M, N}, x2.options());
    if (dtype == torch::kFloat) large_m<float>(x2, values, mask, y, panel_bytes);
    else if (dtype == torch::kBFloat16) large_m<c10::BFloat16>(x2, values, mask, y, panel_bytes);
    else large_m<c10::Half>(x2, values, mask, y, panel_bytes);
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
  torch::Tensor acc = torch::empty({M, N}, x2.options().dtype(torch::kFloat));
  float* yp = acc.data_ptr<float>();
  const uint8_t* mk = mask.data_ptr<uint8_t>();
  if (dtype == torch::kBFloat16 && cpu_has_avx512_bf16()) {
    const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<c10::BFloat16>());
    const auto* vp = reinterpret_cast<const uint16_t*>(values.data_ptr<c10::BFloat16>());
    small_m<uint16_t, uint16_t>(xp, M, vp, mk, N, K, yp, dot_bf16<1>, dot_bf16<2>, dot_bf16<4>);
  } else {
    torch::Tensor xf = x2.to(torch::kFloat).contiguous();
    const float* xp = xf.data_ptr<float>();
    if (dtype == torch::kFloat) {
      small_m<float, float>(xp, M, values.data_ptr<float>(), mk, N, K, yp, dot_fp32<float, 1>, dot_fp32<float, 2>,
                            dot_fp32<float, 4>);
    } else if (dtype == torch::kBFloat16) {
      small_m<c10::BFloat16, float>(xp, M, values.data_ptr<c10::BFloat16>(), mk, N, K, yp,
                                    dot_fp32<c10::BFloat16, 1>, dot_fp32<c10::BFloat16, 2>, dot_fp32<c10::BFloat16, 4>);
    } else {
      small_m<c10::Half, float>(xp, M, values.data_ptr<c10::Half>(), mk, N, K, yp, dot_fp32<c10::Half, 1>,
                                dot_fp32<c10::Half, 2>, dot_fp32<c10::Half, 4>);
    }
  }
  if (bias.has_value()) acc.add_(bias->to(torch::kFloat));
  return acc.to(dtype);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x W^T (+ bias) for a 2:4 W in bitmask layout (small M: packed GEMV; large M: panels)",
        py::arg("x"), py::arg("values"), py::arg("mask"), py::arg("bias"), py::arg("small_m_max"), py::arg("panel_bytes"),
        py::call_guard<py::gil_scoped_release>());
  m.def("retile_", &retile_, "on-disk (values, meta) -> the kernel's tiled bitmask layout, in place; [] or [row, group] of a bad nibble",
        py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512_bf16", &cpu_has_avx512_bf16);
}
