#include "mdd/minimax/minimax_loss.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef MDD_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include "minimax/minimax_kernels.h"
#include "mdd/util/error.h"
#include "util/shape_str.h"

namespace mdd {

namespace {

using minimax_detail::better;
using minimax_detail::inv_norm;
using minimax_detail::Selection;
using minimax_detail::SelectJob;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Query rows with at most this many rows per class compute their dot products inside the
// parallel selection kernel (a few bank-sized GEMVs: memory bound, nothing for BLAS to gain and
// one ATen call per bank saved); larger classes use one BLAS GEMM per bank.
constexpr int64_t kSmallRows = 4;

// ---------------------------------------------------------------------------------- CPU kernels

// Sum of squares of x[0..n) accumulated in float64 (lanes independent so the compiler vectorises).
template <typename T>
double sum_squares(const T* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(x[i + k]) * static_cast<double>(x[i + k]);
  }
  double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return s;
}

// Exact (float64) dot product for the selected pairs.
template <typename T>
double dot_exact(const T* a, const T* b, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(a[i + k]) * static_cast<double>(b[i + k]);
  }
  double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

// Screening dot products in the compute dtype, 16 independent lanes (vectorised). Only used to
// find the extreme pair; its cosine is then recomputed with dot_exact.
template <typename T>
void dots_rows(const T* q, int64_t rows, const T* m, int64_t dim, T* out /*[rows]*/) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = q + r * dim;
    T acc[16] = {};
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16) {
      for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * m[i + k];
    }
    T s = 0;
    for (int k = 0; k < 16; ++k) s += acc[k];
    for (; i < dim; ++i) s += a[i] * m[i];
    out[r] = s;
  }
}

template <typename T>
void cpu_row_norms(const T* x, int64_t rows, int64_t dim, double* norms) {
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) norms[r] = std::sqrt(sum_squares(x + r * dim, dim));
  });
}

// One SelectJob on the CPU. `dots` may be null: then the dots are computed here (small B_c).
template <typename T>
void cpu_select_one(const SelectJob& job, int64_t dim, Selection& out, T* sel_mem_row) {
  const T* Q = static_cast<const T*>(job.queries);
  const T* M = static_cast<const T*>(job.bank);
  const int64_t rows = job.rows, count = job.count, cap = job.capacity;
  const bool want_max = job.want_max != 0;
  const T* dots = static_cast<const T*>(job.dots);
  std::vector<double> iq(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) iq[static_cast<size_t>(i)] = inv_norm(job.q_norms[i]);

  double bv = want_max ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
  int64_t bi = -1, bj = -1, bslot = 0;
  T tmp[kSmallRows];
  for (int64_t j = 0; j < count; ++j) {
    const double im = inv_norm(job.m_norms[j]);
    const int64_t lj = (j - job.head + cap) % cap;  // logical (oldest-first) index of slot j
    if (!dots) dots_rows(Q, rows, M + j * dim, dim, tmp);
    for (int64_t i = 0; i < rows; ++i) {
      const double d = dots ? static_cast<double>(dots[i * count + j]) : static_cast<double>(tmp[i]);
      const double v = d * iq[static_cast<size_t>(i)] * im;
      // NaN never wins a comparison; bi < 0 accepts the first finite candidate.
      if (bi < 0 ? !std::isnan(v) : better(v, i, lj, bv, bi, bj, want_max)) {
        bv = v;
        bi = i;
        bj = lj;
        bslot = j;
      }
    }
  }
  if (bi < 0) {  // every cosine NaN (only possible with check_finite off)
    out = Selection{std::numeric_limits<double>::quiet_NaN(), 0, 0, job.q_offset, 0, -1};
    std::memset(sel_mem_row, 0, sizeof(T) * static_cast<size_t>(dim));
    return;
  }
  const T* q = Q + bi * dim;
  const T* m = M + bslot * dim;
  out.q_norm = job.q_norms[bi];
  out.m_norm = job.m_norms[bslot];
  out.cos = dot_exact(q, m, dim) * inv_norm(out.q_norm) * inv_norm(out.m_norm);
  out.q_row = job.q_offset + bi;
  out.slot = bslot;
  out.index = bj;
  std::memcpy(sel_mem_row, m, sizeof(T) * static_cast<size_t>(dim));
}

