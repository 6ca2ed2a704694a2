// Fused TT/TTM lookup kernels (CPU, OpenMP): the prefix-tree GEMM chain of tt_lookup.py.
//
// Level k of the prefix tree has P_k nodes; node p has a digit (which core block it multiplies)
// and a parent in level k-1 (ids sorted, so a parent's children are consecutive). A level-k node
// value is X_k[p] = X_{k-1}[parent[p]] (Dprev x r) @ block_k[digit[p]] (r x W), stored (Dprev*W).
// The cores are read where they lie, (r, n, W) (a TTM core (r, n, d, r') viewed so): block j is
// rows j*W .. j*W + W of each of the r slabs, no per-step copy; gradients come back in that layout.
// Backward walks the levels from the leaves up: each parent sums its children's input gradients
// (no atomics: children are a contiguous range), each core block sums the gradients of every node
// with its digit (nodes grouped by digit, one thread per block: no buffers to reduce). The matrices
// are tiny (r <= 64), so register-tiled loops with a contiguous, vectorizable inner dimension beat
// a BLAS call per node. `prefix_tree` builds the tree itself (radix sort, one pass).
#include <torch/extension.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// A store that bypasses the cache (no read for ownership of the line first) where the CPU has one
// and `p` is 64-byte aligned: output rows the lookup writes once and nobody reads back soon.
template <typename T, typename V>
inline bool stream_store(T* p, const V& v) {
#ifdef __AVX512F__
  if constexpr (sizeof(V) == 64) {
    if ((reinterpret_cast<std::uintptr_t>(p) & 63) == 0) {
      if constexpr (std::is_same<T, float>::value) _mm512_stream_ps(p, reinterpret_cast<const __m512&>(v));
      else _mm512_stream_pd(p, reinterpret_cast<const __m512d&>(v));
      return true;
    }
  }
#endif
  return false;
}

inline void stream_fence() {
#ifdef __AVX512F__
  _mm_sfence();
#endif
}

template <typename T, int C>
struct Vec {  // C contiguous values as one GCC vector (one or more registers); unaligned load/store
  typedef T type __attribute__((vector_size(sizeof(T) * C)));
  static inline type load(const T* p) {
    type v;
    __builtin_memcpy(&v, p, sizeof(type));
    return v;
  }
  static inline void store(T* p, const type& v) { __builtin_memcpy(p, &v, sizeof(type)); }
};

// The accumulators of an R x C tile as vector values at most one 512-bit register wide (arrays of
// scalars were spilled to the stack by GCC for one-row tiles: every FMA then waited on a
// store-to-load round trip), in S independent sets that `store` sums: a tile of few vectors
// alternates sets so that enough FMAs are in flight instead of each waiting on the last.
template <typename T, int R, int C, int S>
struct Tile {
  static constexpr int W = C < 64 / int(sizeof(T)) ? C : 64 / int(sizeof(T));  // values per vector
  static constexpr int NV = C / W;                                                 // vectors per row
  using V = Vec<T, W>;
  using vec = typename V::type;
  vec acc[S][R][NV];

  inline void zero() {
#pragma GCC unroll 4
    for (int q = 0; q < S; ++q)
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[q][i][v] = vec{};
  }
  inline void load(const T* out, int64_t ldo) {
    zero();
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][i][v] = V::load(out + i * ldo + v * W);
  }
  // set q, row i += scalar(i) * m[0 .. C)
  template <typename Scalar>
  __attribute__((always_inline)) inline void fma_with(int q, Scalar&& scalar, const T* m) {
    vec mv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) mv[v] = V::load(m + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const T sv = scalar(i);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[q][i][v] += sv * mv[v];
    }
  }
  // set q, row i += s[i * si] * m[0 .. C)
  inline void fma(int q, const T* s, int64_t si, const T* m) {
    fma_with(q, [&](int i) __attribute__((always_inline)) { return s[i * si]; }, m);
  }
  // set q, row i += s[i][k] * m[0 .. C): rows from anywhere (nodes that share a block)
  inline void fma_rows(int q, const T* const* s, int64_t k, const T* m) {
    fma_with(q, [&](int i) __attribute__((always_inline)) { return s[i][k]; }, m);
  }
  // row i, the sum of its sets, to row(i) (a pointer to its first column)
  template <bool Stream = false, typename Row>
  __attribute__((always_inline)) inline void store_with(Row&& row) const {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        vec x = acc[0][i][v];
#pragma GCC unroll 4
        for (int q = 1; q < S; ++q) x += acc[q][i][v];
        if (!Stream || !stream_store(row(i) + v * W, x)) V::store(row(i) + v * W, x);
      }
  }
  template <bool Stream = false>
  inline void store(T* out, int64_t ldo) const {
    store_with<Stream>([&](int i) __attribute__((always_inline)) { return out + i * ldo; });
  }
  inline void store_rows(T* const* out, int64_t c) const {
    store_with([&](int i) __attribute__((always_inline)) { return out[i] + c; });
  }
};

// Independent accumulator sets for an R x C tile: 8 vectors of 256 bits in flight feed two FMA units.
template <typename T, int R, int C, int Most>
constexpr int sets() {
  constexpr int w = C < 64 / int(sizeof(T)) ? C : 64 / int(sizeof(T));
  constexpr int units = R * (C / w) * ((w * int(sizeof(T)) + 31) / 32);
  return units >= 8 ? 1 : units >= 4 ? (Most < 2 ? Most : 2) : Most;
}

