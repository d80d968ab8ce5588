import os
import sys
from pathlib import Path

import pytest
import torch

# The tiny-pipeline builders live in tests/fixtures and are imported as `tests.fixtures.pipelines` (as benchmarks
# and scripts do); `pytest` run as a script does not put the repository root on sys.path.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two shared cores: more threads only add contention.
torch.set_num_threads(int(os.environ.get("DAAM_FAST_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def sd_pipe():
    from tests.fixtures.pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def sdxl_pipe():
    from tests.fixtures.pipelines import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture
def pyplot(monkeypatch):
    """pyplot with no figures open, whose backend must not change; ``matplotlib.use`` raises, since a library must
    never switch the user's backend."""
    import matplotlib
    import matplotlib.pyplot as plt

    def forbidden(*args, **kwargs):
        raise AssertionError("matplotlib.use called: a library must not switch the user's backend")

    monkeypatch.setattr(matplotlib, "use", forbidden)
    plt.close("all")
    backend = matplotlib.get_backend()
    yield plt
    plt.close("all")
    assert matplotlib.get_backend() == backend


@pytest.fixture(scope="session")
def ui_server(sd_pipe, tmp_path_factory):
    """A running web UI (daam_fast.ui) on a free localhost port, serving the tiny SD pipeline as model "tiny"."""
    import threading

    from daam_fast.ui import make_server

    srv = make_server(
        "127.0.0.1",
        0,
        model="tiny",
        steps=2,
        size="32x32",
        pipelines={"tiny": sd_pipe},
        workdir=tmp_path_factory.mktemp("ui"),
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
