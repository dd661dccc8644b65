// 2:4 sparse linear y = x Wᵀ (+ bias) on x86 CPUs with AVX-512, reading the packed weight directly.
//
// The weight stays in the on-disk encoding (docs/FORMAT.md): values [N, K/2] (the 2 kept values of every
// group of 4 columns, in order) and meta [N, K/8] (each group's positions p0 | p1 << 2, two groups a byte).
// Only the order of the bytes changes at load (`retile_`, in place, same tensors and sizes), in one of two ways.
// For the GEMV (other dtypes, and bf16 on CPUs without AVX512_BF16) rows are interleaved in blocks of 4 (kNR),
// word by word, a word being 64 columns = 32 values + 8 metadata bytes. Block b holds, for each word, the 32
// values of row 4b, then of 4b+1, 4b+2, 4b+3, and likewise 8 metadata bytes per row; the K % 64 tail columns of
// a block follow its whole words the same way; the N % 4 last rows stay row-major. The micro-kernel works on 4
// rows at once, so it reads one contiguous stream of values and one of metadata instead of eight (row-major ran
// at about half the bandwidth on DRAM-sized weights). For the row lanes (bf16 on CPUs with AVX512_BF16) the
// first N / 16 * 16 rows are interleaved the same way in blocks of 16, and each word's values of a block are
// then transposed so that a group's kept pairs of the 16 rows are one 64-byte vector (below); the rows after
// them are laid out as for the GEMV, which runs them.
//
// Gather, not expand: the 32 values of a word are exactly the operands of one `vdpbf16ps` if x is brought
// to them. Lane i holds value i of group i/2, whose column is 4 (i/2) + p_i, and p_i is bit field 2i of the
// word's 64 metadata bits. One `vpmultishiftqb` pulls all 32 fields out (plus an and and an add), and one
// `vpermt2w` per row of x gathers x's 64 columns into those 32 lanes. So a word costs one dot product per
// row of x (the dense computation has two for 64 columns) and no expansion (a register `vpexpandw` measured
// about 5 cycles on Zen 5 and bounded the first version of this kernel). Other dtypes (fp32, fp16, and bf16
// on CPUs without AVX512_BF16) gather in fp32 with `vpermt2ps`, 32 columns at a time, and FMA.
//
// bf16 on CPUs with AVX512_BF16: row lanes (below), a vector lane per row of W, x picked by `vpshufb`, which
// costs less than the gather, at every token count. Other dtypes: the GEMV above up to SMALL_M_MAX tokens (each
// thread takes a range of row blocks and streams their packed weight once for all M rows of x, 4 rows of x per
// pass), and above it panels decompressed for `at::mm`. No full dense copy ever exists. kernels/cpu/__init__.py
// has the measured crossovers, and sends bf16 prefill to the panels on CPUs with AMX-BF16, where oneDNN's GEMM
// runs on AMX.
//
// Threads come from torch's intra-op pool (`at::parallel_for`), so vLLM's OpenMP thread binding applies.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kWord = 64;  // columns per word: 32 values, 8 metadata bytes
constexpr int kNR = 4;         // rows of W per micro-kernel call, and per tile

inline uint64_t load_meta(const uint8_t* p, int64_t nbytes) {
  uint64_t m = 0;
  std::memcpy(&m, p, nbytes);
  return m;
}

inline uint64_t load_meta8(const uint8_t* p) {
  uint64_t m;
  std::memcpy(&m, p, 8);
  return m;
}

// ---------------------------------------------------------------- layout: validation and row tiling
// Interleaves rows of `data` ([N, row_len] elements, row-major) in blocks of R rows (the first N / R * R rows):
// per word, `word` elements of each row of the block; the `tail` elements after the whole words likewise.
// In place, with one block of scratch per task.
template <typename E>
void tile_rows(E* data, int64_t N, int64_t row_len, int64_t word, int64_t tail, int64_t R) {
  const int64_t words = (row_len - tail) / word;
  at::parallel_for(0, N / R, 64, [&](int64_t begin, int64_t end) {
    std::vector<E> block(R * row_len);
    for (int64_t b = begin; b < end; ++b) {
      E* dst = data + b * R * row_len;
      std::memcpy(block.data(), dst, sizeof(E) * R * row_len);
      for (int64_t w = 0; w < words; ++w)
        for (int64_t r = 0; r < R; ++r)
          std::memcpy(dst + (w * R + r) * word, block.data() + r * row_len + w * word, sizeof(E) * word);
      for (int64_t r = 0; r < R; ++r)
        std::memcpy(dst + words * R * word + r * tail, block.data() + r * row_len + words * word, sizeof(E) * tail);
    }
  });
}

