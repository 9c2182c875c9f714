# Diffusion schedule/steps/sampler (no network needed).
mdd_add_test(test_diffusion SOURCES test_diffusion.cpp AREAS util io diffusion dist)
# Golden loops, CFG sampling and the training loss on the dit_small fixture network.
mdd_add_test(test_diffusion_dit SOURCES test_diffusion_dit.cpp AREAS util io models diffusion dist)
