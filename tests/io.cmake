mdd_add_test(test_io SOURCES test_safetensors.cpp test_torch_checkpoint.cpp AREAS util io)