// In-register transpose of a 16 x 16 block of 32-bit elements: r[i] holds row i on entry, column i on return.
// 64 shuffles for 256 elements.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4q + j], 128-bit lane L: column 4L + j of rows 4q .. 4q + 3
  __m512i u[16];
  for (int q = 0; q < 4; ++q) {
    u[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  // column 4L + j = lane L of u[j], u[4 + j], u[8 + j], u[12 + j]
  for (int j = 0; j < 4; ++j) {
    const __m512i s0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), s1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), s3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

inline __mmask32 lanes32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1; }
inline __mmask16 lanes16(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// The 16-bit values of `rows` rows (a multiple of 16) already tiled in blocks of 16, turned into row lanes: per
// block and word, the 16 rows x 16 dwords (a dword = a group's kept pair) transposed so that dword l of vector
// g is group g of row l; the tail's 16 rows x (tail / 4) dwords likewise, into tail / 4 vectors. Same bytes.
void transpose_to_lanes(uint16_t* values, int64_t rows, int64_t K) {
  const int64_t words = K / kWord, groups = (K % kWord) / 4;
  at::parallel_for(0, rows / 16, 16, [&](int64_t begin, int64_t end) {
    __m512i r[16];
    for (int64_t b = begin; b < end; ++b) {
      uint32_t* p = reinterpret_cast<uint32_t*>(values + b * 16 * (K / 2));
      for (int64_t i = 0; i < words; ++i, p += 256) {
        for (int l = 0; l < 16; ++l) r[l] = _mm512_loadu_si512(p + 16 * l);
        transpose16x16(r);
        for (int g = 0; g < 16; ++g) _mm512_storeu_si512(p + 16 * g, r[g]);
      }
      if (groups) {
        for (int l = 0; l < 16; ++l) r[l] = _mm512_maskz_loadu_epi32(lanes16(groups), p + groups * l);
        transpose16x16(r);
        for (int64_t g = 0; g < groups; ++g) _mm512_storeu_si512(p + 16 * g, r[g]);
      }
    }
  });
}

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// Whether a weight of this dtype is kept as row lanes (bf16 on CPUs with AVX512_BF16, the only case the lanes
// run); its first N / 16 * 16 rows then are.
bool lanes_layout(c10::ScalarType dtype) { return dtype == torch::kBFloat16 && cpu_has_avx512_bf16(); }
inline int64_t lane_rows(int64_t N) { return N / 16 * 16; }

inline bool valid_nibble(int nib) { return (nib & 3) < (nib >> 2); }

// Validates every position nibble, then tiles values and meta in place. Returns {} on success, else {row,
// group} of the first invalid nibble, in which case both tensors are left exactly as loaded.
std::vector<int64_t> retile_(torch::Tensor values, torch::Tensor meta) {
  TORCH_CHECK(meta.dtype() == torch::kUInt8 && meta.dim() == 2 && meta.is_contiguous() && meta.device().is_cpu(),
              "bawa_sparse_cpu.retile_: expected a contiguous 2-D uint8 CPU meta tensor");
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu() && values.size(0) == meta.size(0) &&
                  values.size(1) == meta.size(1) * 4 && (values.element_size() == 2 || values.element_size() == 4),
              "bawa_sparse_cpu.retile_: values must be a contiguous [N, K/2] 16- or 32-bit CPU tensor for meta [N, K/8]");
  const int64_t rows = meta.size(0), cols = meta.size(1);
  uint8_t* data = meta.data_ptr<uint8_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = data + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      if (!valid_nibble(row[j] & 0xF)) return {r, 2 * j};
      if (!valid_nibble(row[j] >> 4)) return {r, 2 * j + 1};
    }
  }
  const int64_t K = cols * 8, tail = K % kWord, lr = lanes_layout(values.scalar_type()) ? lane_rows(rows) : 0;
  // Blocks of 16 rows for the lanes, then blocks of kNR for the GEMV, the N % kNR last rows row-major.
  tile_rows<uint8_t>(data, lr, cols, kWord / 8, tail / 8, 16);
  tile_rows<uint8_t>(data + lr * cols, rows - lr, cols, kWord / 8, tail / 8, kNR);
  auto tile = [&](auto* v) {
    tile_rows(v, lr, K / 2, kWord / 2, tail / 2, 16);
    tile_rows(v + lr * (K / 2), rows - lr, K / 2, kWord / 2, tail / 2, kNR);
  };
  if (values.element_size() == 2) tile(reinterpret_cast<uint16_t*>(values.data_ptr()));
  else tile(reinterpret_cast<uint32_t*>(values.data_ptr()));
  if (lr) transpose_to_lanes(reinterpret_cast<uint16_t*>(values.data_ptr()), lr, K);
  return {};
}

// Where the kernel finds rows of W: values of row r, word w at v + w * v_word + r * v_row, its metadata at
// m + w * m_word + r * m_row; the K % 64 tail at vt + r * vt_row and mt + r * mt_row.
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
Rows<T> rows_of(const T* values, const uint8_t* meta, int64_t N, int64_t K, int64_t b) {
  const int64_t full = K / kWord, tail = K % kWord;
  if (b < N / kNR) {
    const T* v = values + b * kNR * (K / 2);
    const uint8_t* m = meta + b * kNR * (K / 8);
    return {v, kWord / 2, kNR * kWord / 2, m, kWord / 8, kNR * kWord / 8,
            v + full * kNR * kWord / 2, tail / 2, m + full * kNR * kWord / 8, tail / 8};
  }
  const int64_t n = N / kNR * kNR + (b - N / kNR);
  const T* v = values + n * (K / 2);
  const uint8_t* m = meta + n * (K / 8);
  return {v, 0, kWord / 2, m, 0, kWord / 8, v + full * kWord / 2, 0, m + full * kWord / 8, 0};
}

// Software prefetch of word i's values and metadata (call it for a word some way ahead). The hardware
// prefetchers alone left decode at about half a core's DRAM bandwidth once the micro-kernel had work to do:
// the loads stalled and the arithmetic waited on them instead of overlapping. Never faults, so no bounds.
// The GEMV reads each weight byte once, so it prefetches non-temporally (`_MM_HINT_NTA`), which leaves less of
// the stream behind in the outer caches (our guess at why it is faster). Against `_MM_HINT_T0`, bf16, the two
// interleaved in one run on five 1B/8B shapes (weights cycled past L3): vLLM's GEMM time over ours at M = 1
// went 1.45-1.74x -> 1.50-1.99x at 1 thread, and NTA was ahead in all 20 cells of M = 1, 2 at 1 and 2 threads.
// The fp32 GEMV streams the same way and takes the same hint, not measured separately. The panel decompression
// keeps T0, which it was measured with.
template <int Hint = _MM_HINT_T0, typename T>
inline void prefetch_word(const Rows<T>& w, int64_t i) {
  const char* pv = reinterpret_cast<const char*>(w.v + i * w.v_word);
  for (int64_t o = 0; o < w.v_word * static_cast<int64_t>(sizeof(T)); o += 64) _mm_prefetch(pv + o, static_cast<_mm_hint>(Hint));
  _mm_prefetch(reinterpret_cast<const char*>(w.m + i * w.m_word), static_cast<_mm_hint>(Hint));
}
// How far ahead the GEMV prefetches: 16 KiB of values, 64 words for a block of 4 bf16 rows. On a 2048 x 8192
// bf16 weight streamed from DRAM by one Zen 5 core, 1 token, 4 rows of bf16 per block: no software prefetch
// 12.5 GB/s; 8 words ahead 17.5; 16 words 20.7; 32 words 22.6; 64 words 29.5-31.4; 128 words 25.2.
constexpr int64_t kPrefetchBytes = 16 << 10;
// Decompressing whole rows (the `at::mm` panels), a group prefetches its own stream 8 words ahead; 32 and 64
// measured no different.
constexpr int64_t kDecompressPrefetchWords = 8;

template <typename T>
inline int64_t prefetch_words(const Rows<T>& w) {
  return std::max<int64_t>(1, kPrefetchBytes / (w.v_word * static_cast<int64_t>(sizeof(T))));
}

// Row groups rows_of() knows: the tiled blocks, then each leftover row.
inline int64_t row_groups(int64_t N) { return N / kNR + N % kNR; }
inline int64_t rows_in_group(int64_t N, int64_t b) { return b < N / kNR ? kNR : 1; }
inline int64_t first_row(int64_t N, int64_t b) { return b < N / kNR ? b * kNR : N / kNR * kNR + (b - N / kNR); }

// ---------------------------------------------------------------- gather indices from position nibbles
// 16-bit lane i: 4 (i / 2) + ((meta >> 2i) & 3), the column (0..63) of value i of a 64-column word.
struct GatherConstants {
  alignas(64) uint8_t shift[64];  // byte 2i takes the 8 bits from bit 2i of the broadcast metadata word
  alignas(64) uint16_t base[32];  // 4 (i / 2): the first column of value i's group
  GatherConstants() {
    for (int i = 0; i < 32; ++i) {
      shift[2 * i] = static_cast<uint8_t>(2 * i);
      shift[2 * i + 1] = 0;
      base[i] = static_cast<uint16_t>(4 * (i / 2));
    }
  }
};
const GatherConstants kGather;