// Backward on the CPU: per class (pairs 2k, 2k+1) add coef * d cos / d q to its batch rows.
template <typename T>
void cpu_backward(const Selection* sel, const int64_t* perm, int64_t num_active, const T* queries, const T* sel_mem,
                  int64_t dim, const double coef[2], T* grad) {
  at::parallel_for(0, num_active, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      for (int p = 0; p < 2; ++p) {
        const Selection& s = sel[2 * k + p];
        const double iq = inv_norm(s.q_norm), im = inv_norm(s.m_norm);
        if (s.index < 0 || iq == 0.0) continue;  // zero query vector: cosine constant 0, no gradient
        const T* q = queries + s.q_row * dim;
        const T* m = sel_mem + (2 * k + p) * dim;
        T* g = grad + perm[s.q_row] * dim;
        // d cos(q,m)/dq = m/(|q||m|) - cos q/|q|^2
        const T a = static_cast<T>(coef[p] * iq * im);
        const T c = static_cast<T>(coef[p] * s.cos * iq * iq);
        for (int64_t d = 0; d < dim; ++d) g[d] += a * m[d] - c * q[d];
      }
    }
  });
}

// ------------------------------------------------------------------------------ the plan

struct ClassRows {
  int64_t label;
  int64_t offset;  // first row in the gathered Q
  int64_t rows;
};

struct Plan {
  std::vector<int64_t> perm;       // gathered row -> batch row
  bool identity = true;            // perm is 0..B-1 (no gather needed)
  std::vector<ClassRows> classes;  // distinct classes of the batch, increasing
};

Plan make_plan(const torch::Tensor& labels_cpu, int64_t num_classes) {
  const int64_t B = labels_cpu.size(0);
  const int64_t* lp = labels_cpu.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows;
  std::map<int64_t, std::vector<int64_t>> by_class;
  for (int64_t i = 0; i < B; ++i) {
    if (lp[i] < 0 || lp[i] >= num_classes) {
      throw Error(fmt::format("minimax_loss: labels[{}] = {} out of range [0, {})", i, lp[i], num_classes));
    }
    by_class[lp[i]].push_back(i);
  }
  Plan plan;
  plan.perm.reserve(static_cast<size_t>(B));
  for (const auto& [c, idx] : by_class) {
    plan.classes.push_back({c, static_cast<int64_t>(plan.perm.size()), static_cast<int64_t>(idx.size())});
    plan.perm.insert(plan.perm.end(), idx.begin(), idx.end());
  }
  for (int64_t i = 0; i < B; ++i) plan.identity = plan.identity && plan.perm[static_cast<size_t>(i)] == i;
  return plan;
}

// The bank rows of `label` that hold data, in the compute dtype, as [count, D].
torch::Tensor bank_rows(const MemoryBank& bank, int64_t label, torch::ScalarType ct) {
  auto st = bank.storage(label).narrow(0, 0, bank.size(label));
  return st.scalar_type() == ct ? st : st.to(ct);
}

void check_bank(const MemoryBank& bank, const char* name, int64_t D, const torch::Tensor& pred) {
  if (bank.item_numel() != 0 && bank.item_numel() != D) {
    throw Error(fmt::format("minimax_loss: pred_x0 {} has {} elements per row but the {} bank holds items of shape {}",
                            shape_str(pred.sizes()), D, name, shape_str(bank.item_shape())));
  }
  for (int64_t c = 0; c < bank.num_classes(); ++c) {
    if (bank.size(c) > 0) {
      if (bank.storage(c).device() != pred.device()) {
        throw Error(fmt::format("minimax_loss: the {} bank lives on {} but pred_x0 on {}", name,
                                bank.storage(c).device().str(), pred.device().str()));
      }
      break;
    }
  }
}

