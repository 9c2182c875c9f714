# DiT and DiffFit tests (the VAE tests are test_vae in vae.cmake, the evaluation networks test_eval_nets in eval.cmake).
mdd_add_test(test_models
  SOURCES
    test_dit.cpp
  AREAS util io models)
# The fused DiT kernels are internal (src/models/fused_dit.h): their own tests include them.
target_include_directories(test_models PRIVATE ${PROJECT_SOURCE_DIR}/src)
# CUDA paths vs the CPU path (each test skips without a CUDA device; scripts/gpu-check.sh runs them).
mdd_add_test(test_cuda SOURCES test_cuda.cpp AREAS util io models diffusion dist)
