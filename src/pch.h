// Precompiled header for the library's translation units (not installed).
// LibTorch's headers dominate compile time; parsing them once per target keeps CI lean.
#pragma once
#include <torch/torch.h>
#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>
