"""Device markers shared by the test modules (imported by name: ``from devices import cuda``)."""

import pytest
import torch

#: skip a test where CUDA is not available (CI never has a GPU; the device sessions run these)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
