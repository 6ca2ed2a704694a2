// Fused TT/TTM lookup kernels (CPU, OpenMP): the prefix-tree GEMM chain of tt_lookup.py.
//
// Level k of the prefix tree has P_k nodes; node p has a digit (which core block it multiplies)
// and a parent in level k-1 (ids sorted, so a parent's children are consecutive). A level-k node
// value is X_k[p] = X_{k-1}[parent[p]] (Dprev x r) @ block_k[digit[p]] (r x W), stored (Dprev*W).
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
#include <vector>

namespace {

// out[i * ldo + c] (+)= sum_k s[i * si + k * sk] * M[k * ld + c] for i < rows, c < cols: every product
// of the lookup is one of these (A @ B, A^T @ G, G @ B^T). Tiles of R rows x C columns keep their
// accumulators in vector registers across the k loop, and each row of M loaded there serves all R
// rows of the tile (one load per R fused multiply-adds, not one per FMA).
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

template <typename T, int R, int C, bool Acc>
inline void tile(T* __restrict__ out, int64_t ldo, const T* __restrict__ s, int64_t si, int64_t sk,
                 const T* __restrict__ M, int64_t ld, int64_t K) {
  // Accumulators are vector values, at most one 512-bit register wide (arrays of scalars were
  // spilled to the stack by GCC for one-row tiles: every FMA then waited on a store-to-load round
  // trip). S independent sets over k (k mod S), summed at the end, keep enough FMAs in flight
  // when the tile has few vectors.
  constexpr int W = C < 64 / int(sizeof(T)) ? C : 64 / int(sizeof(T));  // values per vector
  constexpr int NV = C / W;  // vectors per row
  using V = Vec<T, W>;
  using vec = typename V::type;
  constexpr int units = R * NV * ((W * int(sizeof(T)) + 31) / 32);  // 256-bit vectors per set
  constexpr int S = units >= 8 ? 1 : units >= 4 ? 2 : 4;
  vec acc[S][R][NV];
#pragma GCC unroll 4
  for (int q = 0; q < S; ++q)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[q][i][v] = (Acc && q == 0) ? V::load(out + i * ldo + v * W) : vec{};
  int64_t k = 0;
  for (; k + S <= K; k += S) {
#pragma GCC unroll 4
    for (int q = 0; q < S; ++q) {
      vec m[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) m[v] = V::load(M + (k + q) * ld + v * W);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const T sv = s[i * si + (k + q) * sk];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[q][i][v] += sv * m[v];
      }
    }
  }
  for (; k < K; ++k) {
    vec m[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) m[v] = V::load(M + k * ld + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const T sv = s[i * si + k * sk];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][i][v] += sv * m[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      vec x = acc[0][i][v];
#pragma GCC unroll 4
      for (int q = 1; q < S; ++q) x += acc[q][i][v];
      V::store(out + i * ldo + v * W, x);
    }
}

template <typename T, int R, bool Acc>
inline void tile_row(T* out, int64_t ldo, const T* s, int64_t si, int64_t sk, const T* M, int64_t ld, int64_t K,
                     int64_t cols) {
  constexpr int V = 64 / sizeof(T);  // one 512-bit register
  int64_t c = 0;
  for (; c + 2 * V <= cols; c += 2 * V) tile<T, R, 2 * V, Acc>(out + c, ldo, s, si, sk, M + c, ld, K);
  for (; c + V <= cols; c += V) tile<T, R, V, Acc>(out + c, ldo, s, si, sk, M + c, ld, K);
  for (; c + V / 2 <= cols; c += V / 2) tile<T, R, V / 2, Acc>(out + c, ldo, s, si, sk, M + c, ld, K);
  for (; c + V / 4 <= cols; c += V / 4) tile<T, R, V / 4, Acc>(out + c, ldo, s, si, sk, M + c, ld, K);
  for (; c < cols; ++c) tile<T, R, 1, Acc>(out + c, ldo, s, si, sk, M + c, ld, K);
}

template <typename T, bool Acc>
inline void gemm(T* out, int64_t ldo, int64_t rows, int64_t cols, const T* s, int64_t si, int64_t sk, const T* M,
                 int64_t ld, int64_t K) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) tile_row<T, 4, Acc>(out + i * ldo, ldo, s + i * si, si, sk, M, ld, K, cols);
  for (; i < rows; ++i) tile_row<T, 1, Acc>(out + i * ldo, ldo, s + i * si, si, sk, M, ld, K, cols);
}

