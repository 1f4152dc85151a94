// Placeholder until the masked_optim kernels land.
#include <torch/library.h>
