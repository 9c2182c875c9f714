#pragma once
/// \file
/// Evaluation of a (distilled) training set: train fresh classifiers on it, report top-1 accuracy
/// on a real test set. Two protocol presets, each overridable field by field:
///
/// - "idc" (Minimax-Diffusion / IDC train.py, ImageNet subsets at 224 px): ResNetAP-10, instance
///   norm, SGD(lr 0.01, momentum 0.9, wd 5e-4), batch 64, MultiStepLR x0.2 at [2E/3, 5E/6],
///   E = ipc_epoch(ipc), RandomResizedCrop(0.5-1) + flip + ColorJitter(0.4) + Lighting(0.1),
///   CutMix (beta 1) on every batch, ImageNet mean/std, test every max(1, E/100) epochs;
///   "best" = best test accuracy over those evaluations, "last" = the final one.
/// - "dc" (DC/DSA, VICO-UoE/DatasetCondensation utils.py evaluate_synset, 28/32 px): ConvNet-3,
///   width 128, instance norm, avg pooling, in_channels = the images' channels; SGD(lr 0.01,
///   momentum 0.9, wd 5e-4), batch 256, E = 300 -> E + 1 passes, after pass E/2 + 1 the lr is x0.1
///   and the optimiser is re-created (momentum reset), no augmentation; tested once at the end
///   (best = last). Normalisation = the test set's per-channel mean/std unless given.
///
/// Determinism: repeat r uses seed + r for network init, shuffling and augmentation (explicit
/// generators, never the global RNG); on CPU the result is a function of the seed.

#include <cstdint>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/modules/container/any.h>
#include <torch/types.h>

#include "mdd/data/labeled_images.h"
#include "mdd/dist/process_group.h"
#include "mdd/export.h"
#include "mdd/util/option_check.h"
#include "mdd/util/progress.h"

namespace mdd {

/// The two evaluation recipes: `kIdc` (the paper's: ResNet-AP-10 at 224 px, IDC augmentation) and
/// `kDc` (the DC benchmark's ConvNet-3 at the data's size). `EvalOptions::protocol` holds its name.
enum class EvalProtocol { kIdc, kDc };
/// "idc" / "dc".
MDD_API const char* eval_protocol_name(EvalProtocol p);
/// Inverse of `eval_protocol_name`; throws `mdd::Error` listing the valid names.
MDD_API EvalProtocol parse_eval_protocol(const std::string& name);

/// Evaluation options. Fields after `seed` are additions to the contract: 0 / "" / empty /
/// negative means "the protocol's value".
struct MDD_API EvalOptions {
  TORCH_ARG(std::string, protocol) = "idc";   ///< "idc" | "dc"
  TORCH_ARG(std::string, net) = "";           ///< "" = protocol default (idc: resnet_ap10, dc: convnet3)
  TORCH_ARG(int64_t, epochs) = 0;             ///< 0 = protocol rule (idc: ipc_epoch, dc: 300)
  TORCH_ARG(int64_t, repeats) = 1;
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(std::string, norm) = "";          ///< "" = instance
  TORCH_ARG(int64_t, width) = 0;              ///< 0 = reference width
  TORCH_ARG(int64_t, image_size) = 0;         ///< 0 = idc: 224, dc: the training images' size
  TORCH_ARG(int64_t, batch_size) = 0;         ///< 0 = idc: 64, dc: 256
  TORCH_ARG(double, lr) = 0;                  ///< 0 = 0.01
  TORCH_ARG(double, momentum) = -1;           ///< < 0 = 0.9
  TORCH_ARG(double, weight_decay) = -1;       ///< < 0 = 5e-4
  TORCH_ARG(std::string, augment) = "";       ///< "" = protocol; "none" | "idc" (idc's + CutMix)
  TORCH_ARG(int64_t, eval_every) = 0;         ///< epochs between tests; 0 = idc: E/100, dc: only at the end
  TORCH_ARG(int64_t, ipc) = 0;                ///< images per class for ipc_epoch; 0 = largest class count
  TORCH_ARG(int64_t, test_batch_size) = 500;  ///< no-grad test batches
  TORCH_ARG(std::vector<double>, mean) = {};  ///< normalisation; empty = protocol statistics
  TORCH_ARG(std::vector<double>, std) = {};
  TORCH_ARG(std::string, device) = "cpu";     ///< torch device string, e.g. "cuda:0"
};

/// The rules `Evaluator` (and `evaluate`) apply to the options (a known protocol, augment and norm,
/// repeats >= 1, non-negative sizes, matching mean/std); each broken one goes to `fail`.
MDD_API void check_options(const EvalOptions& o, const OptionFail& fail);

/// Top-1 accuracies in percent. `best`/`last` per repeat; `mean`/`std` over `best`
/// (population std, as the reference's np.std). Additions: `last_mean`/`last_std`, `seconds`.
struct MDD_API EvalResult {
  std::vector<double> best, last;
  double mean = 0, std = 0;
  double last_mean = 0, last_std = 0;
  double seconds = 0;  ///< wall time of all repeats
  int64_t reused = 0;  ///< repeats taken from an earlier run's repeat folder (`evaluate_sets`), not run again
};

/// An EvalResult from per-repeat best/last accuracies (mean, population std) and a wall time.
MDD_API EvalResult summarize_eval(std::vector<double> best, std::vector<double> last, double seconds);

/// The concrete recipe after applying a protocol preset and the overrides.
struct MDD_API ResolvedEval {
  std::string protocol, net, norm, augment;
  int64_t width = 0, image_size = 0, in_channels = 3, batch_size = 0, epochs = 0, eval_every = 0, ipc = 0;
  int64_t num_classes = 0;
  double lr = 0, momentum = 0, weight_decay = 0;
  std::vector<int64_t> milestones;  ///< epochs (1-based, idc) / passes (dc) after which lr decays
  double gamma = 0;                 ///< lr factor at each milestone
  bool reset_momentum = false;      ///< dc re-creates the optimiser at the decay
  std::vector<double> mean, std;
};

/// The reference's `ipc_epoch` (MMD argument.py): epochs for `ipc` images per class
/// (1 -> 3000, <=10 -> 2000, <=50 -> 1500, <=200 -> 1000, <=500 -> 500, else 300); for 100
/// classes x2/3 rounded down to a multiple of 100.
MDD_API int64_t ipc_epoch(int64_t ipc, int64_t num_classes = 10);

/// Trains fresh networks on a training set and tests them; any dataset, any `EvalOptions`.
class MDD_API Evaluator {
 public:
  explicit Evaluator(EvalOptions options = {});