// ------------------------------------------------------------------------ autograd function

class MinimaxFunction : public torch::autograd::Function<MinimaxFunction> {
 public:
  // Outputs: R, D, total (differentiable scalars) and the int64 pairs table.
  static variable_list forward(AutogradContext* ctx, torch::Tensor pred, torch::Tensor labels, const MemoryBank* real,
                               const MemoryBank* gen, MinimaxLossOptions options) {
    const int64_t B = pred.size(0);
    const int64_t D = B > 0 ? pred.numel() / B : c10::multiply_integers(pred.sizes().slice(1));
    const auto ct = pred.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
    // Where the kernels run: the prediction's device, or the host when it is a device without mdd
    // kernels (e.g. CUDA tensors with a build that has MDD_WITH_CUDA off): then inputs are copied
    // to the host and results back (correct, not fast).
    const auto out_dev = pred.device();
#ifdef MDD_WITH_CUDA
    const bool have_kernels = out_dev.is_cpu() || out_dev.is_cuda();
#else
    const bool have_kernels = out_dev.is_cpu();
#endif
    const auto dev = have_kernels ? out_dev : torch::Device(torch::kCPU);
    const auto fopt = torch::TensorOptions().dtype(ct).device(dev);
    const auto dopt = torch::TensorOptions().dtype(torch::kDouble).device(dev);
    const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
    const bool cuda = dev.is_cuda();
    c10::OptionalDeviceGuard device_guard;  // kernels launch on the current device: make it pred's
    if (cuda) device_guard.reset_device(dev);
    const int64_t ncls = std::min(real->num_classes(), gen->num_classes());
    const Plan plan = make_plan(labels.to(torch::kCPU, torch::kLong).contiguous(), ncls);
    const double n_distinct = static_cast<double>(plan.classes.size());

    auto P = pred.detach().reshape({B, D});
    if (P.scalar_type() != ct || P.device() != dev) P = P.to(dev, ct);
    P = P.contiguous();
    auto perm_t = torch::tensor(plan.perm, torch::kLong).to(dev);
    auto Q = plan.identity ? P : P.index_select(0, perm_t);

    // Row norms of the predictions (float64), checked for NaN/Inf.
    auto q_norms = torch::empty({B}, dopt);
    if (cuda) {
#ifdef MDD_WITH_CUDA
      auto flag = torch::zeros({1}, torch::TensorOptions().dtype(torch::kInt).device(dev));
      minimax_detail::cuda_row_norms(Q.data_ptr(), ct == torch::kDouble, B, D, q_norms.data_ptr<double>(),
                                     flag.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream(dev.index()).stream());
      if (options.check_finite() && flag.item<int32_t>() != 0) {
        throw Error(fmt::format("minimax_loss: pred_x0 {} contains NaN or Inf", shape_str(pred.sizes())));
      }
#endif
    } else {
      AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "minimax_row_norms", [&] {
        cpu_row_norms(Q.data_ptr<scalar_t>(), B, D, q_norms.data_ptr<double>());
      });
      if (options.check_finite()) {
        const double* n = q_norms.data_ptr<double>();
        for (int64_t i = 0; i < B; ++i) {
          if (!std::isfinite(n[i])) {
            throw Error(fmt::format("minimax_loss: pred_x0 {} row {} contains NaN or Inf", shape_str(pred.sizes()),
                                    plan.perm[static_cast<size_t>(i)]));
          }
        }
      }
    }