template <typename T>
inline void mm(const T* a, const T* b, T* out, int64_t D, int64_t r, int64_t W) {
  // out (D x W) = a (D x r) @ b (r x W)
  gemm<T, false>(out, W, D, W, a, r, 1, b, W, r);
}

template <typename T, bool Acc>
inline void grad_a(const T* gx, const T* bt, T* ga, int64_t D, int64_t r, int64_t W) {
  // ga (D x r) (+)= gx (D x W) @ bt (W x r), bt = b^T
  gemm<T, Acc>(ga, r, D, r, gx, W, 1, bt, r, W);
}

// start[q] .. start[q+1]: the children of parent q (parents sorted, every parent has a child)
std::vector<int64_t> child_ranges(const int64_t* parents, int64_t n, int64_t n_parents) {
  std::vector<int64_t> start(n_parents + 1, n);
  for (int64_t p = n - 1; p >= 0; --p) start[parents[p]] = p;
  start[n_parents] = n;
  return start;
}

template <typename scalar_t>
void forward_level(const torch::Tensor& prev, const torch::Tensor& block, const torch::Tensor& digits,
                   const torch::Tensor& parents, torch::Tensor& out, int64_t D, int64_t r, int64_t W) {
  const scalar_t* x = prev.data_ptr<scalar_t>();
  const scalar_t* b = block.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t* dg = digits.data_ptr<int64_t>();
  const int64_t* pa = parents.data_ptr<int64_t>();
  const int64_t P = digits.numel(), sx = prev.size(1), sb = r * W, so = D * W;
  const int threads = at::get_num_threads();  // torch.set_num_threads, whatever OpenMP runtime is loaded
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < P; ++p) mm(x + pa[p] * sx, b + dg[p] * sb, o + p * so, D, r, W);
}

// Block gradient of one digit, transposed: gbt (W x r) = sum over its nodes p of G[p]^T (W x D) @ X[parent p] (D x r).
// Rows of gbt are columns of G (broadcast values), columns are a row of X (r values: one vector at
// rank 16), so a tile of R rows keeps R accumulator vectors in registers across all of the digit's
// nodes: one pass over them per R rows, where a per-node GEMM (K = D, as small as 1) would load and
// store its accumulators for every node.
template <typename T, int R, int C>
inline void tile_block_grad(T* __restrict__ gbt, int64_t ldo, const int64_t* nodes, int64_t n, const T* __restrict__ x,
                            const int64_t* pa, int64_t sx, const T* __restrict__ g, int64_t sg, int64_t D, int64_t r,
                            int64_t W) {
  constexpr int Wv = C < 64 / int(sizeof(T)) ? C : 64 / int(sizeof(T));
  constexpr int NV = C / Wv;
  using V = Vec<T, Wv>;
  using vec = typename V::type;
  constexpr int units = R * NV * ((Wv * int(sizeof(T)) + 31) / 32);
  constexpr int S = units >= 8 ? 1 : 2;  // sets alternate over nodes
  vec acc[S][R][NV];
#pragma GCC unroll 4
  for (int q = 0; q < S; ++q)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[q][i][v] = vec{};
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = nodes[j];
    const T* xa = x + pa[p] * sx;  // X[parent] (D x r): this tile's columns
    const T* gp = g + p * sg;      // G[p] (D x W): this tile's rows are its columns
    const int q = S == 1 ? 0 : int(j & 1);
    for (int64_t d = 0; d < D; ++d) {
      vec m[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) m[v] = V::load(xa + d * r + v * Wv);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const T sv = gp[d * W + i];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[q][i][v] += sv * m[v];
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      vec y = acc[0][i][v];
      if (S > 1) y += acc[S - 1][i][v];
      V::store(gbt + i * ldo + v * Wv, y);
    }
}

