#pragma once
/// \file
/// Umbrella header: everything in the mdd public API.

#include "mdd/version.h"
#include "mdd/util/error.h"
#include "mdd/util/progress.h"
#include "mdd/io/safetensors.h"
#include "mdd/io/torch_checkpoint.h"
#include "mdd/io/state_dict.h"
#include "mdd/models/dit.h"
#include "mdd/models/difffit.h"
#include "mdd/models/codec.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/diffusion/schedule.h"
#include "mdd/diffusion/gaussian_diffusion.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/minimax/memory_bank.h"
#include "mdd/minimax/minimax_loss.h"