  /// Resolves the preset for this training/test pair (throws mdd::Error on bad options/data).
  ResolvedEval resolve(const LabeledImages& train, const LabeledImages& test) const;

  /// `repeats` runs with seeds seed, seed+1, ...; progress stage "evaluate", one step per epoch.
  EvalResult run(const LabeledImages& train, const LabeledImages& test, const ProgressFn& progress = {}) const;
  /// The same repeats shared by the ranks of `group` (collective: every rank calls it with the
  /// same data): rank r runs repeats r, r + W, ...; every rank returns the whole result, equal to
  /// the single-process one since each repeat depends on its seed only. `seconds` is the wall time.
  EvalResult run(const LabeledImages& train, const LabeledImages& test, const dist::ProcessGroup& group,
                 const ProgressFn& progress = {}) const;

  /// One training run with `seed`; returns the trained network (eval mode) and fills best/last.
  torch::nn::AnyModule train_once(const LabeledImages& train, const LabeledImages& test, uint64_t seed,
                                  double* best, double* last, const ProgressFn& progress = {}) const;

  /// uint8 [N,H,W,C] -> the network's normalised float input [N,C',S,S] under `r`
  /// (grey images are replicated to 3 channels when the network takes 3).
  static torch::Tensor prepare(const torch::Tensor& images_u8, const ResolvedEval& r);

  /// Top-1 accuracy (%) of `net` on prepared inputs, in no-grad batches of `batch_size`.
  static double accuracy(torch::nn::AnyModule& net, const torch::Tensor& inputs, const torch::Tensor& labels,
                         int64_t batch_size);

  /// Penultimate embeddings `EvalNetImpl::embed` of prepared inputs, no-grad, batched.
  static torch::Tensor embed(torch::nn::AnyModule& net, const torch::Tensor& inputs, int64_t batch_size = 500);

  const EvalOptions& options() const { return options_; }

 private:
  EvalOptions options_;
};

/// One training set of `evaluate_sets`, with the options it is evaluated under.
struct MDD_API EvalSet {
  const LabeledImages* train = nullptr;  ///< not owned; must outlive the call
  EvalOptions options;
  std::string label = "evaluate";        ///< progress stage of its repeats: "<label> r/R"
};

/// Evaluates several training sets against one test set, sharing the work among the ranks of
/// `group` (collective: every rank calls it with the same sets). Every (set, repeat) pair is one
/// job and job j runs on rank j % W, so the ranks stay busy even when a set's repeats do not divide
/// among them. Every rank returns all results, in the order of `sets`; they equal those of
/// evaluating the sets one after another in one process, since each repeat depends on its seed
/// only. Each result's `seconds` is the wall time of the whole call. Throws mdd::Error on bad
/// options or data before any training starts.
MDD_API std::vector<EvalResult> evaluate_sets(const std::vector<EvalSet>& sets, const LabeledImages& test,
                                              const dist::ProcessGroup& group = {}, const ProgressFn& progress = {});

/// `evaluate_sets` that keeps every finished repeat, so an evaluation cut short (an `idc` repeat can
/// take hours) resumes where it stopped instead of starting again. The rank that runs a repeat writes
/// it at once, atomically, to `repeat_dir` as one small JSON file (`<label>-s<seed>-<key>.json`);
/// before any training, repeats already there are reused and only the others are shared among the
/// ranks. A file is reused only when its signature matches: the fingerprints of the training and
/// test sets, the resolved recipe, the device type and the repeat's seed. A damaged, foreign or
/// out-of-range file is ignored and its repeat runs again (and overwrites it). Files any rank finds
/// count, so ranks on separate disks resume too. `EvalResult::reused` says how many were reused;
/// progress reports a reused repeat as one finished event. An empty `repeat_dir` keeps nothing
/// (the overload above). Collective like the overload above: every rank passes the same sets and
/// the same `repeat_dir`. Throws mdd::Error when a finished repeat cannot be written.
MDD_API std::vector<EvalResult> evaluate_sets(const std::vector<EvalSet>& sets, const LabeledImages& test,
                                              const dist::ProcessGroup& group, const ProgressFn& progress,
                                              const std::string& repeat_dir);

/// `Evaluator(options).run(train, test, progress)`.
MDD_API EvalResult evaluate(const LabeledImages& train, const LabeledImages& test, const EvalOptions& options = {},
                            const ProgressFn& progress = {});

}  // namespace mdd