// out[i * ldo + c] (+)= sum_k s[i * si + k * sk] * M[k * ld + c] for i < rows, c < cols: every product
// of the lookup is one of these (A @ B, A^T @ G, G @ B^T). Tiles of R rows x C columns keep their
// accumulators in vector registers across the k loop, and each row of M loaded there serves all R
// rows of the tile (one load per R fused multiply-adds, not one per FMA).
template <typename T, int R, int C, bool Acc, bool Stream = false>
inline void tile(T* __restrict__ out, int64_t ldo, const T* __restrict__ s, int64_t si, int64_t sk,
                 const T* __restrict__ M, int64_t ld, int64_t K) {
  constexpr int S = sets<T, R, C, 4>();  // sets alternate over k
  Tile<T, R, C, S> t;
  if (Acc) t.load(out, ldo);
  else t.zero();
  int64_t k = 0;
  for (; k + S <= K; k += S)
#pragma GCC unroll 4
    for (int q = 0; q < S; ++q) t.fma(q, s + (k + q) * sk, si, M + (k + q) * ld);
  for (; k < K; ++k) t.fma(0, s + k * sk, si, M + k * ld);
  t.template store<Stream>(out, ldo);
}

// f(std::integral_constant<int, C>{}, c) for column chunks [c, c + C) that cover [0, cols): two
// 512-bit registers wide, one, a half, a quarter, then single columns (tiles are compiled per width).
// Forced inline with its callers' lambdas: left to GCC, the backward ran 5 % slower.
template <typename T, typename F>
__attribute__((always_inline)) inline void column_chunks(int64_t cols, F&& f) {
  constexpr int V = 64 / sizeof(T);
  int64_t c = 0;
  for (; c + 2 * V <= cols; c += 2 * V) f(std::integral_constant<int, 2 * V>{}, c);
  for (; c + V <= cols; c += V) f(std::integral_constant<int, V>{}, c);
  for (; c + V / 2 <= cols; c += V / 2) f(std::integral_constant<int, V / 2>{}, c);
  for (; c + V / 4 <= cols; c += V / 4) f(std::integral_constant<int, V / 4>{}, c);
  for (; c < cols; ++c) f(std::integral_constant<int, 1>{}, c);
}

template <typename T, int R, bool Acc, bool Stream>
inline void tile_row(T* out, int64_t ldo, const T* s, int64_t si, int64_t sk, const T* M, int64_t ld, int64_t K,
                     int64_t cols) {
  column_chunks<T>(cols, [&](auto width, int64_t c) __attribute__((always_inline)) {
    tile<T, R, decltype(width)::value, Acc, Stream>(out + c, ldo, s, si, sk, M + c, ld, K);
  });
}

// Stream: write `out` with streaming stores (see stream_store; the caller fences)
template <typename T, bool Acc, bool Stream = false>
inline void gemm(T* out, int64_t ldo, int64_t rows, int64_t cols, const T* s, int64_t si, int64_t sk, const T* M,
                 int64_t ld, int64_t K) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) tile_row<T, 4, Acc, Stream>(out + i * ldo, ldo, s + i * si, si, sk, M, ld, K, cols);
  for (; i < rows; ++i) tile_row<T, 1, Acc, Stream>(out + i * ldo, ldo, s + i * si, si, sk, M, ld, K, cols);
}

// out[i][0, cols) = s[i][0, K) @ M (K x cols, rows ld apart) for R rows given by pointers: R nodes that
// multiply the same block, each loaded row of which then serves R FMAs (one node at a time: one).
template <typename T, int R>
inline void gemm_rows(T* const* out, const T* const* s, const T* M, int64_t ld, int64_t K, int64_t cols) {
  column_chunks<T>(cols, [&](auto width, int64_t c) __attribute__((always_inline)) {
    constexpr int C = decltype(width)::value;
    constexpr int S = sets<T, R, C, 4>();
    Tile<T, R, C, S> t;
    t.zero();
    int64_t k = 0;
    for (; k + S <= K; k += S)
#pragma GCC unroll 4
      for (int q = 0; q < S; ++q) t.fma_rows(q, s, k + q, M + (k + q) * ld + c);
    for (; k < K; ++k) t.fma_rows(0, s, k, M + k * ld + c);
    t.store_rows(out, c);
  });
}

// f(group, std::integral_constant<int, R>) over `nodes` in groups of R = 4, then the rest one by
// one: the nodes of one gemm_rows call.
template <typename F>
__attribute__((always_inline)) inline void in_fours(const int64_t* nodes, int64_t count, F&& f) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) f(nodes + i, std::integral_constant<int, 4>{});
  for (; i < count; ++i) f(nodes + i, std::integral_constant<int, 1>{});
}

template <typename T>
inline void mm(const T* a, const T* b, int64_t ldb, T* out, int64_t D, int64_t r, int64_t W) {
  // out (D x W) = a (D x r) @ b (r x W, rows ldb apart)
  gemm<T, false>(out, W, D, W, a, r, 1, b, ldb, r);
}

template <typename T, bool Acc>
inline void grad_a(const T* gx, const T* bt, T* ga, int64_t D, int64_t r, int64_t W) {
  // ga (D x r) (+)= gx (D x W) @ bt (W x r), bt = b^T
  gemm<T, Acc>(ga, r, D, r, gx, W, 1, bt, r, W);
}

