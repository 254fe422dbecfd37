import os

# Triton kernels run in Triton's CPU interpreter unless the caller chose otherwise (a GPU machine
# can export TRITON_INTERPRET=0). Must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
