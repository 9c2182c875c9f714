#pragma once
// Private to src/minimax: the plain-C++ interface between minimax_loss.cpp (LibTorch) and the
// kernels (CPU in minimax_loss.cpp, CUDA in minimax_loss.cu). Only raw pointers, sizes and POD
// structs cross it, so the .cu compiles with nvcc alone, without LibTorch headers.

#include <cstdint>

#if defined(__CUDACC__)
#define MDD_MINIMAX_HD __host__ __device__
#else
#define MDD_MINIMAX_HD
#endif

namespace mdd {
namespace minimax_detail {

/// Norms below this are treated as zero vectors: their cosine is 0 and its gradient is 0.
/// (The reference divides by the plain norm and returns NaN for an exactly-zero vector.)
constexpr double kNormEps = 1e-12;

/// One (class, bank) reduction of the fused forward: find the extreme cosine of the
/// [rows x count] block `dots` (= Q_c · bank_cᵀ, un-normalised) and the pair that attains it.
struct SelectJob {
  const void* dots = nullptr;      ///< [rows, count] row-major, compute dtype
  const void* queries = nullptr;   ///< [rows, dim] the class's prediction rows (gathered Q_c)
  const double* q_norms = nullptr; ///< [rows] L2 norms of the query rows
  const void* bank = nullptr;      ///< [capacity, dim] ring storage of the class, compute dtype
  const double* m_norms = nullptr; ///< [capacity] cached L2 norms of the ring slots
  int64_t rows = 0;                ///< B_c
  int64_t count = 0;               ///< valid slots: 0..count-1 (the ring fills from slot 0)
  int64_t head = 0;                ///< physical slot of the oldest entry
  int64_t capacity = 0;
  int64_t q_offset = 0;            ///< row of Q_c's first row inside the gathered Q
  int32_t want_max = 0;            ///< 0: min over the real bank (R); 1: max over the generated bank (D)
  int32_t pad = 0;
};

/// The result of one SelectJob (written by the kernel).
struct Selection {
  double cos = 0;     ///< the selected cosine, recomputed exactly (float64 dot) for the chosen pair
  double q_norm = 0;  ///< norm of the chosen query row
  double m_norm = 0;  ///< norm of the chosen memory row
  int64_t q_row = 0;  ///< row inside the gathered Q
  int64_t slot = 0;   ///< physical ring slot
  int64_t index = 0;  ///< logical index in the bank, 0 = oldest; -1 if every cosine was NaN
};
static_assert(sizeof(Selection) == 48, "Selection is viewed as 6 x 64-bit words by minimax_loss.cpp");

/// 1/norm, or 0 for a (numerically) zero vector (see kNormEps).
MDD_MINIMAX_HD inline double inv_norm(double norm) { return norm >= kNormEps ? 1.0 / norm : 0.0; }

/// Pure tie-breaking rule shared by both back ends: prefer the lexicographically smallest
/// (query row, logical memory index), i.e. the first extreme in the reference's row-major
/// [B_c x M] matrix (oldest-first memory), like torch's argmin/argmax.
MDD_MINIMAX_HD inline bool better(double v, int64_t i, int64_t j, double bv, int64_t bi, int64_t bj, bool want_max) {
  if (v != bv) return want_max ? (v > bv) : (v < bv);
  return i < bi || (i == bi && j < bj);
}

// ---- CUDA launchers (defined in minimax_loss.cu; `stream` is a cudaStream_t) -------------------
// is_double selects float (0) or double (1) for the data pointers typed void*.

/// norms[r] = ||x[r, :]||_2 (accumulated in float64); sets *nonfinite = 1 if any norm is not finite.
void cuda_row_norms(const void* x, int is_double, int64_t rows, int64_t dim, double* norms,
                    int32_t* nonfinite, void* stream);

/// Runs `num_jobs` SelectJobs (device array `jobs`), writes `out[num_jobs]` and copies the selected
/// memory rows into `sel_mem` [num_jobs, dim]. Jobs come in pairs per class: 2k = real, 2k+1 = gen.
/// Then terms[0] = sum_k (1 - cos_{2k}) / num_distinct, terms[1] = sum_k cos_{2k+1} / num_distinct
/// (float64), in class order (deterministic).
void cuda_select(const SelectJob* jobs, int64_t num_jobs, int is_double, int64_t dim, Selection* out,
                 void* sel_mem, double num_distinct, double* terms, void* stream);

/// Backward: for class k (pairs 2k, 2k+1) adds coef_j · d cos_j / d q to grad row perm[q_row_j]:
/// coef_{2k} = -(g[0] + lambda_r g[2]) / n, coef_{2k+1} = (g[1] + lambda_d g[2]) / n, with
/// g = grad_terms (float64 device array [3]: dR, dD, dTotal). `queries` is the gathered Q
/// [B, dim], `perm` [B] maps a row of Q to its batch row, grad is [B, dim] and zero-initialised.
void cuda_backward(const Selection* sel, const int64_t* perm, int64_t num_classes_active,
                   const void* queries, const void* sel_mem, int is_double, int64_t dim,
                   const double* grad_terms, double lambda_r, double lambda_d, double num_distinct,
                   void* grad, void* stream);

}  // namespace minimax_detail
}  // namespace mdd