// Nodes grouped by digit (a counting sort): digit j's nodes are by_digit[first[j] .. first[j + 1]).
struct DigitGroups {
  std::vector<int64_t> first, by_digit;
  DigitGroups(const int64_t* dg, int64_t P, int64_t n) : first(n + 1, 0), by_digit(P) {
    for (int64_t p = 0; p < P; ++p) ++first[dg[p] + 1];
    for (int64_t j = 0; j < n; ++j) first[j + 1] += first[j];
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < P; ++p) by_digit[fill[dg[p]]++] = p;
  }
};

// start[q] .. start[q+1]: the children of parent q (parents sorted, every parent has a child)
std::vector<int64_t> child_ranges(const int64_t* parents, int64_t n, int64_t n_parents) {
  std::vector<int64_t> start(n_parents + 1, n);
  for (int64_t p = n - 1; p >= 0; --p) start[parents[p]] = p;
  start[n_parents] = n;
  return start;
}

// Buffers of the node values and gradients, kept for reuse instead of handed back to the system:
// glibc returns a freed multi-MB block to the kernel when the heap top grows past its trim
// threshold, and a 10^6 x 128 ttm step (5.7 + 4.2 + 5.7 MB of such blocks) then page-faulted
// ~750 times per step (about 2 ms of a 9 ms step in this VM). Free blocks are kept up to 1 GiB.
class BufferPool {
 public:
  void* get(size_t& bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {
        bytes = it->first, held_ -= it->first;
        void* p = it->second;
        free_.erase(it);
        return p;
      }
    }
    bytes = (bytes + 4095) / 4096 * 4096;
    void* p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p, "tt_lookup: out of memory");
    return p;
  }
  void put(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (held_ + bytes > (size_t(1) << 30)) {
      std::free(p);
      return;
    }
    free_.emplace(bytes, p), held_ += bytes;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t held_ = 0;
};

BufferPool& pool() {
  static auto* p = new BufferPool();  // never destroyed: tensors may outlive static destruction
  return *p;
}

// torch::empty from the pool: the block goes back to it when the tensor's storage is freed
torch::Tensor pooled_empty(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  int64_t numel = 1;
  for (auto n : sizes) numel *= n;
  size_t bytes = std::max<size_t>(1, size_t(numel) * options.dtype().itemsize());
  void* p = pool().get(bytes);
  return torch::from_blob(p, sizes, [bytes](void* q) { pool().put(q, bytes); }, options);
}

// Rows of one batch's lookups: distinct id u is looked up at positions order[bounds[u] .. bounds[u+1]).
struct Lookups {
  const int64_t* order = nullptr;
  const int64_t* bounds = nullptr;
  int64_t count = 0;
};

// dst[0, width) = the sum of g's rows of distinct id u's lookups (one lookup: a copy of its row)
template <typename T>
inline void sum_lookup_rows(T* dst, const T* g, const Lookups& lookups, int64_t u, int64_t width) {
  const int64_t lo = lookups.bounds[u], hi = lookups.bounds[u + 1];
  std::copy(g + lookups.order[lo] * width, g + (lookups.order[lo] + 1) * width, dst);
  for (int64_t j = lo + 1; j < hi; ++j) {
    const T* row = g + lookups.order[j] * width;
    for (int64_t c = 0; c < width; ++c) dst[c] += row[c];
  }
}

template <typename scalar_t>
void forward_level(const torch::Tensor& prev, const torch::Tensor& core, const torch::Tensor& digits,
                   const torch::Tensor& parents, torch::Tensor& out, int64_t D, int64_t r, int64_t W,
                   const Lookups& lookups) {
  const scalar_t* x = prev.data_ptr<scalar_t>();
  const scalar_t* b = core.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t* dg = digits.data_ptr<int64_t>();
  const int64_t* pa = parents.data_ptr<int64_t>();
  const int64_t P = digits.numel(), sx = prev.size(1), ldb = core.size(1) * W, so = D * W;
  const int threads = at::get_num_threads();  // torch.set_num_threads, whatever OpenMP runtime is loaded
  // each node's output row (at the leaf with lookups: its first lookup's row, no (distinct x D)
  // intermediate and no gather after it), and the copies to its other lookups
  auto out_row = [&](int64_t p) { return lookups.order ? o + lookups.order[lookups.bounds[p]] * so : o + p * so; };
  auto copy_to_lookups = [&](int64_t p) {
    if (!lookups.order) return;
    const scalar_t* row = out_row(p);
    for (int64_t j = lookups.bounds[p] + 1; j < lookups.bounds[p + 1]; ++j)
      std::copy(row, row + so, o + lookups.order[j] * so);
  };
  if (D == 1) {  // one-row products (a tt table's row cores): 4 nodes of one digit share each block row
    const DigitGroups groups(dg, P, core.size(1));
    const int64_t n = core.size(1);
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if (threads > 1)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t* nodes = groups.by_digit.data() + groups.first[j];
      in_fours(nodes, groups.first[j + 1] - groups.first[j], [&](const int64_t* group, auto size) {
        constexpr int R = decltype(size)::value;
        const scalar_t* a[R];
        scalar_t* out[R];
        for (int u = 0; u < R; ++u) a[u] = x + pa[group[u]] * sx, out[u] = out_row(group[u]);
        gemm_rows<scalar_t, R>(out, a, b + j * W, ldb, r, W);
        for (int u = 0; u < R; ++u) copy_to_lookups(group[u]);
      });
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < P; ++p) {  // D rows per node: the register tiles share block rows already
    mm(x + pa[p] * sx, b + dg[p] * W, ldb, out_row(p), D, r, W);
    copy_to_lookups(p);
  }
}