inline __m512i gather_idx16(uint64_t meta) {
  const __m512i fields = _mm512_multishift_epi64_epi8(_mm512_load_si512(kGather.shift),
                                                      _mm512_set1_epi64(static_cast<long long>(meta)));
  return _mm512_add_epi16(_mm512_and_si512(fields, _mm512_set1_epi16(3)), _mm512_load_si512(kGather.base));
}

// 32-bit lane i: 4 (i / 2) + ((meta >> 2i) & 3), the column (0..31) of value i of a 32-column half word.
inline __m512i gather_idx32(uint32_t meta) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i fields = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(meta)), shifts);
  return _mm512_add_epi32(_mm512_and_si512(fields, _mm512_set1_epi32(3)), base);
}

// 16 values (of `count`) as fp32, for each storage dtype.
template <typename T> inline __m512 load_values(const T* v, int64_t count);
template <> inline __m512 load_values<float>(const float* v, int64_t count) { return _mm512_maskz_loadu_ps(lanes16(count), v); }
template <> inline __m512 load_values<c10::BFloat16>(const c10::BFloat16* v, int64_t count) {
  const __m256i h = _mm256_maskz_loadu_epi16(lanes16(count), v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <> inline __m512 load_values<c10::Half>(const c10::Half* v, int64_t count) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes16(count), v));
}

