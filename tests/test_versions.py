"""diffusers versions: processors copied step by step run only on the releases the matrix checked; a newer diffusers
gets the installed processors' output and self-normalised maps (exact); too old a diffusers for a feature says
which version it needs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import diffusers
import pytest
import torch

from daam_fast import trace
from daam_fast.processors import versions
from daam_fast.processors.versions import FLUX_MIN, DiffusersVersionError, diffusers_version

PROMPT = "a red circle and a blue square"
FLUX_OK = diffusers_version()[:2] >= FLUX_MIN


def _run(pipe, **kw):
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", guidance_scale=3.0, **kw)
    return torch.from_numpy(out.images)


def _traced(pipe, **kw):
    with trace(pipe) as tc:
        procs = [m.processor for m in tc._modules]
        image = _run(pipe, **kw)
        maps = tc.compute_global_heat_map().heat_maps
    return image, maps, procs


def _sd3():
    from tests.fixtures.pipelines import tiny_sd3_pipeline

    return tiny_sd3_pipeline(), dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16)


def _flux():
    from tests.fixtures.pipelines import tiny_flux_pipeline

    return tiny_flux_pipeline(), dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16)


def _sd(sd_pipe):
    return sd_pipe, dict(height=32, width=32, num_inference_steps=3)


FAMILIES = [
    "sd",
    "sd3",
    pytest.param("flux", marks=pytest.mark.skipif(not FLUX_OK, reason="Flux needs diffusers 0.35")),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_newer_diffusers_calls_installed_processor_and_stays_exact(request, family, monkeypatch, caplog):
    pipe, kw = _sd(request.getfixturevalue("sd_pipe")) if family == "sd" else {"sd3": _sd3, "flux": _flux}[family]()
    plain = _run(pipe, **kw)
    checked_image, checked_maps, checked_procs = _traced(pipe, **kw)
    assert all(_copies_body(p) for p in checked_procs), "the checked release should reproduce the stock bodies"

    monkeypatch.setattr(diffusers, "__version__", "0.99.0")
    monkeypatch.setattr(versions, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="daam_fast.processors.versions"):
        image, maps, procs = _traced(pipe, **kw)
        _traced(pipe, **kw)
    assert not any(_copies_body(p) for p in procs)
    # The installed processor made the output: the image is the untraced one bit for bit; the maps, normalised by
    # the capture itself instead of from the kernel's lse, equal the checked path's to fp32 rounding.
    assert torch.equal(image, plain) and torch.equal(checked_image, plain)
    torch.testing.assert_close(maps, checked_maps, rtol=1e-5, atol=1e-6)
    logged = [r.getMessage() for r in caplog.records if r.name == "daam_fast.processors.versions"]
    assert len(logged) == 1 and "diffusers 0.99.0 is not a release daam_fast's processors" in logged[0], logged


def _copies_body(proc) -> bool:
    # UNet / SD3: reproduces_original; Flux: body_checked (its backend is checked per call).
    return bool(getattr(proc, "reproduces_original", False) or getattr(proc, "body_checked", False))


def test_checked_releases_are_the_tested_stacks():
    # The series whose bodies are copied are exactly those of the pinned stack and the compat stacks, and the
    # installed diffusers (one of them) runs the copies.
    root = Path(__file__).resolve().parents[1]
    pins = [root / "constraints.txt", *sorted((root / "compat").glob("*.txt"))]
    found = {
        tuple(int(x) for x in m.groups())
        for p in pins
        for m in re.finditer(r"^diffusers==(\d+)\.(\d+)", p.read_text(), re.M)
    }
    assert found == set(versions.TESTED_DIFFUSERS)
    assert diffusers_version()[:2] in versions.TESTED_DIFFUSERS
    assert versions.reproduces_bodies()


@pytest.mark.skipif(not FLUX_OK, reason="Flux pipelines need diffusers 0.35 to be built here")
def test_flux_on_too_old_diffusers_names_the_minimum(monkeypatch):
    pipe, _ = _flux()
    before = [m.processor for _, _, m in trace(pipe).family.locate(pipe.transformer)]
    monkeypatch.setattr(diffusers, "__version__", "0.34.0")
    with pytest.raises(
        DiffusersVersionError, match=r"tracing Flux .* needs diffusers >= 0\.35; installed is diffusers"
    ):
        with trace(pipe):
            pass
    after = [m.processor for _, _, m in trace(pipe).family.locate(pipe.transformer)]
    assert all(a is b for a, b in zip(before, after, strict=True)), "processors were not restored"


@pytest.mark.skipif(FLUX_OK, reason="this diffusers has Flux's processors")
def test_flux_missing_on_installed_diffusers_names_the_minimum():
    from daam_fast.processors.joint import FluxCaptureProcessor

    with pytest.raises(DiffusersVersionError, match=r"needs diffusers >= 0\.35"):
        FluxCaptureProcessor(object(), None, 0)


def test_version_parsing(monkeypatch):
    for text, parsed in [
        ("0.42.1", (0, 42, 1)),
        ("0.43.0.dev0", (0, 43, 0)),
        ("1.0", (1, 0, 0)),
        ("0.36.0rc1", (0, 36, 0)),
    ]:
        monkeypatch.setattr(diffusers, "__version__", text)
        assert diffusers_version() == parsed