    // Jobs: 2 per class whose generated bank is non-empty (real = min, generated = max).
    std::vector<SelectJob> jobs;
    std::vector<int64_t> active;
    std::vector<torch::Tensor> keep_alive;  // converted bank copies and dot blocks
    std::vector<std::pair<size_t, std::pair<torch::Tensor, torch::Tensor>>> gemms;  // job, (Q_c, M)
    int64_t dots_total = 0;
    std::vector<int64_t> dots_offset;
    for (const ClassRows& cr : plan.classes) {
      if (gen->size(cr.label) == 0) continue;
      if (real->size(cr.label) == 0) {
        throw Error(fmt::format(
            "minimax_loss: class {} has {} generated-bank entries but an empty real bank (the reference "
            "cannot compute R there: torch.cat of an empty list); push real and generated items together",
            cr.label, gen->size(cr.label)));
      }
      active.push_back(cr.label);
      const MemoryBank* banks[2] = {real, gen};
      for (int w = 0; w < 2; ++w) {
        const MemoryBank& bk = *banks[w];
        auto M = bank_rows(bk, cr.label, ct).to(dev);
        auto norms = bk.norms(cr.label).to(dev);
        keep_alive.push_back(M);
        keep_alive.push_back(norms);
        SelectJob j;
        j.queries = static_cast<const char*>(Q.data_ptr()) + cr.offset * D * Q.element_size();
        j.q_norms = q_norms.data_ptr<double>() + cr.offset;
        j.bank = M.data_ptr();
        j.m_norms = norms.data_ptr<double>();
        j.rows = cr.rows;
        j.count = bk.size(cr.label);
        j.head = bk.head(cr.label);
        j.capacity = bk.capacity();
        j.q_offset = cr.offset;
        j.want_max = w;
        const bool use_gemm = cuda || cr.rows > kSmallRows;
        dots_offset.push_back(use_gemm ? dots_total : -1);
        if (use_gemm) {
          gemms.push_back({jobs.size(), {Q.narrow(0, cr.offset, cr.rows), M}});
          dots_total += cr.rows * j.count;
        }
        jobs.push_back(j);
      }
    }
    const int64_t K = static_cast<int64_t>(jobs.size());
    auto dots = torch::empty({dots_total}, fopt);
    for (const auto& g : gemms) {
      const size_t ji = g.first;
      const int64_t off = dots_offset[ji];
      auto out = dots.narrow(0, off, jobs[ji].rows * jobs[ji].count).view({jobs[ji].rows, jobs[ji].count});
      at::mm_out(out, g.second.first, g.second.second.t());
      jobs[ji].dots = out.data_ptr();
    }

    auto sel_buf = torch::empty({std::max<int64_t>(K, 1) * static_cast<int64_t>(sizeof(Selection))},
                                torch::TensorOptions().dtype(torch::kUInt8).device(dev));
    auto sel_mem = torch::empty({K, D}, fopt);
    torch::Tensor R, Dv;
    if (cuda) {
#ifdef MDD_WITH_CUDA
      auto jobs_host = torch::empty({std::max<int64_t>(K, 1) * static_cast<int64_t>(sizeof(SelectJob))},
                                    torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
      if (K > 0) std::memcpy(jobs_host.data_ptr(), jobs.data(), sizeof(SelectJob) * jobs.size());
      auto jobs_dev = jobs_host.to(dev, /*non_blocking=*/true);
      auto terms = torch::zeros({2}, dopt);
      if (K > 0) {
        minimax_detail::cuda_select(reinterpret_cast<const SelectJob*>(jobs_dev.data_ptr()), K, ct == torch::kDouble, D,
                                    reinterpret_cast<Selection*>(sel_buf.data_ptr()), sel_mem.data_ptr(),
                                    std::max(n_distinct, 1.0), terms.data_ptr<double>(),
                                    c10::cuda::getCurrentCUDAStream(dev.index()).stream());
      }
      R = terms.select(0, 0).clone();  // own storage: outputs must not be views of a temporary
      Dv = terms.select(0, 1).clone();
#endif
    } else {
      auto* sel = reinterpret_cast<Selection*>(sel_buf.data_ptr());
      AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "minimax_select", [&] {
        scalar_t* mem = sel_mem.data_ptr<scalar_t>();
        at::parallel_for(0, K, 1, [&](int64_t b, int64_t e) {
          for (int64_t k = b; k < e; ++k) cpu_select_one<scalar_t>(jobs[k], D, sel[k], mem + k * D);
        });
      });
      double r = 0, d = 0;
      for (int64_t k = 0; k + 1 < K; k += 2) {
        r += 1.0 - sel[k].cos;
        d += sel[k + 1].cos;
      }
      if (n_distinct > 0) {
        r /= n_distinct;
        d /= n_distinct;
      }
      R = torch::scalar_tensor(r, dopt);
      Dv = torch::scalar_tensor(d, dopt);
    }
    auto total = (R * options.lambda_r() + Dv * options.lambda_d()).to(ct);

