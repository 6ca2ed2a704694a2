// Fused TT/TTM lookup kernels (CPU, OpenMP): the prefix-tree GEMM chain of tt_lookup.py.
//
// Level k of the prefix tree has P_k nodes; node p has a digit (which core block it multiplies)
// and a parent in level k-1 (ids sorted, so a parent's children are consecutive). A level-k node
// value is X_k[p] = X_{k-1}[parent[p]] (Dprev x r) @ block_k[digit[p]] (r x W), stored (Dprev*W).
// Backward walks the levels from the leaves up: each parent sums its children's input gradients
// (no atomics: children are a contiguous range), each core block sums the gradients of every node
// that used it (per-thread buffers, reduced at the end). The matrices are tiny (r <= 64), so
// register-tiled loops with a contiguous, vectorizable inner dimension beat a BLAS call per node.
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
template <typename T, int R, int C, bool Acc>
inline void tile(T* __restrict__ out, int64_t ldo, const T* __restrict__ s, int64_t si, int64_t sk,
                 const T* __restrict__ M, int64_t ld, int64_t K) {
  T acc[R][C];
  for (int i = 0; i < R; ++i) {
#pragma omp simd
    for (int c = 0; c < C; ++c) acc[i][c] = Acc ? out[i * ldo + c] : T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* m = M + k * ld;
    for (int i = 0; i < R; ++i) {
      const T sv = s[i * si + k * sk];
#pragma omp simd
      for (int c = 0; c < C; ++c) acc[i][c] += sv * m[c];
    }
  }
  for (int i = 0; i < R; ++i) {
#pragma omp simd
    for (int c = 0; c < C; ++c) out[i * ldo + c] = acc[i][c];
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

template <typename T>
inline void grad_b_acc(const T* a, const T* gx, T* gb, int64_t D, int64_t r, int64_t W) {
  // gb (r x W) += a^T (r x D) @ gx (D x W)
  gemm<T, true>(gb, W, r, W, a, 1, r, gx, W, D);
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

template <typename scalar_t>
void backward_level(const torch::Tensor& prev, const torch::Tensor& block, const torch::Tensor& digits,
                    const torch::Tensor& parents, const torch::Tensor& g, torch::Tensor& gprev,
                    torch::Tensor& gblock, int64_t D, int64_t r, int64_t W) {
  const scalar_t* x = prev.data_ptr<scalar_t>();
  const auto block_t = block.transpose(1, 2).contiguous();  // (n, W, r)
  const scalar_t* b = block_t.data_ptr<scalar_t>();
  const scalar_t* gx = g.data_ptr<scalar_t>();
  scalar_t* ga = gprev.data_ptr<scalar_t>();
  const int64_t* dg = digits.data_ptr<int64_t>();
  const int64_t* pa = parents.data_ptr<int64_t>();
  const int64_t P = digits.numel(), Pp = prev.size(0), sx = prev.size(1), sb = r * W, sg = D * W;
  const auto start = child_ranges(pa, P, Pp);
  const int threads = at::get_num_threads();
  const int64_t nb = gblock.numel();
  std::vector<scalar_t> local(threads > 1 ? (threads - 1) * nb : 0, scalar_t(0));
  scalar_t* gb0 = gblock.data_ptr<scalar_t>();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    scalar_t* gb = t == 0 ? gb0 : local.data() + (t - 1) * nb;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < Pp; ++q) {
      const scalar_t* a = x + q * sx;
      if (start[q] == start[q + 1]) std::fill(ga + q * sx, ga + (q + 1) * sx, scalar_t(0));  // no child
      for (int64_t p = start[q]; p < start[q + 1]; ++p) {  // the first child writes the parent's gradient
        grad_b_acc(a, gx + p * sg, gb + dg[p] * sb, D, r, W);
        if (p == start[q]) grad_a<scalar_t, false>(gx + p * sg, b + dg[p] * sb, ga + q * sx, D, r, W);
        else grad_a<scalar_t, true>(gx + p * sg, b + dg[p] * sb, ga + q * sx, D, r, W);
      }
    }
  }
  for (int t = 1; t < threads; ++t) {
    const scalar_t* l = local.data() + (t - 1) * nb;
    for (int64_t i = 0; i < nb; ++i) gb0[i] += l[i];
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
    auto gblock = torch::zeros_like(blocks[k]);
    AT_DISPATCH_FLOATING_TYPES(blocks[k].scalar_type(), "tt_backward", [&] {
      backward_level<scalar_t>(prev, blocks[k], digits[k], parents[k], g, gprev, gblock, D, r, W);
    });
    grads[k] = gblock;
    g = gprev;
  }
  grads[0] = torch::zeros_like(blocks[0]).index_add_(0, digits[0], g.reshape({digits[0].numel(), blocks[0].size(1), -1}));
  return grads;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused TT lookup forward: node values per prefix-tree level");
  m.def("backward", &backward, "fused TT lookup backward: per-block gradients");
}