template <typename T, int R>
inline void block_grad_rows(T* gbt, const int64_t* nodes, int64_t n, const T* x, const int64_t* pa, int64_t sx,
                            const T* g, int64_t sg, int64_t D, int64_t r, int64_t W) {
  constexpr int V = 64 / sizeof(T);
  int64_t c = 0;
  for (; c + 2 * V <= r; c += 2 * V) tile_block_grad<T, R, 2 * V>(gbt + c, r, nodes, n, x + c, pa, sx, g, sg, D, r, W);
  for (; c + V <= r; c += V) tile_block_grad<T, R, V>(gbt + c, r, nodes, n, x + c, pa, sx, g, sg, D, r, W);
  for (; c + V / 2 <= r; c += V / 2) tile_block_grad<T, R, V / 2>(gbt + c, r, nodes, n, x + c, pa, sx, g, sg, D, r, W);
  for (; c + V / 4 <= r; c += V / 4) tile_block_grad<T, R, V / 4>(gbt + c, r, nodes, n, x + c, pa, sx, g, sg, D, r, W);
  for (; c < r; ++c) tile_block_grad<T, R, 1>(gbt + c, r, nodes, n, x + c, pa, sx, g, sg, D, r, W);
}

// gb (r x W) of one digit from its nodes (see tile_block_grad)
template <typename T>
void block_grad(T* gb, const int64_t* nodes, int64_t n, const T* x, const int64_t* pa, int64_t sx, const T* g,
                int64_t sg, int64_t D, int64_t r, int64_t W, std::vector<T>& gbt) {
  gbt.resize(W * r);
  int64_t i = 0;
  for (; i + 8 <= W; i += 8) block_grad_rows<T, 8>(gbt.data() + i * r, nodes, n, x, pa, sx, g + i, sg, D, r, W);
  for (; i + 4 <= W; i += 4) block_grad_rows<T, 4>(gbt.data() + i * r, nodes, n, x, pa, sx, g + i, sg, D, r, W);
  for (; i < W; ++i) block_grad_rows<T, 1>(gbt.data() + i * r, nodes, n, x, pa, sx, g + i, sg, D, r, W);
  for (int64_t a = 0; a < r; ++a)
    for (int64_t w = 0; w < W; ++w) gb[a * W + w] = gbt[w * r + a];
}

template <typename scalar_t>
void backward_level(const torch::Tensor& prev, const torch::Tensor& block, const torch::Tensor& digits,
                    const torch::Tensor& parents, const torch::Tensor& g, torch::Tensor& gprev,
                    torch::Tensor& gblock, int64_t D, int64_t r, int64_t W) {
  const scalar_t* x = prev.data_ptr<scalar_t>();
  const auto block_t = block.transpose(1, 2).contiguous();  // (n, W, r)
  const scalar_t* b = block_t.data_ptr<scalar_t>();
  const scalar_t* gx = g.data_ptr<scalar_t>();
  scalar_t* ga = gprev.data_ptr<scalar_t>();
  scalar_t* gb = gblock.data_ptr<scalar_t>();
  const int64_t* dg = digits.data_ptr<int64_t>();
  const int64_t* pa = parents.data_ptr<int64_t>();
  const int64_t P = digits.numel(), Pp = prev.size(0), n = block.size(0), sx = prev.size(1), sb = r * W, sg = D * W;
  const auto start = child_ranges(pa, P, Pp);
  // nodes grouped by digit (a counting sort): each block's gradient is then one thread's, no buffers
  std::vector<int64_t> first(n + 1, 0), by_digit(P);
  for (int64_t p = 0; p < P; ++p) ++first[dg[p] + 1];
  for (int64_t j = 0; j < n; ++j) first[j + 1] += first[j];
  {
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < P; ++p) by_digit[fill[dg[p]]++] = p;
  }
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<scalar_t> gbt;  // one digit's transposed block gradient
#pragma omp for schedule(static) nowait
    for (int64_t q = 0; q < Pp; ++q) {  // parents' gradients: the first child writes, the others add
      if (start[q] == start[q + 1]) std::fill(ga + q * sx, ga + (q + 1) * sx, scalar_t(0));  // no child
      for (int64_t p = start[q]; p < start[q + 1]; ++p) {
        if (p == start[q]) grad_a<scalar_t, false>(gx + p * sg, b + dg[p] * sb, ga + q * sx, D, r, W);
        else grad_a<scalar_t, true>(gx + p * sg, b + dg[p] * sb, ga + q * sx, D, r, W);
      }
    }
#pragma omp for schedule(dynamic, 4)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t m = first[j + 1] - first[j];
      if (m == 0) std::fill(gb + j * sb, gb + (j + 1) * sb, scalar_t(0));
      else block_grad(gb + j * sb, by_digit.data() + first[j], m, x, pa, sx, gx, sg, D, r, W, gbt);
    }
  }
}