// Block gradient of one digit, transposed: gbt (W x r) = sum over its nodes p of G[p]^T (W x D) @ X[parent p] (D x r).
// Rows of gbt are columns of G (broadcast values), columns are a row of X (r values: one vector at
// rank 16), so a tile of R rows keeps R accumulator vectors in registers across all of the digit's
// nodes: one pass over them per R rows, where a per-node GEMM (K = D, as small as 1) would load and
// store its accumulators for every node.
template <typename T, int R, int C>
inline void tile_block_grad(T* __restrict__ gbt, int64_t ldo, const int64_t* nodes, int64_t n, const T* __restrict__ x,
                            const int64_t* pa, int64_t sx, const T* const* grow, int64_t goff, int64_t D, int64_t r,
                            int64_t W) {
  constexpr int S = sets<T, R, C, 2>();  // sets alternate over nodes
  Tile<T, R, C, S> t;
  t.zero();
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = nodes[j];
    const T* xa = x + pa[p] * sx;  // X[parent] (D x r): this tile's columns
    const T* gp = grow[p] + goff;  // G[p] (D x W): this tile's rows are its columns
    const int q = S == 1 ? 0 : int(j & 1);
    for (int64_t d = 0; d < D; ++d) t.fma(q, gp + d * W, 1, xa + d * r);
  }
  t.store(gbt, ldo);
}

template <typename T, int R>
inline void block_grad_rows(T* gbt, const int64_t* nodes, int64_t n, const T* x, const int64_t* pa, int64_t sx,
                            const T* const* grow, int64_t goff, int64_t D, int64_t r, int64_t W) {
  column_chunks<T>(r, [&](auto width, int64_t c) __attribute__((always_inline)) {
    tile_block_grad<T, R, decltype(width)::value>(gbt + c, r, nodes, n, x + c, pa, sx, grow, goff, D, r, W);
  });
}

// gb (r x W, rows ldg apart) of one digit from its nodes (see tile_block_grad)
template <typename T>
void block_grad(T* gb, int64_t ldg, const int64_t* nodes, int64_t n, const T* x, const int64_t* pa, int64_t sx,
                const T* const* grow, int64_t D, int64_t r, int64_t W, std::vector<T>& gbt) {
  gbt.resize(W * r);
  int64_t i = 0;
  for (; i + 8 <= W; i += 8) block_grad_rows<T, 8>(gbt.data() + i * r, nodes, n, x, pa, sx, grow, i, D, r, W);
  for (; i + 4 <= W; i += 4) block_grad_rows<T, 4>(gbt.data() + i * r, nodes, n, x, pa, sx, grow, i, D, r, W);
  for (; i < W; ++i) block_grad_rows<T, 1>(gbt.data() + i * r, nodes, n, x, pa, sx, grow, i, D, r, W);
  for (int64_t a = 0; a < r; ++a)
    for (int64_t w = 0; w < W; ++w) gb[a * ldg + w] = gbt[w * r + a];
}

// The touched blocks of a core (r, n, W) transposed into out (n, W, r): the right operand of the
// parents' gradients (G (D x W) @ block^T), rows contiguous for the register tiles. Tiles stay in
// L1; a small batch touches few digits (torch's strided copy of a whole 100 x 16 x 16 core: ~20 us).
template <typename T>
void transpose_blocks(const T* core, T* out, int64_t r, int64_t n, int64_t W, const int64_t* digits, int64_t count) {
  constexpr int64_t tile = 16;
  for (int64_t t = 0; t < count; ++t)
    for (int64_t j = digits[t], c0 = 0; c0 < r; c0 += tile)
      for (int64_t w0 = 0; w0 < W; w0 += tile) {
        const int64_t c1 = std::min(r, c0 + tile), w1 = std::min(W, w0 + tile);
        for (int64_t w = w0; w < w1; ++w)
          for (int64_t c = c0; c < c1; ++c) out[(j * W + w) * r + c] = core[(c * n + j) * W + w];
      }
}

// Each node's output-gradient row: g's own rows, or at the leaf level with lookups the rows of the
// node's lookups in grad_out (one id looked up once: that row itself; several times: their sum).
template <typename T>
std::vector<const T*> gradient_rows(const T* g, int64_t P, int64_t width, const Lookups& lookups, std::vector<T>& sums) {
  std::vector<const T*> rows(P);
  if (!lookups.order) {
    for (int64_t p = 0; p < P; ++p) rows[p] = g + p * width;
    return rows;
  }
  int64_t repeated = 0;
  for (int64_t p = 0; p < P; ++p) repeated += lookups.bounds[p + 1] - lookups.bounds[p] > 1;
  sums.resize(repeated * width);
  T* sum = sums.data();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t lo = lookups.bounds[p];
    if (lookups.bounds[p + 1] - lo == 1) {
      rows[p] = g + lookups.order[lo] * width;
      continue;
    }
    sum_lookup_rows(sum, g, lookups, p, width);
    rows[p] = sum;
    sum += width;
  }
  return rows;
}