// ---------------------------------------------------------------- small M: bf16 dot-product micro-kernel
// kNR rows of W x MR rows of x (bf16); out[m * kNR + r] = dot(x[m], W[r]), accumulated in fp32.
template <int MR>
__attribute__((target("avx512bf16"))) void dot_bf16(const uint16_t* const* xs, const Rows<uint16_t>& w, int64_t K,
                                                     float* out) {
  __m512 acc[kNR][MR];
  for (int r = 0; r < kNR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t full = K / kWord, ahead = prefetch_words(w);
  for (int64_t i = 0; i < full; ++i) {
    prefetch_word<_MM_HINT_NTA>(w, i + ahead);
    __m512i idx[kNR], wv[kNR];
    for (int r = 0; r < kNR; ++r) {
      idx[r] = gather_idx16(load_meta8(w.m + i * w.m_word + r * w.m_row));
      wv[r] = _mm512_loadu_si512(w.v + i * w.v_word + r * w.v_row);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i xl = _mm512_loadu_si512(xs[m] + i * kWord), xh = _mm512_loadu_si512(xs[m] + i * kWord + 32);
      for (int r = 0; r < kNR; ++r)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], reinterpret_cast<__m512bh>(wv[r]),
                                     reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(xl, idx[r], xh)));
    }
  }
  if (const int64_t width = K % kWord) {  // 8 .. 56 columns: masked loads, zeros beyond
    __m512i idx[kNR], wv[kNR];
    for (int r = 0; r < kNR; ++r) {
      idx[r] = gather_idx16(load_meta(w.mt + r * w.mt_row, width / 8));
      wv[r] = _mm512_maskz_loadu_epi16(lanes32(width / 2), w.vt + r * w.vt_row);
    }
    for (int m = 0; m < MR; ++m) {
      const uint16_t* x = xs[m] + full * kWord;
      const __m512i xl = _mm512_maskz_loadu_epi16(lanes32(width), x);
      const __m512i xh = width > 32 ? _mm512_maskz_loadu_epi16(lanes32(width - 32), x + 32) : _mm512_setzero_si512();
      for (int r = 0; r < kNR; ++r)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], reinterpret_cast<__m512bh>(wv[r]),
                                     reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(xl, idx[r], xh)));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kNR; ++r) out[m * kNR + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// ---------------------------------------------------------------- small M: fp32 FMA micro-kernel
// Same contract for x in fp32 and values of any dtype: a word is two 32-column halves of 16 values each.
template <typename T, int MR>
void dot_fp32(const float* const* xs, const Rows<T>& w, int64_t K, float* out) {
  __m512 acc[kNR][MR];
  for (int r = 0; r < kNR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  // One 32-column half: values at v (16 of them, fewer in a tail), its 4 metadata bytes at mk, x at column c.
  auto half = [&](const T* const* v, const uint8_t* const* mk, int64_t c, int64_t width) {
    __m512i idx[kNR];
    __m512 wv[kNR];
    for (int r = 0; r < kNR; ++r) {
      idx[r] = gather_idx32(static_cast<uint32_t>(load_meta(mk[r], width / 8)));
      wv[r] = load_values<T>(v[r], width / 2);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 xl = _mm512_maskz_loadu_ps(lanes16(width), xs[m] + c);
      const __m512 xh = width > 16 ? _mm512_maskz_loadu_ps(lanes16(width - 16), xs[m] + c + 16) : _mm512_setzero_ps();
      for (int r = 0; r < kNR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], _mm512_permutex2var_ps(xl, idx[r], xh), acc[r][m]);
    }
  };
  const T* v[kNR];
  const uint8_t* mk[kNR];
  const int64_t full = K / kWord, ahead = prefetch_words(w);
  for (int64_t i = 0; i < full; ++i) {
    prefetch_word<_MM_HINT_NTA>(w, i + ahead);
    for (int h = 0; h < 2; ++h) {
      for (int r = 0; r < kNR; ++r) {
        v[r] = w.v + i * w.v_word + r * w.v_row + 16 * h;
        mk[r] = w.m + i * w.m_word + r * w.m_row + 4 * h;
      }
      half(v, mk, i * kWord + 32 * h, 32);
    }
  }
  const int64_t width = K % kWord;
  for (int h = 0; 32 * h < width; ++h) {
    for (int r = 0; r < kNR; ++r) {
      v[r] = w.vt + r * w.vt_row + 16 * h;
      mk[r] = w.mt + r * w.mt_row + 4 * h;
    }
    half(v, mk, full * kWord + 32 * h, std::min<int64_t>(32, width - 32 * h));
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kNR; ++r) out[m * kNR + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// y[M, N] (fp32) for small M: each task streams its row groups' packed weight once, for all M rows of x
// (in blocks of 4 rows of x; 3 runs as 4 with the last repeated). XT is how the micro-kernel reads x. Row groups
// before first_group are left to the row lanes.
template <typename T, typename XT, typename K1, typename K2, typename K4>
void small_m(const XT* x, int64_t M, const T* values, const uint8_t* meta, int64_t N, int64_t K, float* y, K1 k1,
             K2 k2, K4 k4, int64_t first_group = 0) {
  // Grain: enough rows per task that each streams a few hundred KB, so tasks are not dominated by overhead.
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, K * kNR));
  if (first_group >= row_groups(N)) return;
  at::parallel_for(first_group, row_groups(N), grain, [&](int64_t begin, int64_t end) {
    float out[kNR * 4];
    for (int64_t b = begin; b < end; ++b) {
      const Rows<T> w = rows_of(values, meta, N, K, b);
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
// Column bitmask of the groups in `nbytes` metadata bytes (bit c set when column c is kept): a byte (two
// groups' nibbles) maps to the 8-bit mask of its 8 columns.
struct MaskTable {
  uint8_t of[256];
  MaskTable() {
    for (int b = 0; b < 256; ++b) {
      const int lo = b & 0xF, hi = b >> 4;
      of[b] = static_cast<uint8_t>(((1 << (lo & 3)) | (1 << (lo >> 2))) | (((1 << (hi & 3)) | (1 << (hi >> 2))) << 4));
    }
  }
};
const MaskTable kMask;

inline uint64_t column_mask(uint64_t meta, int64_t nbytes) {
  uint64_t mask = 0;
  for (int64_t j = 0; j < nbytes; ++j) mask |= static_cast<uint64_t>(kMask.of[(meta >> (8 * j)) & 0xFF]) << (8 * j);
  return mask;
}

// The dense row r of a row group (K columns) written to d, from `width` columns at a time.
template <typename T>
void decompress_span(const T* v, uint64_t meta, int64_t width, T* d) {
  const uint64_t mask = column_mask(meta, width / 8);
  for (int64_t h = 0; 32 * h < width; ++h) {  // 32 columns own 16 values
    const int64_t hw = std::min<int64_t>(32, width - 32 * h);
    const uint32_t m = static_cast<uint32_t>(mask >> (32 * h));
    if constexpr (std::is_same_v<T, float>) {
      const __m256 lo = _mm256_maskz_loadu_ps(static_cast<__mmask8>(hw >= 16 ? 0xFF : (1u << (hw / 2)) - 1), v + 16 * h);
      const __m256 hi = hw > 16 ? _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << ((hw - 16) / 2)) - 1), v + 16 * h + 8)
                                : _mm256_setzero_ps();
      _mm512_mask_storeu_ps(d + 32 * h, lanes16(hw), _mm512_maskz_expand_ps(static_cast<__mmask16>(m & 0xFFFF), _mm512_castps256_ps512(lo)));
      if (hw > 16)
        _mm512_mask_storeu_ps(d + 32 * h + 16, lanes16(hw - 16), _mm512_maskz_expand_ps(static_cast<__mmask16>(m >> 16), _mm512_castps256_ps512(hi)));
    } else {
      const __m256i vals = _mm256_maskz_loadu_epi16(lanes16(hw / 2), reinterpret_cast<const uint16_t*>(v) + 16 * h);
      _mm512_mask_storeu_epi16(d + 32 * h, lanes32(hw), _mm512_maskz_expand_epi16(m, _mm512_castsi256_si512(vals)));
    }
  }
}

// A whole 64-column word of a 16-bit dtype, without `vpexpandw` (about 5 cycles on Zen 5) or a scalar mask
// per byte: per byte lane c, `vpmultishiftqb` pulls the nibble of group c / 4, a 64-entry `vpermb` table maps
// (nibble, c % 4) to the offset of the kept value in its group (0 or 1) or to "zero" (bit 7), plus 2 (c / 4);
// two `vpermw` then place the 32 values.
struct WordConstants {
  alignas(64) uint8_t shift[64];  // byte c: bit offset of group c / 4's nibble in the word's metadata
  alignas(64) uint8_t lane[64];   // c % 4
  alignas(64) uint8_t base[64];   // 2 (c / 4): the first value of c's group
  alignas(64) uint8_t table[64];  // (nibble << 2 | j) -> 0 if j == p0, 1 if j == p1, else 0x80
  WordConstants() {
    for (int c = 0; c < 64; ++c) {
      shift[c] = static_cast<uint8_t>(4 * (c / 4));
      lane[c] = static_cast<uint8_t>(c % 4);
      base[c] = static_cast<uint8_t>(2 * (c / 4));
      const int nibble = c >> 2, j = c & 3;
      table[c] = j == (nibble & 3) ? 0 : j == (nibble >> 2) ? 1 : 0x80;
    }
  }
};
const WordConstants kWordC;

inline void decompress_word16(const uint16_t* v, uint64_t meta, uint16_t* d) {
  const __m512i nib = _mm512_and_si512(
      _mm512_multishift_epi64_epi8(_mm512_load_si512(kWordC.shift), _mm512_set1_epi64(static_cast<long long>(meta))),
      _mm512_set1_epi8(0x0F));
  const __m512i code = _mm512_or_si512(_mm512_slli_epi16(nib, 2), _mm512_load_si512(kWordC.lane));  // < 64 per byte
  const __m512i idx = _mm512_add_epi8(_mm512_permutexvar_epi8(code, _mm512_load_si512(kWordC.table)),
                                      _mm512_load_si512(kWordC.base));
  const __m512i vals = _mm512_loadu_si512(v);
  const __m512i zero = _mm512_set1_epi16(0x80);
  const __m512i lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(idx));
  const __m512i hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(idx, 1));
  _mm512_storeu_si512(d, _mm512_maskz_permutexvar_epi16(_mm512_testn_epi16_mask(lo, zero), lo, vals));
  _mm512_storeu_si512(d + 32, _mm512_maskz_permutexvar_epi16(_mm512_testn_epi16_mask(hi, zero), hi, vals));
}

// The dense rows of a row group (nr rows, K columns) written to dst (row stride ld).
template <typename T>
void decompress_group(const Rows<T>& w, int64_t nr, int64_t K, T* dst, int64_t ld) {
  const int64_t full = K / kWord, width = K % kWord;
  // Word by word, then row by row: that is the order the tiled layout stores them in, one contiguous stream
  // (row by row over all words walked 4 strided streams and stalled on nearly every load).
  for (int64_t i = 0; i < full; ++i) {
    prefetch_word(w, i + kDecompressPrefetchWords);
    for (int64_t r = 0; r < nr; ++r) {
      const T* v = w.v + i * w.v_word + r * w.v_row;
      const uint64_t m = load_meta8(w.m + i * w.m_word + r * w.m_row);
      T* d = dst + r * ld + i * kWord;
      if constexpr (sizeof(T) == 2)
        decompress_word16(reinterpret_cast<const uint16_t*>(v), m, reinterpret_cast<uint16_t*>(d));
      else
        decompress_span<T>(v, m, kWord, d);
    }
  }
  if (width)
    for (int64_t r = 0; r < nr; ++r)
      decompress_span<T>(w.vt + r * w.vt_row, load_meta(w.mt + r * w.mt_row, width / 8), width, dst + r * ld + full * kWord);
}

