// Filled by the torch checkpoint work (load_torch_checkpoint / load_weights).
#include <gtest/gtest.h>