// Fills gprev and returns the touched digits (sorted) with their block gradients in the core's
// layout, (r, T, W): row a of touched digit t's block at (a * T + t) * W.
template <typename scalar_t>
std::pair<torch::Tensor, torch::Tensor> backward_level(const torch::Tensor& prev, const torch::Tensor& core,
                                                       const torch::Tensor& digits, const torch::Tensor& parents,
                                                       const scalar_t* const* grow, torch::Tensor& gprev, int64_t D,
                                                       int64_t r, int64_t W) {
  const scalar_t* x = prev.data_ptr<scalar_t>();
  const int64_t P = digits.numel(), Pp = prev.size(0), n = core.size(1), sx = prev.size(1), sb = r * W;
  scalar_t* ga = gprev.data_ptr<scalar_t>();
  const int64_t* dg = digits.data_ptr<int64_t>();
  const int64_t* pa = parents.data_ptr<int64_t>();
  const auto start = child_ranges(pa, P, Pp);
  // nodes grouped by digit: each block's gradient is then one thread's, no buffers
  const DigitGroups groups(dg, P, n);
  const auto& first = groups.first;
  const auto& by_digit = groups.by_digit;
  int64_t T = 0;
  for (int64_t j = 0; j < n; ++j) T += first[j + 1] > first[j];
  auto touched = torch::empty({T}, digits.options());
  int64_t* tj = touched.data_ptr<int64_t>();
  for (int64_t j = 0, t = 0; j < n; ++j)
    if (first[j + 1] > first[j]) tj[t++] = j;
  const auto block_t = pooled_empty({n, W, r}, core.options());  // the touched digits' rows only
  transpose_blocks(core.data_ptr<scalar_t>(), block_t.data_ptr<scalar_t>(), r, n, W, tj, T);
  const scalar_t* b = block_t.data_ptr<scalar_t>();
  auto gblock = torch::empty({r, T, W}, core.options());
  scalar_t* gb = gblock.data_ptr<scalar_t>();
  const int threads = at::get_num_threads();
  // one-row nodes (a tt table's row cores): each node's input gradient G[p] @ block^T computed by
  // digit, 4 nodes sharing each row of the block, into gnode; the parents then sum their children's
  const bool by_digit_rows = D == 1;
  const auto gnode = by_digit_rows ? pooled_empty({P, r}, core.options()) : torch::Tensor();
  scalar_t* gn = by_digit_rows ? gnode.data_ptr<scalar_t>() : nullptr;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<scalar_t> gbt;  // one digit's transposed block gradient
    if (!by_digit_rows) {
#pragma omp for schedule(static) nowait
      for (int64_t q = 0; q < Pp; ++q) {  // parents' gradients: the first child writes, the others add
        if (start[q] == start[q + 1]) std::fill(ga + q * sx, ga + (q + 1) * sx, scalar_t(0));  // no child
        for (int64_t p = start[q]; p < start[q + 1]; ++p) {
          if (p == start[q]) grad_a<scalar_t, false>(grow[p], b + dg[p] * sb, ga + q * sx, D, r, W);
          else grad_a<scalar_t, true>(grow[p], b + dg[p] * sb, ga + q * sx, D, r, W);
        }
      }
    }
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t j = tj[t], *nodes = by_digit.data() + first[j], count = first[j + 1] - first[j];
      block_grad(gb + t * W, T * W, nodes, count, x, pa, sx, grow, D, r, W, gbt);
      if (!by_digit_rows) continue;
      in_fours(nodes, count, [&](const int64_t* group, auto size) {
        constexpr int R = decltype(size)::value;
        const scalar_t* g[R];
        scalar_t* out[R];
        for (int u = 0; u < R; ++u) g[u] = grow[group[u]], out[u] = gn + group[u] * r;
        gemm_rows<scalar_t, R>(out, g, b + j * sb, r, W, r);
      });
    }
    if (by_digit_rows) {  // (the loop above ended with a barrier)
#pragma omp for schedule(static)
      for (int64_t q = 0; q < Pp; ++q) {
        scalar_t* dst = ga + q * sx;
        if (start[q] == start[q + 1]) std::fill(dst, dst + r, scalar_t(0));  // no child
        else std::copy(gn + start[q] * r, gn + (start[q] + 1) * r, dst);
        for (int64_t p = start[q] + 1; p < start[q + 1]; ++p)
          for (int64_t c = 0; c < r; ++c) dst[c] += gn[p * r + c];
      }
    }
  }
  return {touched, gblock};
}

void check(const std::vector<torch::Tensor>& cores, const std::vector<torch::Tensor>& digits,
           const std::vector<torch::Tensor>& parents) {
  TORCH_CHECK(!cores.empty() && cores.size() == digits.size() && cores.size() == parents.size(),
              "tt_lookup: one core, digit and parent tensor per level");
  for (size_t k = 0; k < cores.size(); ++k) {
    TORCH_CHECK(cores[k].dim() == 3 && cores[k].is_contiguous() && !cores[k].is_cuda(), "tt_lookup: cores (r, n, W) contiguous CPU");
    TORCH_CHECK(digits[k].scalar_type() == torch::kLong && digits[k].is_contiguous(), "tt_lookup: int64 digits");
    TORCH_CHECK(k == 0 || (parents[k].scalar_type() == torch::kLong && parents[k].numel() == digits[k].numel()),
                "tt_lookup: int64 parents per node");
  }
}

