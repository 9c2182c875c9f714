# Model tests (DiT/DiffFit; the VAE and evaluation-network tests join this binary).
mdd_add_test(test_models
  SOURCES
    test_dit.cpp
  AREAS util io models)