// The 16 dense rows of lanes block c (K columns) written to dst (row stride ld): the lanes transposed back to
// rows (transpose16x16 is its own inverse), each row's word then decompressed as above.
void decompress_lanes(const uint16_t* values, const uint8_t* meta, int64_t K, int64_t c, uint16_t* dst, int64_t ld) {
  const int64_t words = K / kWord, tail = K % kWord;
  const uint32_t* p = reinterpret_cast<const uint32_t*>(values + 16 * c * (K / 2));
  const uint8_t* m = meta + 16 * c * (K / 8);
  alignas(64) uint16_t rows[16][32];
  __m512i r[16];
  auto transposed = [&](int64_t groups) {
    for (int l = 0; l < 16; ++l) r[l] = l < groups ? _mm512_loadu_si512(p + 16 * l) : _mm512_setzero_si512();
    transpose16x16(r);
    for (int l = 0; l < 16; ++l) _mm512_store_si512(rows[l], r[l]);
  };
  for (int64_t i = 0; i < words; ++i, p += 256, m += 128) {
    transposed(16);
    for (int l = 0; l < 16; ++l) decompress_word16(rows[l], load_meta8(m + 8 * l), dst + l * ld + i * kWord);
  }
  if (tail) {
    transposed(tail / 4);
    for (int l = 0; l < 16; ++l)
      decompress_span<uint16_t>(rows[l], load_meta(m + l * (tail / 8), tail / 8), tail, dst + l * ld + words * kWord);
  }
}

// Row groups [g0, g1) decompressed one under the other into dst (row stride ld); returns the rows written.
// With `lanes` (lanes_layout) the groups of the first N / 16 * 16 rows come 4 to a block of lanes, and g0 and g1
// there are multiples of 4.
template <typename T>
int64_t decompress_panel(const T* vals, const uint8_t* mk, int64_t N, int64_t K, int64_t g0, int64_t g1, T* dst,
                         int64_t ld, bool lanes) {
  int64_t rows = 0;
  for (int64_t g = g0; g < g1;) {
    if (lanes && g < lane_rows(N) / kNR) {
      decompress_lanes(reinterpret_cast<const uint16_t*>(vals), mk, K, g / 4, reinterpret_cast<uint16_t*>(dst + rows * ld), ld);
      rows += 16, g += 4;
      continue;
    }
    const int64_t nr = rows_in_group(N, g);
    decompress_group<T>(rows_of(vals, mk, N, K, g), nr, K, dst + rows * ld, ld);
    rows += nr, ++g;
  }
  return rows;
}

template <typename T>
void large_m(const torch::Tensor& x2, const torch::Tensor& values, const torch::Tensor& meta, torch::Tensor& y,
             int64_t panel_bytes) {
  const int64_t N = values.size(0), K = values.size(1) * 2, M = x2.size(0);
  const int64_t groups = row_groups(N);
  // Row groups per panel: the dense panel takes about `panel_bytes` (at least 4 groups).
  // (a multiple of 4: a block of lanes is decompressed whole)
  const int64_t per_panel = std::max<int64_t>(4, panel_bytes / (K * static_cast<int64_t>(sizeof(T)) * kNR)) / 4 * 4;
  const bool lanes = lanes_layout(values.scalar_type());
  const int64_t panels = (groups + per_panel - 1) / per_panel;
  const T* vals = values.data_ptr<T>();
  const uint8_t* mk = meta.data_ptr<uint8_t>();
  // One panel per task: each thread owns its scratch and runs a single-threaded GEMM on it (nested
  // parallel regions run inline), so a panel stays in the thread's own cache between decompression and use.
  // The tasks use tensor ops, so they run in the caller's thread-local state: torch's worker threads do not
  // inherit it, and under vLLM's torch.inference_mode a worker outside that mode may not write y in place.
  const at::ThreadLocalState caller;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard same_state(caller);
    torch::Tensor scratch = torch::empty({per_panel * kNR, K}, values.options());
    torch::Tensor part = torch::empty({M, per_panel * kNR}, y.options());
    for (int64_t p = begin; p < end; ++p) {
      const int64_t g0 = p * per_panel, g1 = std::min(groups, g0 + per_panel);
      const int64_t n0 = first_row(N, g0);
      const int64_t rows = decompress_panel<T>(vals, mk, N, K, g0, g1, scratch.data_ptr<T>(), K, lanes);
      auto out = part.narrow(1, 0, rows);
      at::mm_out(out, x2, scratch.narrow(0, 0, rows).t());
      y.narrow(1, n0, rows).copy_(out);
    }
  });
}

// ---------------------------------------------------------------- row lanes: a vector lane per row of W
// bf16 on CPUs with AVX512_BF16, at every token count below the oneDNN panels (AMX CPUs). A vector holds one
// group (4 columns) of 16 rows of W: lane r the kept pair of row r, so one `vdpbf16ps` computes 16 rows' dot
// products with a token's group of x, and y comes out as 16 consecutive fp32 outputs (no horizontal sum). x's
// group (8 bytes) is broadcast to every qword and `vpshufb` picks each row's two kept columns out of it, with a
// control made from the row's nibble by one `vpermd` table lookup. The pick runs beside the dot product
// (benchmarks/cpu_instructions.py, Zen 5: 0.38 ns per 32 kept values, against the dense loop's 0.55 and the dot
// product alone's 0.32), where the GEMV's `vpermt2w` gather costs as much as the dot product it saves (0.57).
// The weight is kept as lanes (`retile_`, transpose_to_lanes): a block of 16 rows is one contiguous run of
// groups, 64 bytes each, read as they are. The lanes used to be made per call from the GEMV's 4-row layout (a
// 16 x 16 transpose per word), which only paid from 10 tokens; kept as lanes, against that (vLLM's GEMM time
// over ours in two runs of benchmarks/gemm.py, 1 thread, the eight 1B/8B shapes): 1 token 1.78-2.12x ->
// 2.37-2.88x, 4 tokens 0.88-1.05x -> 1.59-2.13x, 8 tokens 0.97-1.08x -> 1.50-1.81x, 16 tokens 0.91-1.07x ->
// 1.26-1.46x (the figures at 32 and more tokens are in README.md).
// K chunk: 64 words (4096 columns). Against 16 words, interleaved in one run (1 thread, 1B/8B shapes at 16 and
// 32 tokens, lanes made per call): 2-9 % faster; against all of K, level.
constexpr int64_t kLaneWords = 64;
// Tokens per block of x. With 128 tokens, 64 lost 2-14 % at 128 and 512 tokens; 256 (with 32-word chunks) was
// 10 % ahead and 10 % behind on different shapes (1 thread, one run, lanes made per call).
constexpr int64_t kLaneTokens = 128;
constexpr int64_t kLaneXBytes = 512 << 10;  // a block of x up to this size is read whole per block of rows (L2)
constexpr int64_t kLaneKeepBytes = 4 << 20;  // x regrouped for up to this many bytes reuses a per-thread buffer