Lookups lookups_of(const c10::optional<torch::Tensor>& order, const c10::optional<torch::Tensor>& bounds) {
  Lookups l;
  if (order.has_value()) {
    TORCH_CHECK(bounds.has_value() && order->scalar_type() == torch::kLong && bounds->scalar_type() == torch::kLong &&
                order->is_contiguous() && bounds->is_contiguous(), "tt_lookup: int64 order and bounds together");
    l.order = order->data_ptr<int64_t>(), l.bounds = bounds->data_ptr<int64_t>(), l.count = order->numel();
  }
  return l;
}

}  // namespace

// Node values of every level: X_k (P_k, Dprev_k * W_k); the last one is the lookup's output, one row
// per distinct id, or with `order`/`bounds` (prefix_tree's) one row per lookup in the batch's order.
std::vector<torch::Tensor> forward(std::vector<torch::Tensor> cores, std::vector<torch::Tensor> digits,
                                   std::vector<torch::Tensor> parents, c10::optional<torch::Tensor> order,
                                   c10::optional<torch::Tensor> bounds) {
  check(cores, digits, parents);
  const Lookups lookups = lookups_of(order, bounds), none;
  const size_t L = cores.size();
  TORCH_CHECK(L >= 2 || !lookups.order, "tt_lookup: rows per lookup need two or more levels");
  std::vector<torch::Tensor> xs;
  xs.push_back(cores[0].index_select(1, digits[0]).transpose(0, 1).reshape({digits[0].numel(), -1}));
  for (size_t k = 1; k < L; ++k) {
    const auto& prev = xs.back();
    const bool leaf = k == L - 1 && lookups.order;
    const int64_t P = digits[k].numel(), r = cores[k].size(0), W = cores[k].size(2);
    const int64_t D = prev.size(1) / r;
    auto out = pooled_empty({leaf ? lookups.count : P, D * W}, cores[k].options());
    AT_DISPATCH_FLOATING_TYPES(cores[k].scalar_type(), "tt_forward", [&] {
      forward_level<scalar_t>(prev, cores[k], digits[k], parents[k], out, D, r, W, leaf ? lookups : none);
    });
    xs.push_back(out);
  }
  return xs;
}

// Per level the digits the batch touched (sorted) and their block gradients (r_{k-1}, T_k, W_k), given
// the output gradient and forward's node values: [grads of levels 0..L-1, touched of levels 0..L-1].
// Untouched blocks get no gradient: a table optimizer updates the touched slices only, and a dense
// gradient is these scattered into zeros.
std::vector<torch::Tensor> backward(torch::Tensor grad_out, std::vector<torch::Tensor> xs,
                                    std::vector<torch::Tensor> cores, std::vector<torch::Tensor> digits,
                                    std::vector<torch::Tensor> parents, c10::optional<torch::Tensor> order,
                                    c10::optional<torch::Tensor> bounds) {
  check(cores, digits, parents);
  const Lookups lookups = lookups_of(order, bounds), none;
  const size_t L = cores.size();
  std::vector<torch::Tensor> grads(L), touched(L);
  auto g = grad_out.contiguous();
  for (size_t k = L - 1; k >= 1; --k) {
    const auto& prev = xs[k - 1];
    const int64_t P = digits[k].numel(), r = cores[k].size(0), W = cores[k].size(2);
    const int64_t D = prev.size(1) / r;
    auto gprev = pooled_empty(prev.sizes(), prev.options());  // written by each parent's first child (backward_level)
    AT_DISPATCH_FLOATING_TYPES(cores[k].scalar_type(), "tt_backward", [&] {
      std::vector<scalar_t> sums;
      const auto rows = gradient_rows<scalar_t>(g.data_ptr<scalar_t>(), P, D * W, k == L - 1 ? lookups : none, sums);
      std::tie(touched[k], grads[k]) =
          backward_level<scalar_t>(prev, cores[k], digits[k], parents[k], rows.data(), gprev, D, r, W);
    });
    g = gprev;
  }
  touched[0] = digits[0];  // level 0's nodes are its distinct digits, sorted: their gradients as they are
  grads[0] = g.reshape({digits[0].numel(), cores[0].size(0), -1}).transpose(0, 1).contiguous();  // (r, T, W)
  grads.insert(grads.end(), touched.begin(), touched.end());
  return grads;
}

