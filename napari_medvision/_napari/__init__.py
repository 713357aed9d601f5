"""napari side of medvision: the npe2 reader, writers and sample data (the only code importing napari/Qt).

The Volume <-> layer conversions live in :mod:`.layers` and need no running viewer.
"""

import sys

# torch imports triton lazily (from torch.optim, via torch._dynamo). Loaded after napari has made
# an OpenGL context on Mesa's llvmpipe (Xvfb, remote desktops), triton's bundled LLVM clashes
# with Mesa's and the process segfaults. Nothing napari-side compiles kernels, so torch is told
# triton is absent (an ImportError it handles) unless something already imported it.
if "triton" not in sys.modules:
    sys.modules["triton"] = None
