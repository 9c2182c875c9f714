# Included before find_package(Torch) by mdd's own build and by the installed mddConfig.cmake.
# TorchConfig's find_library() calls search the system paths before the LibTorch's own lib/, so
# with Debian's libtorch-dev also installed a PyPI/standalone LibTorch would link the system's
# libc10/libtorch (a mixed-version crash at start-up). Point them at the chosen LibTorch first.
foreach(_mdd_p IN LISTS CMAKE_PREFIX_PATH Torch_DIR)
  foreach(_mdd_cfg "${_mdd_p}/Torch/TorchConfig.cmake" "${_mdd_p}/TorchConfig.cmake")
    if(EXISTS "${_mdd_cfg}" AND NOT _mdd_torch_lib)
      get_filename_component(_mdd_cfg_dir "${_mdd_cfg}" DIRECTORY)
      foreach(_mdd_up "../../.." "../../../..")
        get_filename_component(_mdd_root "${_mdd_cfg_dir}/${_mdd_up}" ABSOLUTE)
        if(EXISTS "${_mdd_root}/lib/libc10${CMAKE_SHARED_LIBRARY_SUFFIX}" AND NOT _mdd_torch_lib)
          set(_mdd_torch_lib "${_mdd_root}/lib")
        endif()
      endforeach()
    endif()
  endforeach()
endforeach()
if(_mdd_torch_lib)
  foreach(_mdd_l c10 c10_cuda torch torch_cpu torch_cuda)
    string(TOUPPER "${_mdd_l}" _mdd_L)
    set(_mdd_f "${_mdd_torch_lib}/lib${_mdd_l}${CMAKE_SHARED_LIBRARY_SUFFIX}")
    if(EXISTS "${_mdd_f}")
      set(${_mdd_l}_LIBRARY "${_mdd_f}" CACHE FILEPATH "LibTorch library (mdd: from the chosen LibTorch)")
      set(${_mdd_L}_LIBRARY "${_mdd_f}" CACHE FILEPATH "LibTorch library (mdd: from the chosen LibTorch)")
    endif()
  endforeach()
endif()
# A CUDA LibTorch's CMake adds -gencode flags for TORCH_CUDA_ARCH_LIST, by default every
# architecture the wheel was built for, and CUDA 13's nvcc rejects the oldest (sm_50). Default to
# Ampere and Hopper; set TORCH_CUDA_ARCH_LIST (variable or environment) to build for others.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