// A tt table's tail: rows (U x r) @ tail (r x D), the column cores' product applied to every
// distinct row (or bag). With lookups (`order`, `bounds`, as the lookup's leaf level takes them) the
// rows are the batch's distinct ids and each product row goes to every lookup of its id, so a
// repeated id is multiplied once (Zipf batches: 3,317 distinct of 8,192) and its lookups' output
// gradients are summed before the backward's products. Blocks of rows stay in L1 (16 KB).
namespace {

template <typename T>
int64_t tail_block(int64_t D) {
  return std::max<int64_t>(4, (int64_t(16) << 10) / (D * int64_t(sizeof(T))));
}

// out rows (one per row, or per lookup) = rows @ tail: register tiles write each product row once,
// where MKL's sgemm first scales its whole output by beta = 0, a second pass over the 4 MB output
// (equal on a hot buffer; in a training step, where it comes cold: tt step 3.3-3.7 -> 2.9-3.0 ms).
template <typename T>
void tail_forward_rows(const T* x, const T* t, T* out, int64_t U, int64_t r, int64_t D, const Lookups& lookups) {
  const int64_t block = tail_block<T>(D), blocks = (U + block - 1) / block;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<T> buf(lookups.order ? block * D : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t b = i * block, m = std::min(block, U - b);
      if (!lookups.order) {
        gemm<T, false, true>(out + b * D, D, m, D, x + b * r, r, 1, t, D, r);
        continue;
      }
      gemm<T, false>(buf.data(), D, m, D, x + b * r, r, 1, t, D, r);
      for (int64_t u = 0; u < m; ++u)
        for (int64_t j = lookups.bounds[b + u]; j < lookups.bounds[b + u + 1]; ++j)
          std::copy(buf.data() + u * D, buf.data() + (u + 1) * D, out + lookups.order[j] * D);
    }
    stream_fence();
  }
}

// grad_rows = G @ tail^T and grad_tail = rows^T @ G in one pass over the output gradient G, where
// two BLAS calls read all of it twice (0.88 -> 0.75 ms at 8,192 x 16 x 128). With lookups, G's
// rows of one id are summed into the block first. Threads sum grad_tail each on their own.
template <typename T>
void tail_backward_rows(const T* gp, const T* xp, const T* tp, T* gr, T* gt, int64_t U, int64_t D, int64_t r,
                        const Lookups& lookups) {
  const int64_t block = tail_block<T>(D), blocks = (U + block - 1) / block;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
  std::vector<T> partial(size_t(threads - 1) * r * D, T(0));  // threads 1, 2, ...: their own sums
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<T> buf(lookups.order ? block * D : 0);
#ifdef _OPENMP
    const int thread = omp_get_thread_num();
#else
    const int thread = 0;
#endif
    T* sum = thread == 0 ? gt : partial.data() + (thread - 1) * r * D;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t b = i * block, m = std::min(block, U - b);
      const T* g = gp + b * D;
      if (lookups.order) {  // each id's gradient: its lookups' rows summed
        for (int64_t u = 0; u < m; ++u) sum_lookup_rows(buf.data() + u * D, gp, lookups, b + u, D);
        g = buf.data();
      }
      gemm<T, false>(gr + b * r, r, m, r, g, D, 1, tp, r, D);  // grad_rows[b..] = G[b..] @ tail^T
      gemm<T, true>(sum, D, r, D, xp + b * r, 1, r, g, D, m);  // grad_tail += rows[b..]^T @ G[b..]
    }
  }
  for (size_t k = 0; k < partial.size(); ++k) gt[k % (r * D)] += partial[k];
}

}  // namespace

torch::Tensor tail_forward(torch::Tensor rows, torch::Tensor tail, c10::optional<torch::Tensor> order,
                           c10::optional<torch::Tensor> bounds) {
  TORCH_CHECK(!rows.is_cuda() && rows.dim() == 2 && tail.dim() == 2 && rows.size(1) == tail.size(0) &&
              rows.scalar_type() == tail.scalar_type(), "tt_lookup: tail_forward(rows (U x r), tail (r x D)) on CPU, one dtype");
  const Lookups lookups = lookups_of(order, bounds);
  const auto x = rows.contiguous(), t = tail.contiguous();
  const int64_t U = x.size(0), r = x.size(1), D = t.size(1);
  TORCH_CHECK(!lookups.order || bounds->numel() == U + 1, "tt_lookup: bounds (U + 1) for U rows");
  auto out = torch::empty({lookups.order ? lookups.count : U, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tt_tail_forward", [&] {
    tail_forward_rows<scalar_t>(x.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), U, r, D, lookups);
  });
  return out;
}

std::vector<torch::Tensor> tail_backward(torch::Tensor grad, torch::Tensor rows, torch::Tensor tail,
                                         c10::optional<torch::Tensor> order, c10::optional<torch::Tensor> bounds) {
  const Lookups lookups = lookups_of(order, bounds);
  TORCH_CHECK(!grad.is_cuda() && grad.dim() == 2 && rows.dim() == 2 && tail.dim() == 2 &&
              grad.size(0) == (lookups.order ? lookups.count : rows.size(0)) && rows.size(1) == tail.size(0) &&
              grad.size(1) == tail.size(1) && grad.scalar_type() == rows.scalar_type() &&
              rows.scalar_type() == tail.scalar_type(),
              "tt_lookup: tail_backward(grad (B x D), rows (U x r), tail (r x D)) on CPU, one dtype");
  TORCH_CHECK(!lookups.order || bounds->numel() == rows.size(0) + 1, "tt_lookup: bounds (U + 1) for U rows");
  const auto g = grad.contiguous(), x = rows.contiguous(), tail_t = tail.t().contiguous();  // (D x r)
  const int64_t U = x.size(0), D = g.size(1), r = x.size(1);
  auto grad_rows = torch::empty({U, r}, g.options());
  auto grad_tail = torch::zeros({r, D}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "tt_tail_backward", [&] {
    tail_backward_rows<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), tail_t.data_ptr<scalar_t>(),
                                 grad_rows.data_ptr<scalar_t>(), grad_tail.data_ptr<scalar_t>(), U, D, r, lookups);
  });
  return {grad_rows, grad_tail};
}

