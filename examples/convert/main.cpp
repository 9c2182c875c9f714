// mdd_convert: turns a torch.save checkpoint (or a safetensors file) into safetensors, optionally
// picking a sub-dict of a training checkpoint and casting floating-point tensors.
//
//   mdd_convert DiT-XL-2-256x256.pt dit_xl2.safetensors
//   mdd_convert 0012000.pt minimax_ema.safetensors --entry ema --dtype f16
//   mdd_convert 0012000.pt --list --entry model
//   mdd_convert runs/x/pretrain/checkpoints/0004000.safetensors dit.safetensors --entry model   (mdd checkpoint)
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include <CLI/CLI.hpp>
#include <mdd/io/safetensors.h>
#include <mdd/io/torch_checkpoint.h>
#include <mdd/train/checkpoint.h>
#include <mdd/util/error.h>

namespace {

// The first bytes decide the format, as load_weights does (the file name does not matter).
bool is_torch_zip(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[2] = {0, 0};
  f.read(magic, 2);
  return f && magic[0] == 'P' && magic[1] == 'K';
}

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream s;
  s << '[';
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << ']';
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Convert a torch.save checkpoint (.pt/.pth/.bin) or safetensors file to safetensors.\n"
               "torch.save files are read with mdd's restricted unpickler: nothing in them is executed."};
  std::string in, out, entry, dtype = "keep";
  bool list = false;
  app.add_option("input", in, "input .pt / .pth / .bin (torch.save zip) or .safetensors")->required()->check(CLI::ExistingFile);
  app.add_option("output", out, "output .safetensors (not needed with --list)");
  app.add_option("--entry", entry,
                 "sub-dict of a training checkpoint: ema, model, opt, ... (default: ema if present, else model, "
                 "else the whole dict)");
  app.add_option("--dtype", dtype, "cast floating-point tensors: f32, f16, bf16 or keep")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "keep"}));
  app.add_flag("--list", list, "print keys, shapes and dtypes (and write only if an output is given)");
  CLI11_PARSE(app, argc, argv);
  if (out.empty() && !list) {
    std::fprintf(stderr, "error: an output file is required unless --list is given\n%s", app.help().c_str());
    return 2;
  }

  try {
    const bool torch_file = is_torch_zip(in);
    // safetensors: an mdd training checkpoint's "ema"/"model" tensors (prefix removed), else the file.
    if (!torch_file && !entry.empty() && entry != "ema" && entry != "model")
      throw mdd::Error(in + ": --entry for a safetensors file must be ema or model (an mdd training checkpoint)");
    mdd::io::TensorMap tensors = torch_file ? mdd::io::load_torch_checkpoint(in, entry)
                                            : mdd::load_model_weights(in, entry);

    if (dtype != "keep") {
      const torch::ScalarType to = dtype == "f32" ? torch::kFloat : dtype == "f16" ? torch::kHalf : torch::kBFloat16;
      for (auto& [k, v] : tensors)
        if (v.is_floating_point()) v = v.to(to);  // integer and bool tensors (steps, indices, masks) stay exact
    }

    int64_t total = 0;
    for (const auto& [k, v] : tensors) {
      total += v.numel();
      if (list) std::printf("%-60s %-10s %s\n", k.c_str(), c10::toString(v.scalar_type()), shape_of(v).c_str());
    }
    std::printf("%zu tensors, %lld parameters (%.2f M)\n", tensors.size(), (long long)total, double(total) / 1e6);

    if (!out.empty()) {
      mdd::io::save_safetensors(out, tensors, {{"format", "pt"}, {"source", in}, {"entry", entry}});
      std::printf("wrote %s\n", out.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