// vpshufb control for a position nibble (p0 | p1 << 2): the dword {2 p0, 2 p0 + 1, 2 p1, 2 p1 + 1}, which
// picks a group's two kept columns out of its 4 columns of x.
struct PickTable {
  alignas(64) uint32_t ctrl[16];
  PickTable() {
    for (uint32_t n = 0; n < 16; ++n) {
      const uint32_t p0 = n & 3, p1 = n >> 2;
      ctrl[n] = (2 * p0) | (2 * p0 + 1) << 8 | (2 * p1) << 16 | (2 * p1 + 1) << 24;
    }
  }
};
const PickTable kPick;

// Cache lines fetched into L2 one at a time while a step of the lanes computes (the next step's values).
struct LinePrefetch {
  const char* base = nullptr;
  int64_t lines = 0, line = 0;
  int64_t left() const { return lines - line; }
  void next() { _mm_prefetch(base + 64 * line++, _MM_HINT_T1); }
};

// Where a kernel call finds the pick controls of a block of lanes: made by lane_controls into ct (16 dwords a
// group: dword l the control of row l's nibble), or, with ct null, made from the metadata as it goes: mw the
// whole words' (128 bytes a word: 8 per row), mt the tail's (tail / 8 bytes per row, tail 0 .. 56 columns).
struct LaneMeta {
  const uint32_t* ct;
  const uint8_t* mw;
  int64_t words;
  const uint8_t* mt;
  int64_t tail;
};

// Word i's groups of lm (16; the tail's when i == lm.words) as nibbles: dword l of lo (hi) holds row l's
// nibbles of groups 0-7 (8-15). Returns the word's group count.
inline int64_t word_nibbles(const LaneMeta& lm, int64_t i, __m512i& lo, __m512i& hi) {
  __m512i a, b;  // the metadata of rows 0-7 and 8-15, a qword per row
  if (i < lm.words) {
    a = _mm512_loadu_si512(lm.mw + 128 * i), b = _mm512_loadu_si512(lm.mw + 128 * i + 64);
  } else {
    if (!lm.tail) return 0;
    alignas(64) uint64_t m[16];
    for (int l = 0; l < 16; ++l) m[l] = load_meta(lm.mt + l * (lm.tail / 8), lm.tail / 8);
    a = _mm512_load_si512(m), b = _mm512_load_si512(m + 8);
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  lo = _mm512_permutex2var_epi32(a, even, b);
  hi = _mm512_permutex2var_epi32(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
  return i < lm.words ? 16 : lm.tail / 4;
}
// Group g's controls (g < 16 of its word): vpermd reads 4 bits of each dword.
inline __m512i group_controls(__m512i lo, __m512i hi, int64_t g, __m512i table) {
  return _mm512_permutexvar_epi32(_mm512_srlv_epi32(g < 8 ? lo : hi, _mm512_set1_epi32(static_cast<int>(4 * (g % 8)))), table);
}

// The controls of lm's groups into ct, made once per block and K chunk for every token of the block of x, from
// kStoredControlsMinM tokens; below, the kernel makes them as it goes, which costs less than the stores and
// loads of a few tokens. 3072 x 2048 bf16, 1 thread, stored over made-as-it-goes time (two runs): 1 token 1.4-1.6x,
// 2 tokens 1.3-1.8x, 4 tokens 1.0-1.6x, 6 tokens 0.87-0.97x, 8 tokens 0.89x, 16 tokens 0.84-0.87x, and made
// in the kernel for each pass of 16, 128 tokens ran 1.5x slower.
constexpr int64_t kStoredControlsMinM = 6;
void lane_controls(const LaneMeta& lm, uint32_t* ct) {
  const __m512i table = _mm512_load_si512(kPick.ctrl);
  __m512i lo, hi;
  for (int64_t i = 0; i <= lm.words; ++i)
    for (int64_t g = 0, ng = word_nibbles(lm, i, lo, hi); g < ng; ++g, ct += 16)
      _mm512_storeu_si512(ct, group_controls(lo, hi, g, table));
}

// y[t][l] (+)= x[t] . W[l] for MT tokens (xq[g][t]: token t's 4 columns of group g) and the 16 rows of a block
// of lanes (wt: 16 dwords a group, from the range's first) over lm's groups; y (fp32) rows N apart, added to
// when `add`, or, when yb is given, y + bias (the block's 16 values, or none) rounded to bf16 into yb instead.
// Issues one of pf's lines per group.
template <int MT>
__attribute__((target("avx512bf16"))) void lane_kernel(const uint64_t* xq, const uint32_t* wt, const LaneMeta& lm,
                                                        float* y, uint16_t* yb, const float* bias, int64_t N,
                                                        bool add, LinePrefetch* pf) {
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = add ? _mm512_loadu_ps(y + t * N) : _mm512_setzero_ps();
  const __m512i table = _mm512_load_si512(kPick.ctrl);
  int64_t issue = pf ? pf->left() : 0, g0 = 0;
  for (int64_t i = 0; i <= lm.words; ++i) {
    __m512i lo, hi;
    const int64_t ng = lm.ct ? (i < lm.words ? 16 : lm.tail / 4) : word_nibbles(lm, i, lo, hi);
    for (int64_t g = 0; g < ng; ++g) {
      if (issue > 0) pf->next(), --issue;
      const __m512i c = lm.ct ? _mm512_loadu_si512(lm.ct + 16 * (g0 + g)) : group_controls(lo, hi, g, table);
      const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wt + 16 * (g0 + g)));
      const uint64_t* xg = xq + (g0 + g) * MT;
#pragma GCC unroll 16
      for (int t = 0; t < MT; ++t) {
        const __m512i xb = _mm512_shuffle_epi8(_mm512_set1_epi64(static_cast<long long>(xg[t])), c);
        acc[t] = _mm512_dpbf16_ps(acc[t], wv, reinterpret_cast<__m512bh>(xb));
      }
    }
    g0 += ng;
  }
  if (yb) {
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int t = 0; t < MT; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(yb + t * N), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[t], b)));
  } else {
    for (int t = 0; t < MT; ++t) _mm512_storeu_ps(y + t * N, acc[t]);
  }
}

template <int... I>
constexpr auto lane_kernels(std::integer_sequence<int, I...>) {
  return std::array<decltype(&lane_kernel<1>), sizeof...(I)>{&lane_kernel<I + 1>...};
}
constexpr auto kLaneKernels = lane_kernels(std::make_integer_sequence<int, 16>{});  // [MT - 1]

// K chunks of the lanes: kLaneWords words each, the tail with the last.
inline int64_t lane_kchunks(int64_t K) { return std::max<int64_t>(1, (K / kWord + kLaneWords - 1) / kLaneWords); }

