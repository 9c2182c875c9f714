// CUDA kernels of the fused minimax loss. Plain CUDA: no LibTorch headers (the launchers take raw
// pointers, see minimax_kernels.h), so this file also compiles with a bare `nvcc -c`.
#include <cuda_runtime.h>

#include <cmath>

#include "minimax/minimax_kernels.h"

namespace mdd {
namespace minimax_detail {
namespace {

constexpr int kThreads = 256;

// Block-wide float64 sum; every thread gets the result.
__device__ double block_sum(double v, double* shared) {
  const int t = threadIdx.x;
  shared[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) shared[t] += shared[t + s];
    __syncthreads();
  }
  const double r = shared[0];
  __syncthreads();
  return r;
}

template <typename T>
__global__ void row_norms_kernel(const T* x, int64_t dim, double* norms, int32_t* nonfinite) {
  __shared__ double shared[kThreads];
  const T* row = x + static_cast<int64_t>(blockIdx.x) * dim;
  double acc = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const double v = static_cast<double>(row[i]);
    acc += v * v;
  }
  const double s = block_sum(acc, shared);
  if (threadIdx.x == 0) {
    const double n = sqrt(s);
    norms[blockIdx.x] = n;
    if (!isfinite(n)) *nonfinite = 1;
  }
}

// One block per SelectJob: scan the [rows x count] dot block for the extreme cosine (ties to the
// smallest (row, logical index)), recompute the chosen cosine exactly, copy the memory row.
template <typename T>
__global__ void select_kernel(const SelectJob* jobs, int64_t dim, Selection* out, T* sel_mem) {
  __shared__ double sv[kThreads];
  __shared__ long long si[kThreads];
  __shared__ long long sj[kThreads];
  __shared__ long long ss[kThreads];
  __shared__ double sred[kThreads];
  const SelectJob job = jobs[blockIdx.x];
  const bool want_max = job.want_max != 0;
  const T* dots = static_cast<const T*>(job.dots);
  const int64_t total = job.rows * job.count;
  double bv = want_max ? -INFINITY : INFINITY;
  long long bi = -1, bj = -1, bs = 0;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t i = e / job.count, j = e % job.count;
    const double v = static_cast<double>(dots[e]) * inv_norm(job.q_norms[i]) * inv_norm(job.m_norms[j]);
    const int64_t lj = (j - job.head + job.capacity) % job.capacity;
    if (bi < 0 ? !isnan(v) : better(v, i, lj, bv, bi, bj, want_max)) {
      bv = v;
      bi = i;
      bj = lj;
      bs = j;
    }
  }
  const int t = threadIdx.x;
  sv[t] = bv;
  si[t] = bi;
  sj[t] = bj;
  ss[t] = bs;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s && si[t + s] >= 0 &&
        (si[t] < 0 || better(sv[t + s], si[t + s], sj[t + s], sv[t], si[t], sj[t], want_max))) {
      sv[t] = sv[t + s];
      si[t] = si[t + s];
      sj[t] = sj[t + s];
      ss[t] = ss[t + s];
    }
    __syncthreads();
  }
  const long long fi = si[0], fj = sj[0], fs = ss[0];
  __syncthreads();
  T* mem_row = sel_mem + static_cast<int64_t>(blockIdx.x) * dim;
  if (fi < 0) {  // every cosine NaN (only with check_finite off)
    for (int64_t d = t; d < dim; d += blockDim.x) mem_row[d] = T(0);
    if (t == 0) {
      Selection r;
      r.cos = NAN;
      r.q_norm = 0;
      r.m_norm = 0;
      r.q_row = job.q_offset;
      r.slot = 0;
      r.index = -1;
      out[blockIdx.x] = r;
    }
    return;
  }
  const T* q = static_cast<const T*>(job.queries) + fi * dim;
  const T* m = static_cast<const T*>(job.bank) + fs * dim;
  double acc = 0;
  for (int64_t d = t; d < dim; d += blockDim.x) {
    const T mv = m[d];
    acc += static_cast<double>(q[d]) * static_cast<double>(mv);
    mem_row[d] = mv;
  }
  const double dot = block_sum(acc, sred);
  if (t == 0) {
    Selection r;
    r.q_norm = job.q_norms[fi];
    r.m_norm = job.m_norms[fs];
    r.cos = dot * inv_norm(r.q_norm) * inv_norm(r.m_norm);
    r.q_row = job.q_offset + fi;
    r.slot = fs;
    r.index = fj;
    out[blockIdx.x] = r;
  }
}