    // Pairs table from the selections (viewed as 64-bit words: cos, q_norm, m_norm, q_row, slot, index).
    torch::Tensor pairs;
    if (K > 0) {
      auto words = sel_buf.narrow(0, 0, K * static_cast<int64_t>(sizeof(Selection))).view(torch::kLong).view({K, 6});
      auto rows = perm_t.index_select(0, words.select(1, 3));
      auto idx = words.select(1, 5);
      auto cls = torch::tensor(active, torch::kLong).to(dev);
      pairs = torch::stack({cls, rows.slice(0, 0, K, 2), idx.slice(0, 0, K, 2), rows.slice(0, 1, K, 2),
                            idx.slice(0, 1, K, 2)},
                           1);
    } else {
      pairs = torch::empty({0, 5}, lopt);
    }

    ctx->saved_data["Q"] = Q;
    ctx->saved_data["perm"] = perm_t;
    ctx->saved_data["sel"] = sel_buf;
    ctx->saved_data["sel_mem"] = sel_mem;
    ctx->saved_data["num_active"] = static_cast<int64_t>(active.size());
    ctx->saved_data["n"] = std::max(n_distinct, 1.0);
    ctx->saved_data["lambda_r"] = options.lambda_r();
    ctx->saved_data["lambda_d"] = options.lambda_d();
    ctx->saved_data["in_dtype"] = static_cast<int64_t>(pred.scalar_type());
    ctx->saved_data["in_shape"] = pred.sizes().vec();
    ctx->saved_data["out_device"] = out_dev;
    auto out_pairs = pairs.to(out_dev);
    ctx->mark_non_differentiable({out_pairs});
    return {R.to(out_dev, ct), Dv.to(out_dev, ct), total.to(out_dev), out_pairs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto Q = ctx->saved_data["Q"].toTensor();
    auto perm = ctx->saved_data["perm"].toTensor();
    auto sel_buf = ctx->saved_data["sel"].toTensor();
    auto sel_mem = ctx->saved_data["sel_mem"].toTensor();
    const int64_t num_active = ctx->saved_data["num_active"].toInt();
    const double n = ctx->saved_data["n"].toDouble();
    const double lr = ctx->saved_data["lambda_r"].toDouble();
    const double ld = ctx->saved_data["lambda_d"].toDouble();
    const auto in_dtype = static_cast<torch::ScalarType>(ctx->saved_data["in_dtype"].toInt());
    const auto in_shape = ctx->saved_data["in_shape"].toIntVector();
    const int64_t B = Q.size(0), D = Q.size(1);
    auto grad = torch::zeros({B, D}, Q.options());
    c10::OptionalDeviceGuard device_guard;
    if (Q.is_cuda()) device_guard.reset_device(Q.device());
    if (num_active > 0) {
      if (Q.is_cuda()) {
#ifdef MDD_WITH_CUDA
        std::vector<torch::Tensor> gs;
        for (int i = 0; i < 3; ++i) {
          gs.push_back(grad_outputs[i].defined() ? grad_outputs[i].reshape({}).to(Q.device(), torch::kDouble)
                                                 : torch::zeros({}, Q.options().dtype(torch::kDouble)));
        }
        auto g = torch::stack(gs).contiguous();
        minimax_detail::cuda_backward(reinterpret_cast<const Selection*>(sel_buf.data_ptr()), perm.data_ptr<int64_t>(),
                                      num_active, Q.data_ptr(), sel_mem.data_ptr(), Q.scalar_type() == torch::kDouble,
                                      D, g.data_ptr<double>(), lr, ld, n, grad.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream(Q.device().index()).stream());
#endif
      } else {
        auto gv = [&](int i) { return grad_outputs[i].defined() ? grad_outputs[i].item().toDouble() : 0.0; };
        const double coef[2] = {-(gv(0) + lr * gv(2)) / n, (gv(1) + ld * gv(2)) / n};
        const auto* sel = reinterpret_cast<const Selection*>(sel_buf.data_ptr());
        AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "minimax_backward", [&] {
          cpu_backward<scalar_t>(sel, perm.data_ptr<int64_t>(), num_active, Q.data_ptr<scalar_t>(),
                                 sel_mem.data_ptr<scalar_t>(), D, coef, grad.data_ptr<scalar_t>());
        });
      }
    }
    auto gp = grad.view(in_shape).to(ctx->saved_data["out_device"].toDevice(), in_dtype);
    return {gp, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

void check_inputs(const torch::Tensor& pred, const torch::Tensor& labels) {
  if (!pred.defined() || !labels.defined()) throw Error("minimax_loss: undefined pred_x0 or labels");
  if (pred.dim() < 2 || !pred.is_floating_point()) {
    throw Error(fmt::format("minimax_loss: pred_x0 must be a floating point [B, ...] tensor, got {} {}",
                            c10::toString(pred.scalar_type()), shape_str(pred.sizes())));
  }
  if (labels.dim() != 1 || labels.size(0) != pred.size(0)) {
    throw Error(fmt::format("minimax_loss: labels {} must be [B] with B = pred_x0.size(0) = {}",
                            shape_str(labels.sizes()), pred.size(0)));
  }
  if (labels.is_floating_point() || labels.is_complex() || labels.scalar_type() == torch::kBool) {
    throw Error(fmt::format("minimax_loss: labels must be integer, got {}", c10::toString(labels.scalar_type())));
  }
}

}  // namespace

MinimaxTerms minimax_loss(const torch::Tensor& pred_x0, const torch::Tensor& labels, const MemoryBank& real,
                          const MemoryBank& generated, const MinimaxLossOptions& options) {
  check_inputs(pred_x0, labels);
  const int64_t D = pred_x0.size(0) > 0 ? pred_x0.numel() / pred_x0.size(0)
                                         : c10::multiply_integers(pred_x0.sizes().slice(1));
  check_bank(real, "real", D, pred_x0);
  check_bank(generated, "generated", D, pred_x0);
  auto out = MinimaxFunction::apply(pred_x0, labels, &real, &generated, options);
  MinimaxTerms t;
  t.representativeness = out[0];
  t.diversity = out[1];
  t.total = out[2];
  t.pairs = out[3];
  return t;
}

torch::Tensor bank_cosine(const torch::Tensor& rows, const MemoryBank& bank, int64_t label) {
  torch::NoGradGuard no_grad;
  if (!rows.defined() || rows.dim() < 1) throw Error("bank_cosine: rows must be [N, ...]");
  const int64_t n = rows.size(0);
  auto q = rows.detach().reshape({n, -1}).to(torch::kDouble);
  auto m = bank.get(label);
  if (m.size(0) == 0) return torch::empty({n, 0}, torch::kDouble).to(rows.device());
  m = m.reshape({m.size(0), -1}).to(rows.device(), torch::kDouble);
  if (m.size(1) != q.size(1)) {
    throw Error(fmt::format("bank_cosine: rows have {} elements each, bank items {}", q.size(1), m.size(1)));
  }
  auto inv = [](const torch::Tensor& x) {
    auto nn = x.norm(2, {1});
    return torch::where(nn >= minimax_detail::kNormEps, 1.0 / nn, torch::zeros_like(nn));
  };
  return q.mm(m.t()) * inv(q).unsqueeze(1) * inv(m).unsqueeze(0);
}

}  // namespace mdd
