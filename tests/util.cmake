# Process-level utilities (host allocator settings).
mdd_add_test(test_util SOURCES test_util.cpp AREAS util)
