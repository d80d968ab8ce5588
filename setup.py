"""Build glue. Package metadata lives in pyproject.toml; this file adds the optional CUDA extension
``daam_fast._C`` built from csrc/ (see csrc/README.md).

``DAAM_FAST_BUILD_CUDA`` unset: build the extension when torch is importable at build time, is a CUDA build
(``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``); otherwise install the pure-Python package.
``DAAM_FAST_BUILD_CUDA=1``: build it or fail with the reason. ``DAAM_FAST_BUILD_CUDA=0``: never build it.
pip builds in an isolated environment without torch by default, so a CUDA build needs
``pip install --no-build-isolation``. Target architectures come from ``TORCH_CUDA_ARCH_LIST`` (read by torch's
BuildExtension), e.g. ``TORCH_CUDA_ARCH_LIST="8.0;9.0"``; unset, torch targets the GPUs it sees.
"""

import importlib.util
import logging
import os
from pathlib import Path

from setuptools import setup

log = logging.getLogger("daam_fast.setup")
ROOT = Path(__file__).resolve().parent


def _build_config():
    # By path: importing the daam_fast package would import torch (and need it) before we know we want it.
    path = ROOT / "daam_fast" / "kernels" / "cuda_build.py"
    spec = importlib.util.spec_from_file_location("_daam_fast_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension_kwargs(environ=os.environ) -> dict:
    """``ext_modules`` and ``cmdclass`` for setup() when the CUDA extension is to be built, else ``{}``.

    Raises RuntimeError when ``DAAM_FAST_BUILD_CUDA=1`` forces a build that cannot work.
    """
    cfg = _build_config()
    flag = environ.get(cfg.BUILD_ENV, "").strip()
    if flag == "0":
        log.info("%s=0: not building %s", cfg.BUILD_ENV, cfg.EXT_MODULE)
        return {}
    forced = flag == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if forced:
            raise RuntimeError(
                f"{cfg.BUILD_ENV}=1 but torch is not importable at build time ({exc}): install a CUDA build of "
                "torch first and use `pip install --no-build-isolation`"
            ) from exc
        log.info("torch not importable at build time: not building %s", cfg.EXT_MODULE)
        return {}
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        missing = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    else:
        missing = None
    if missing:
        if forced:
            raise RuntimeError(f"{cfg.BUILD_ENV}=1 but {missing}")
        log.info("not building %s: %s", cfg.EXT_MODULE, missing)
        return {}
    ext = CUDAExtension(
        name=cfg.EXT_MODULE,
        sources=list(cfg.SOURCES),
        include_dirs=[str(ROOT / "csrc")],
        depends=[f"csrc/{p.name}" for p in sorted((ROOT / "csrc").iterdir()) if p.suffix in (".h", ".cuh")],
        extra_compile_args={"cxx": list(cfg.CXX_FLAGS), "nvcc": list(cfg.NVCC_FLAGS)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


# setuptools' PEP 517 backend and `python setup.py` both run this file as __main__; tests import it.
if __name__ == "__main__":
    setup(**cuda_extension_kwargs())