// Sums the class terms in class order (deterministic; K is at most 2 x num_classes).
__global__ void terms_kernel(const Selection* sel, int64_t num_jobs, double n, double* terms) {
  double r = 0, d = 0;
  for (int64_t k = 0; k + 1 < num_jobs; k += 2) {
    r += 1.0 - sel[k].cos;
    d += sel[k + 1].cos;
  }
  terms[0] = r / n;
  terms[1] = d / n;
}

// One block per contributing class; the same thread handles element d of both of the class's
// pairs, so two pairs on the same batch row never race.
template <typename T>
__global__ void backward_kernel(const Selection* sel, const int64_t* perm, const T* queries, const T* sel_mem,
                                int64_t dim, const double* g, double lambda_r, double lambda_d, double n, T* grad) {
  const int64_t k = blockIdx.x;
  const double coef[2] = {-(g[0] + lambda_r * g[2]) / n, (g[1] + lambda_d * g[2]) / n};
  for (int p = 0; p < 2; ++p) {
    const Selection s = sel[2 * k + p];
    const double iq = inv_norm(s.q_norm), im = inv_norm(s.m_norm);
    if (s.index < 0 || iq == 0.0) continue;
    const T a = static_cast<T>(coef[p] * iq * im);
    const T c = static_cast<T>(coef[p] * s.cos * iq * iq);
    const T* q = queries + s.q_row * dim;
    const T* m = sel_mem + (2 * k + p) * dim;
    T* gr = grad + perm[s.q_row] * dim;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) gr[d] += a * m[d] - c * q[d];
  }
}

}  // namespace

void cuda_row_norms(const void* x, int is_double, int64_t rows, int64_t dim, double* norms, int32_t* nonfinite,
                    void* stream) {
  if (rows <= 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  if (is_double) {
    row_norms_kernel<double><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(static_cast<const double*>(x), dim,
                                                                               norms, nonfinite);
  } else {
    row_norms_kernel<float><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(static_cast<const float*>(x), dim,
                                                                              norms, nonfinite);
  }
}

void cuda_select(const SelectJob* jobs, int64_t num_jobs, int is_double, int64_t dim, Selection* out, void* sel_mem,
                 double num_distinct, double* terms, void* stream) {
  if (num_jobs <= 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  if (is_double) {
    select_kernel<double><<<static_cast<unsigned>(num_jobs), kThreads, 0, st>>>(jobs, dim, out,
                                                                                static_cast<double*>(sel_mem));
  } else {
    select_kernel<float><<<static_cast<unsigned>(num_jobs), kThreads, 0, st>>>(jobs, dim, out,
                                                                               static_cast<float*>(sel_mem));
  }
  terms_kernel<<<1, 1, 0, st>>>(out, num_jobs, num_distinct, terms);
}

void cuda_backward(const Selection* sel, const int64_t* perm, int64_t num_classes_active, const void* queries,
                   const void* sel_mem, int is_double, int64_t dim, const double* grad_terms, double lambda_r,
                   double lambda_d, double num_distinct, void* grad, void* stream) {
  if (num_classes_active <= 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  if (is_double) {
    backward_kernel<double><<<static_cast<unsigned>(num_classes_active), kThreads, 0, st>>>(
        sel, perm, static_cast<const double*>(queries), static_cast<const double*>(sel_mem), dim, grad_terms, lambda_r,
        lambda_d, num_distinct, static_cast<double*>(grad));
  } else {
    backward_kernel<float><<<static_cast<unsigned>(num_classes_active), kThreads, 0, st>>>(
        sel, perm, static_cast<const float*>(queries), static_cast<const float*>(sel_mem), dim, grad_terms, lambda_r,
        lambda_d, num_distinct, static_cast<float*>(grad));
  }
}

}  // namespace minimax_detail
}  // namespace mdd
