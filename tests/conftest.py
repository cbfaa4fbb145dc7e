import pytest
import torch

import fxlava  # noqa: F401  (installs the Lava import shim before any test imports lava)
from tests.zoo import NAMES, load


@pytest.fixture(params=NAMES)
def zoo(request):
    """(name, zoo module, model, example input) for every zoo model."""
    z = load(request.param)
    torch.manual_seed(0)
    return request.param, z, z.build(), z.example_input()
