mdd_add_test(test_pipeline SOURCES test_pipeline.cpp AREAS util io models diffusion minimax data eval train pipeline dist)