// y[M, N] (fp32) = x Wᵀ for bf16 x and W, on the first N / 16 * 16 rows (threads take blocks of 16 rows); or,
// with yb (one K chunk only), x Wᵀ + bias (N values, or none) rounded to bf16 into yb [M, N]. Returns the row
// groups (rows_of) it covered; the caller runs the rest (at most 15 rows) on the GEMV.
int64_t row_lanes(const uint16_t* x, int64_t M, const uint16_t* values, const uint8_t* meta, int64_t N, int64_t K,
                  float* y, uint16_t* yb = nullptr, const float* bias = nullptr) {
  const int64_t blocks = N / 16, G = K / 4, words = K / kWord, tail = K % kWord;
  if (M == 0 || blocks == 0) return blocks * (16 / kNR);
  const int64_t kchunks = lane_kchunks(K);
  TORCH_CHECK(!yb || kchunks == 1, "row_lanes: bf16 output needs one K chunk");
  auto first_word = [&](int64_t k) { return k * kLaneWords; };
  auto end_word = [&](int64_t k) { return std::min(words, (k + 1) * kLaneWords); };
  // Groups of K chunk k: its words', and the tail's in the last one.
  auto chunk_groups = [&](int64_t k) { return (k + 1 == kchunks ? G : end_word(k) * 16) - first_word(k) * 16; };
  // x regrouped once per call: K chunk k's groups (from g0 = 16 first_word(k)) at xq + g0 * M, as passes of 16
  // tokens, each [groups][tokens of the pass] (a group's 4 columns per token), the order the kernel reads.
  // Up to kLaneKeepBytes it is kept between calls (a fresh allocation that size is an mmap whose page faults
  // cost more than the copy at a few tokens); a larger one (prefill) is the call's own, not zeroed.
  thread_local std::vector<uint64_t> kept;
  std::unique_ptr<uint64_t[]> own;
  uint64_t* xqp;
  if (M * G * 8 <= kLaneKeepBytes) {
    if (static_cast<int64_t>(kept.size()) < M * G) kept.resize(M * G);
    xqp = kept.data();
  } else {
    own.reset(new uint64_t[M * G]);
    xqp = own.get();
  }
  at::parallel_for(0, M, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t / 16 * 16, mt = std::min<int64_t>(16, M - m0);
      for (int64_t k = 0; k < kchunks; ++k) {
        const int64_t g0 = 16 * first_word(k), gk = chunk_groups(k);
        uint64_t* d = xqp + g0 * M + gk * m0 + (t - m0);
        const uint16_t* xr = x + t * K + 4 * g0;
        for (int64_t g = 0; g < gk; ++g) std::memcpy(d + g * mt, xr + 4 * g, 8);
      }
    }
  });
  // Block c's values from word i (a word is 256 dwords), its metadata from word i (128 bytes a word), and the
  // bytes of values and of metadata of K chunk k.
  auto block_values = [&](int64_t c, int64_t i) { return reinterpret_cast<const uint32_t*>(values + 16 * c * (K / 2)) + 256 * i; };
  auto block_meta = [&](int64_t c, int64_t i) { return meta + 16 * c * (K / 8) + 128 * i; };
  auto chunk_bytes = [&](int64_t k, int64_t per_word, int64_t per_tail) {
    return (end_word(k) - first_word(k)) * per_word + (k + 1 == kchunks ? per_tail : 0);
  };
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint32_t> controls;
    const int64_t most = 16 * std::max(chunk_groups(0), chunk_groups(kchunks - 1));
    if (static_cast<int64_t>(controls.size()) < most) controls.resize(most);
    uint32_t* ct = controls.data();
    const int64_t steps = (end - begin) * kchunks;
    for (int64_t b0 = 0; b0 < M; b0 += kLaneTokens) {
      const int64_t b1 = std::min(M, b0 + kLaneTokens);
      // Block by block (each read once, in order) while the block of x fits in L2; else K chunk by K chunk,
      // so that x's chunk stays in L2 while the rows go by.
      const bool rows_outer = (b1 - b0) * K * 2 <= kLaneXBytes;
      auto step = [&](int64_t s, int64_t& c, int64_t& k) {
        c = begin + (rows_outer ? s / kchunks : s % (end - begin));
        k = rows_outer ? s % kchunks : s / (end - begin);
      };
      for (int64_t s = 0; s < steps; ++s) {
        int64_t c, k, cn, kn;
        step(s, c, k);
        step(s + 1 < steps ? s + 1 : 0, cn, kn);
        // The next step's values, fetched a line per group while this one computes (its metadata at once).
        const char* nm = reinterpret_cast<const char*>(block_meta(cn, first_word(kn)));
        for (int64_t o = 0; o < chunk_bytes(kn, 128, 2 * tail); o += 64) _mm_prefetch(nm + o, _MM_HINT_T1);
        LinePrefetch pf{reinterpret_cast<const char*>(block_values(cn, first_word(kn))),
                        (chunk_bytes(kn, 1024, 16 * tail) + 63) / 64};
        const int64_t i0 = first_word(k), i1 = end_word(k);
        LaneMeta lm{nullptr, block_meta(c, i0), i1 - i0, block_meta(c, words), k + 1 == kchunks ? tail : 0};
        if (b1 - b0 >= kStoredControlsMinM) {
          lane_controls(lm, ct);
          lm.ct = ct;
        }
        for (int64_t m0 = b0; m0 < b1; m0 += 16) {
          const int64_t mt = std::min<int64_t>(16, M - m0);
          kLaneKernels[mt - 1](xqp + 16 * i0 * M + chunk_groups(k) * m0, block_values(c, i0), lm,
                               y + m0 * N + 16 * c, yb ? yb + m0 * N + 16 * c : nullptr,
                               bias ? bias + 16 * c : nullptr, N, k > 0, m0 == b0 ? &pf : nullptr);
        }
      }
    }
  });
  return blocks * (16 / kNR);
}

