// Builds against the installed mdd package and runs one DiT forward pass.
#include <iostream>

#include <mdd/mdd.h>

int main() {
  torch::manual_seed(0);
  mdd::DiT model(mdd::dit_options("DiT-S/8", /*input_size=*/16, /*num_classes=*/10));
  model->eval();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 4, 16, 16});
  auto t = torch::tensor({10, 500}, torch::kLong);
  auto y = torch::tensor({int64_t{3}, model->null_class()}, torch::kLong);
  auto out = model->forward(x, t, y);
  std::cout << "mdd " << mdd::version() << ": DiT-S/8 forward -> " << out.sizes() << "\n";
  return out.sizes() == torch::IntArrayRef({2, 8, 16, 16}) ? 0 : 1;
}
