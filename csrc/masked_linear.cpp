// Placeholder until the masked_linear kernels land.
#include <torch/library.h>