void check(const std::vector<torch::Tensor>& blocks, const std::vector<torch::Tensor>& digits,
           const std::vector<torch::Tensor>& parents) {
  TORCH_CHECK(!blocks.empty() && blocks.size() == digits.size() && blocks.size() == parents.size(),
              "tt_lookup: one block, digit and parent tensor per level");
  for (size_t k = 0; k < blocks.size(); ++k) {
    TORCH_CHECK(blocks[k].dim() == 3 && blocks[k].is_contiguous() && !blocks[k].is_cuda(), "tt_lookup: blocks (n, r, W) contiguous CPU");
    TORCH_CHECK(digits[k].scalar_type() == torch::kLong && digits[k].is_contiguous(), "tt_lookup: int64 digits");
    TORCH_CHECK(k == 0 || (parents[k].scalar_type() == torch::kLong && parents[k].numel() == digits[k].numel()),
                "tt_lookup: int64 parents per node");
  }
}

}  // namespace

// Node values of every level: X_k (P_k, Dprev_k * W_k); the last one is the lookup's output.
std::vector<torch::Tensor> forward(std::vector<torch::Tensor> blocks, std::vector<torch::Tensor> digits,
                                   std::vector<torch::Tensor> parents) {
  check(blocks, digits, parents);
  std::vector<torch::Tensor> xs;
  xs.push_back(blocks[0].index_select(0, digits[0]).reshape({digits[0].numel(), -1}));
  for (size_t k = 1; k < blocks.size(); ++k) {
    const auto& prev = xs.back();
    const int64_t P = digits[k].numel(), r = blocks[k].size(1), W = blocks[k].size(2);
    const int64_t D = prev.size(1) / r;
    auto out = torch::empty({P, D * W}, blocks[k].options());
    AT_DISPATCH_FLOATING_TYPES(blocks[k].scalar_type(), "tt_forward", [&] {
      forward_level<scalar_t>(prev, blocks[k], digits[k], parents[k], out, D, r, W);
    });
    xs.push_back(out);
  }
  return xs;
}

// Gradients of every block (n_k, r_{k-1}, W_k), given the output gradient and forward's node values.
std::vector<torch::Tensor> backward(torch::Tensor grad_out, std::vector<torch::Tensor> xs,
                                    std::vector<torch::Tensor> blocks, std::vector<torch::Tensor> digits,
                                    std::vector<torch::Tensor> parents) {
  check(blocks, digits, parents);
  const size_t L = blocks.size();
  std::vector<torch::Tensor> grads(L);
  auto g = grad_out.contiguous();
  for (size_t k = L - 1; k >= 1; --k) {
    const auto& prev = xs[k - 1];
    const int64_t P = digits[k].numel(), Pp = prev.size(0), r = blocks[k].size(1), W = blocks[k].size(2);
    const int64_t D = prev.size(1) / r;
    auto gprev = torch::empty_like(prev);  // written by each parent's first child (backward_level)
    auto gblock = torch::empty_like(blocks[k]);  // every digit's block written by backward_level
    AT_DISPATCH_FLOATING_TYPES(blocks[k].scalar_type(), "tt_backward", [&] {
      backward_level<scalar_t>(prev, blocks[k], digits[k], parents[k], g, gprev, gblock, D, r, W);
    });
    grads[k] = gblock;
    g = gprev;
  }
  grads[0] = torch::zeros_like(blocks[0]).index_add_(0, digits[0], g.reshape({digits[0].numel(), blocks[0].size(1), -1}));
  return grads;
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

// The batch's distinct ids (sorted), each lookup's index among them, and the prefix tree over the
// ids' row digits (per level: digit and parent of each node): what torch.unique(return_inverse) and
// tt_lookup.PrefixTree.of compute, in one pass after a radix sort.
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
  std::vector<int64_t> last(L, -1);
  for (int64_t i = 0; i < n; ++i) {
    if (unique.empty() || key[i] != unique.back()) {
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
  std::vector<torch::Tensor> out{tensor(unique), inverse};
  for (int64_t k = 0; k < L; ++k) out.push_back(tensor(digits[k]));
  for (int64_t k = 0; k < L; ++k) out.push_back(tensor(parents[k]));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused TT lookup forward: node values per prefix-tree level");
  m.def("backward", &backward, "fused TT lookup backward: per-block gradients");
  m.def("prefix_tree", &prefix_tree, "distinct ids, inverse, and the prefix tree of their row digits");
}
