import os

import pytest
import torch

# Two shared cores: more threads only add contention.
torch.set_num_threads(int(os.environ.get("DAAM_FAST_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def sd_pipe():
    from daam_fast.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def sdxl_pipe():
    from daam_fast.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()
