"""Print what CMakeLists.txt needs to know about the installed torch, one item a line."""
import os

import torch
from torch.utils.cpp_extension import include_paths

print(torch.__version__)
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.version.cuda)
print(os.path.join(os.path.dirname(torch.__file__), "lib"))
for path in include_paths():
    print(path)