// Sorted (key, position) pairs: LSD radix sort in 11-bit passes (keys are table rows, < 2^40 or so:
// two passes at 10^6 rows, three at 10^7), std::sort for small batches. torch.unique sorts with a
// comparison sort and then needs several passes for the inverse and the tree: 3-4x this.
static void sort_pairs(std::vector<int64_t>& key, std::vector<int64_t>& pos, int64_t max_key) {
  const int64_t n = int64_t(key.size());
  if (n < 512) {
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
    std::vector<int64_t> k2(n), p2(n);
    for (int64_t i = 0; i < n; ++i) k2[i] = key[order[i]], p2[i] = pos[order[i]];
    key.swap(k2), pos.swap(p2);
    return;
  }
  constexpr int bits = 11;
  constexpr int64_t buckets = int64_t(1) << bits;
  std::vector<int64_t> k2(n), p2(n), count(buckets);
  for (int shift = 0; shift == 0 || (max_key >> shift) > 0; shift += bits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(key[i] >> shift) & (buckets - 1)];
    int64_t sum = 0;
    for (int64_t b = 0; b < buckets; ++b) sum += count[b], count[b] = sum - count[b];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = count[(key[i] >> shift) & (buckets - 1)]++;
      k2[at] = key[i], p2[at] = pos[i];
    }
    key.swap(k2), pos.swap(p2);
  }
}

// The batch's distinct ids (sorted), each lookup's index among them, the lookups grouped by id
// (order, bounds: see Lookups), and the prefix tree over the ids' row digits (per level: digit and
// parent of each node): what torch.unique(return_inverse) and tt_lookup.PrefixTree.of compute, in
// one pass after a radix sort.
std::vector<torch::Tensor> prefix_tree(torch::Tensor ids, std::vector<int64_t> row_shape) {
  TORCH_CHECK(!ids.is_cuda() && ids.dim() == 1, "tt_lookup: 1-D CPU ids");
  TORCH_CHECK(!row_shape.empty(), "tt_lookup: row shape");
  const auto flat = ids.to(torch::kLong).contiguous();
  const int64_t n = flat.numel(), L = int64_t(row_shape.size());
  const int64_t* id = flat.data_ptr<int64_t>();
  std::vector<int64_t> key(id, id + n), pos(n);
  int64_t max_key = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(id[i] >= 0, "tt_lookup: negative id");
    pos[i] = i, max_key = std::max(max_key, id[i]);
  }
  sort_pairs(key, pos, max_key);
  std::vector<int64_t> stride(L, 1);
  for (int64_t k = L - 2; k >= 0; --k) stride[k] = stride[k + 1] * row_shape[k + 1];
  auto inverse = torch::empty({n}, torch::kLong);
  int64_t* inv = inverse.data_ptr<int64_t>();
  std::vector<int64_t> unique;
  std::vector<std::vector<int64_t>> digits(L), parents(L);
  std::vector<int64_t> last(L, -1), bounds;
  for (int64_t i = 0; i < n; ++i) {
    if (unique.empty() || key[i] != unique.back()) {
      bounds.push_back(i);
      unique.push_back(key[i]);
      int64_t k = 0;
      while (k < L && key[i] / stride[k] == last[k]) ++k;  // shared prefix with the previous id
      for (; k < L; ++k) {  // a new node on every deeper level
        last[k] = key[i] / stride[k];
        digits[k].push_back(last[k] % row_shape[k]);
        if (k) parents[k].push_back(int64_t(digits[k - 1].size()) - 1);
      }
    }
    inv[pos[i]] = int64_t(unique.size()) - 1;
  }
  auto tensor = [](const std::vector<int64_t>& v) {
    auto t = torch::empty({int64_t(v.size())}, torch::kLong);
    std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
    return t;
  };
  bounds.push_back(n);
  std::vector<torch::Tensor> out{tensor(unique), inverse, tensor(pos), tensor(bounds)};
  for (int64_t k = 0; k < L; ++k) out.push_back(tensor(digits[k]));
  for (int64_t k = 0; k < L; ++k) out.push_back(tensor(parents[k]));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused TT lookup forward: node values per prefix-tree level",
        py::arg("cores"), py::arg("digits"), py::arg("parents"), py::arg("order") = py::none(), py::arg("bounds") = py::none());
  m.def("backward", &backward, "fused TT lookup backward: per-block gradients", py::arg("grad_out"), py::arg("xs"),
        py::arg("cores"), py::arg("digits"), py::arg("parents"), py::arg("order") = py::none(), py::arg("bounds") = py::none());
  m.def("tail_forward", &tail_forward, "rows @ tail, each product row written once (or to each of its lookups)",
        py::arg("rows"), py::arg("tail"), py::arg("order") = py::none(), py::arg("bounds") = py::none());
  m.def("tail_backward", &tail_backward, "gradients of rows @ tail: (G @ tail^T, rows^T @ G) in one pass",
        py::arg("grad"), py::arg("rows"), py::arg("tail"), py::arg("order") = py::none(), py::arg("bounds") = py::none());
  m.def("prefix_tree", &prefix_tree, "distinct ids, inverse, and the prefix tree of their row digits");
}
