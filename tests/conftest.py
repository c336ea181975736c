"""Session setup. The environment variables have to be set before any test module imports torch and, through
torch._dynamo, triton."""
import os

# Triton's CPU interpreter multiplies its blocks with numpy, whose OpenBLAS threads fight torch's for the CI
# machine's 2 cores: the kernel tests ran 4x slower with them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Without a GPU Triton can only run on its CPU interpreter, and triton fixes that choice when it is first imported
# (see kernels/__init__.py). This only selects the interpreter: CPU tensors still take the fast torch path outside
# kernels.force("triton").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Wall-clock deadlines make property tests flaky on a loaded 2-core CI machine; correctness is what they check.
settings.register_profile("project", deadline=None, max_examples=int(__import__("os").environ.get("HYPOTHESIS_EXAMPLES", 50)))
settings.load_profile("project")