// ---------------------------------------------------------------- entry point
// bf16 on CPUs with AVX512_BF16: the row lanes (and the GEMV on the rows after their blocks of 16), from
// onednn_min_m the `at::mm` panels (AMX CPUs; kernels/cpu/__init__.py, PREFILL_PATHS). Other dtypes: the GEMV
// up to small_m_max tokens, the panels above.
torch::Tensor linear(torch::Tensor x2, torch::Tensor values, torch::Tensor meta, c10::optional<torch::Tensor> bias,
                     int64_t small_m_max, int64_t panel_bytes, int64_t onednn_min_m) {
  TORCH_CHECK(x2.dim() == 2 && values.dim() == 2 && meta.dim() == 2, "bawa_sparse_cpu.linear: 2-D tensors expected");
  TORCH_CHECK(x2.device().is_cpu() && values.device().is_cpu() && meta.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(meta.scalar_type() == torch::kUInt8, "meta must be uint8");
  const int64_t N = values.size(0), K = values.size(1) * 2, M = x2.size(0);
  TORCH_CHECK(K % 8 == 0 && meta.size(0) == N && meta.size(1) == K / 8,
              "bawa_sparse_cpu.linear: values [N, K/2] and meta [N, K/8] disagree");
  TORCH_CHECK(x2.size(1) == K, "bawa_sparse_cpu.linear: x has ", x2.size(1), " features, the weight ", K);
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "bawa_sparse_cpu.linear: values must be float32, bfloat16 or float16");
  x2 = x2.to(dtype).contiguous();
  values = values.contiguous();
  meta = meta.contiguous();
  const bool dp = lanes_layout(dtype);
  if (dp ? M >= onednn_min_m : M > small_m_max) {
    torch::Tensor y = torch::empty({M, N}, x2.options());
    if (dtype == torch::kFloat) large_m<float>(x2, values, meta, y, panel_bytes);
    else if (dtype == torch::kBFloat16) large_m<c10::BFloat16>(x2, values, meta, y, panel_bytes);
    else large_m<c10::Half>(x2, values, meta, y, panel_bytes);
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
  const uint8_t* mk = meta.data_ptr<uint8_t>();
  if (dp && N % 16 == 0 && lane_kchunks(K) == 1) {
    // The lanes write bf16 (and add the bias) themselves: an fp32 result and its conversion cost a pass over
    // [M, N] floats, and from 32 MiB (glibc's largest mmap threshold) a fresh mapping whose page faults are paid
    // on every call (a 512 x 16384 buffer filled and converted: 23 ms at 1 thread, 10 at 2, against 84 for
    // the dense GEMM of that shape at 2 threads).
    torch::Tensor y = torch::empty({M, N}, x2.options());
    torch::Tensor bf = bias.has_value() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
    row_lanes(reinterpret_cast<const uint16_t*>(x2.data_ptr<c10::BFloat16>()), M,
              reinterpret_cast<const uint16_t*>(values.data_ptr<c10::BFloat16>()), mk, N, K, nullptr,
              reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()), bf.defined() ? bf.data_ptr<float>() : nullptr);
    return y;
  }
  torch::Tensor acc = torch::empty({M, N}, x2.options().dtype(torch::kFloat));
  float* yp = acc.data_ptr<float>();
  if (dp) {
    const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<c10::BFloat16>());
    const auto* vp = reinterpret_cast<const uint16_t*>(values.data_ptr<c10::BFloat16>());
    // the lanes' blocks of 16 rows, then the GEMV on the rows after them
    const int64_t first_group = row_lanes(xp, M, vp, mk, N, K, yp);
    small_m<uint16_t, uint16_t>(xp, M, vp, mk, N, K, yp, dot_bf16<1>, dot_bf16<2>, dot_bf16<4>, first_group);
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

// ---------------------------------------------------------------- the op's CPU kernel
// The crossovers above, set at load from kernels/cpu/__init__.py (the one place they are measured and
// written; no defaults here to drift from them).
struct Dispatch {
  int64_t small_m_max, panel_bytes, onednn_min_m;
};
std::optional<Dispatch> g_dispatch;

void set_dispatch(int64_t small_m_max, int64_t panel_bytes, int64_t onednn_min_m) {
  g_dispatch = Dispatch{small_m_max, panel_bytes, onednn_min_m};
}

// The op's Python body (kernels/__init__.py, python_body), for backend codes this file does not run. Set once
// at load and never freed: a py::object destroyed after the interpreter has finalised would crash at exit.
py::object* g_python_body = nullptr;

void set_python_body(py::function body) {
  if (g_python_body == nullptr) g_python_body = new py::object(std::move(body));
}

// `bawa_sparse::linear` for CPU tensors, registered with the dispatcher when this library loads. Why in C++:
// the op's Python body cost about 7 us more a call under inference mode (dispatch into Python, the reshape,
// the backend lookup), several percent of a small projection at one token; here it is one C++ call.
// Codes as in kernels/__init__.py: 1 is this kernel; any other goes back to the Python body (Triton's
// interpreter runs its kernels on CPU tensors; the dense fallback is F.linear there, and a served dense CPU
// layer does not call this op at all: the plugin hands it to vLLM's own GEMM).
torch::Tensor op_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& meta,
                        const c10::optional<torch::Tensor>& bias, int64_t out_features, int64_t backend,
                        const c10::optional<torch::Tensor>& aux, int64_t aux_min_m) {
  if (backend != 1) {
    TORCH_CHECK(g_python_body != nullptr, "bawa_sparse::linear: backend ", backend, " has no CPU implementation");
    py::gil_scoped_acquire gil;
    return (*g_python_body)(x, values, meta, bias, out_features, backend, aux, aux_min_m).cast<torch::Tensor>();
  }
  TORCH_CHECK(x.dim() >= 1, "bawa_sparse::linear: x must have a feature dimension");
  TORCH_CHECK(g_dispatch.has_value(), "bawa_sparse::linear: the CPU kernel's crossovers are not set (load it "
              "with bawa_vllm.kernels.cpu.load)");
  const Dispatch d = *g_dispatch;
  const torch::Tensor y = linear(x.reshape({-1, x.size(-1)}), values, meta, bias, d.small_m_max, d.panel_bytes,
                                 d.onednn_min_m);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.view(shape);
}

// How many distinct threads of torch's pool ran the tasks of one at::parallel_for (a check that the kernel is
// built with OpenMP and shares torch's threads).
int64_t parallel_threads() {
  std::vector<int> used(at::get_num_threads(), 0);
  at::parallel_for(0, 4096, 1, [&](int64_t begin, int64_t end) {
    volatile double sink = 0;
    for (int64_t i = begin; i < end; ++i) sink = sink + static_cast<double>(i);  // a little work per task
    used[at::get_thread_num()] = 1;
  });
  int64_t n = 0;
  for (int u : used) n += u;
  return n;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("retile_", &retile_, "validate position nibbles and tile (values, meta) rows in place; [] or [row, group] of a bad nibble",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_python_body", &set_python_body, "the op's Python body, for the backend codes the C++ kernel does not run");
  m.def("set_dispatch", &set_dispatch, "the crossovers of the op's CPU kernel (kernels/cpu/__init__.py)",
        py::arg("small_m_max"), py::arg("panel_bytes"), py::arg("onednn_min_m"));
  m.def("parallel_threads", &parallel_threads, py::call_guard<py::gil_scoped_release>());
}

// The op itself is defined in Python (kernels/__init__.py, with its fake for torch.compile), before this
// library can load; this adds its kernel for CPU tensors, which the dispatcher prefers to the Python one.
TORCH_LIBRARY_IMPL(bawa_sparse, CPU, m) {
  m.impl("linear", &op_linear);
}
