#include "mdd/train/ema.h"

#include <torch/torch.h>

#include "mdd/util/error.h"

namespace mdd {

void update_ema(torch::nn::Module& ema, const torch::nn::Module& model, double decay) {
  if (!(decay >= 0.0 && decay <= 1.0)) throw Error("update_ema: decay must lie in [0, 1], got " + std::to_string(decay));
  torch::NoGradGuard no_grad;
  auto ema_params = ema.named_parameters(/*recurse=*/true);
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    auto* target = ema_params.find(item.key());
    if (target == nullptr) throw Error("update_ema: EMA model has no parameter '" + item.key() + "'");
    if (target->sizes() != item.value().sizes())
      throw Error("update_ema: parameter '" + item.key() + "' has shape " + c10::str(target->sizes()) +
                  " in the EMA model and " + c10::str(item.value().sizes()) + " in the model");
    // ema.mul_(decay).add_(p, alpha = 1 - decay), the reference's exact operation order.
    target->mul_(decay).add_(item.value().detach(), 1.0 - decay);
  }
}

}  // namespace mdd
