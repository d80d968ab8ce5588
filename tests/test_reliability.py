"""Reliability: bad input fails early and clearly; faults, interrupts and long runs leave the user's pipeline exactly
as it was and lose no gathered maps; memory stays bounded; saves are atomic. See docs/RELIABILITY.md."""

import gc
import importlib
import json
import logging
import os
import threading
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from daam_fast import GlobalHeatMap, HeatMapFileError, SnapshotBudgetError, UnsupportedPipelineError, load, trace
from daam_fast.accumulate import snapshot_bytes, step_bytes
from daam_fast.kernels import dispatch, reference
from daam_fast.tokens import WordNotFoundError, tokenize_prompt
from tests.fixtures.pipelines import clip_tokenizer, tiny_sd_pipeline

PROMPT = "a red circle and a red square"
_trace_mod = importlib.import_module("daam_fast.trace")  # the module; ``daam_fast.trace`` is the Trace class


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _run(pipe, prompt=PROMPT, steps=1, size=64, **kw):
    """A tiny generation; ``output_type="latent"`` unless asked, so no VAE time is spent."""
    kw.setdefault("output_type", "latent")
    return pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=_gen(), **kw).images


def _processors(pipe):
    return {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}


def _assert_unpatched(pipe, before):
    """The pipeline is exactly as before tracing: same processor objects, no hooks, no shadowed methods."""
    after = _processors(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not pipe.unet._forward_pre_hooks
    assert "check_inputs" not in pipe.__dict__
    assert "postprocess" not in pipe.image_processor.__dict__
    assert pipe.unet not in _trace_mod._ACTIVE


# ------------------------------------------------------------------------------------------------ bad input
def test_word_queries_name_the_bad_value_and_the_valid_ones(sd_pipe):
    with trace(sd_pipe) as tc:
        _run(sd_pipe)
        gm = tc.compute_global_heat_map()
        _run(sd_pipe, prompt="")
        empty = tc.compute_global_heat_map()
    with pytest.raises(ValueError, match=r"'red' occurs 2 time\(s\).*occurrence=5 is out of range \(0\.\.1\)"):
        gm.compute_word_heat_map("red", occurrence=5)
    with pytest.raises(IndexError, match=r"word_idx -1 out of range: the prompt has 7 tokens \(0\.\.6\)"):
        gm.compute_word_heat_map("red", word_idx=-1)
    with pytest.raises(ValueError, match="'!!' has no word characters"):
        gm.compute_word_heat_map("!!")
    with pytest.raises(IndexError, match="token position 77 was not traced"):
        gm.token_heat_map(77)
    with pytest.raises(WordNotFoundError, match="'cat' is not in the prompt ''; the prompt has no words"):
        empty.compute_word_heat_map("cat")
    with pytest.raises(IndexError, match=r"word_idx 0 out of range: the prompt has 0 tokens"):
        empty.compute_word_heat_map("cat", word_idx=0)


def test_bad_trace_arguments_fail_at_construction_naming_the_valid_range(sd_pipe):
    before = _processors(sd_pipe)
    cases = [
        (
            dict(tokens=[3, 500]),
            r"tokens \[500\] out of range: the tokenizer's text window has 77 positions "
            r"\(valid 0\.\.76\)",
        ),
        (dict(tokens=[]), "tokens must be non-empty"),
        (dict(tokens=[-1]), "tokens must be non-empty key positions >= 0"),
        (dict(layers=[]), "layers selects nothing"),
        (dict(keep_records=0), "keep_records must be None .* or >= 1, got 0"),
        (dict(snapshots="layer"), r"unknown snapshots mode 'layer'; valid: None or \['step'\]"),
        (dict(max_snapshot_bytes=10), "pass snapshots='step' too"),
        (dict(backend="nope"), "unknown backend 'nope'; valid: .*'torch'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            trace(sd_pipe, **kwargs)
    _assert_unpatched(sd_pipe, before)  # nothing was patched by any of them


def test_tokens_beyond_the_text_fail_at_the_first_unet_call_and_unpatch(sd_pipe):
    # prompt_embeds of 10 positions: tokens=[70] is inside the tokenizer's window, but not inside this text.
    before = _processors(sd_pipe)
    embeds = torch.randn(1, 10, sd_pipe.text_encoder.config.hidden_size, generator=_gen())
    with pytest.raises(ValueError, match=r"tokens \[70\] out of range: the text has 10 positions \(valid 0\.\.9\)"):
        with trace(sd_pipe, tokens=[1, 70]) as tc:
            sd_pipe(
                prompt_embeds=embeds,
                guidance_scale=1.0,
                num_inference_steps=1,
                height=64,
                width=64,
                output_type="latent",
            )
    _assert_unpatched(sd_pipe, before)
    assert tc.records[-1].steps_seen == 0 and not tc.records[-1].slots  # raised before the first capture


def test_unsupported_pipelines_and_models_are_named(sd_pipe):
    from diffusers import UNet2DConditionModel

    no_cross = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=4,
    )
    with pytest.raises(UnsupportedPipelineError, match="UNet2DConditionModel has no cross-attention modules"):
        trace(SimpleNamespace(unet=no_cross, tokenizer=sd_pipe.tokenizer))
    with pytest.raises(UnsupportedPipelineError, match="SimpleNamespace has no tokenizer; supported are"):
        trace(SimpleNamespace(unet=sd_pipe.unet, tokenizer=None))
    with pytest.raises(UnsupportedPipelineError, match="cannot trace SimpleNamespace: supported are .*UNet"):
        trace(SimpleNamespace(unet=torch.nn.Linear(2, 2), tokenizer=sd_pipe.tokenizer))


def test_maps_asked_for_before_or_without_a_traced_step(sd_pipe):
    with trace(sd_pipe, steps=[5]) as tc:
        with pytest.raises(RuntimeError, match="no heat maps yet: call the pipeline inside"):
            tc.compute_global_heat_map()
        _run(sd_pipe, steps=2)  # steps 0 and 1 ran; step 5 (the only one selected) never did
        with pytest.raises(RuntimeError, match="traced no attention step"):
            tc.compute_global_heat_map()
        with pytest.raises(IndexError, match=r"record 3 out of range: 1 pipeline call\(s\) traced"):
            tc.compute_global_heat_map(record=3)
        with pytest.raises(ValueError, match="per-step maps need snapshots"):
            tc.compute_step_heat_maps()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_attention_inputs_are_flagged_not_silent(sd_pipe, caplog, tmp_path, poison):
    with trace(sd_pipe) as tc:
        _run(sd_pipe)
        clean = tc.compute_global_heat_map()
        attn2 = sd_pipe.unet.get_submodule(tc.layers[0].name)

        def poison_input(module, args):  # one query row of one traced layer goes non-finite
            x = args[0].clone()
            x[:, 0] = poison
            return (x, *args[1:])

        handle = attn2.register_forward_pre_hook(poison_input)
        try:
            _run(sd_pipe)
        finally:
            handle.remove()
        with caplog.at_level(logging.WARNING, logger="daam_fast.trace"):
            bad = tc.compute_global_heat_map()
    assert clean.meta["nonfinite"] is False and clean.heat_maps.isfinite().all()
    assert bad.meta["nonfinite"] is True and not bad.heat_maps.isfinite().all()
    assert any("NaN/inf" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert load(bad.save(tmp_path / "bad.safetensors")).meta["nonfinite"] is True  # the flag travels with the file


# ---------------------------------------------------------------------------------------------------- faults
class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_exception_inside_the_capture_restores_everything_and_keeps_partial_maps(sd_pipe, monkeypatch, exc):
    """A capture backend that raises in the middle of step 1: the exception leaves the attention processor, the
    UNet, the pipeline and the ``with`` block; everything is restored and step 0's maps stay readable."""
    calls = {"n": 0, "fail_at": None}

    def capture(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise exc("capture failed")
        return reference.capture_from_lse(*args, **kwargs)

    flaky = dispatch.Backend("flaky", -1, capture, reference.capture_self_normalising, devices=("cpu",))
    monkeypatch.setitem(dispatch._REGISTRY, "flaky", flaky)
    before = _processors(sd_pipe)
    baseline = _run(sd_pipe, steps=2, output_type="np")
    with trace(sd_pipe, backend="flaky"):
        _run(sd_pipe, steps=2)
    per_step = calls["n"] // 2
    calls.update(n=0, fail_at=per_step + 2)  # the second traced layer of step 1
    with pytest.raises(exc, match="capture failed"), trace(sd_pipe, backend="flaky") as tc:
        _run(sd_pipe, steps=2)
    _assert_unpatched(sd_pipe, before)
    rec = tc.records[-1]
    assert rec.interrupted and not rec.complete and rec.steps_seen == 2
    gm = tc.compute_global_heat_map()
    assert gm.meta["complete"] is False and gm.meta["nonfinite"] is False
    assert gm.compute_word_heat_map("circle").heatmap.isfinite().all()
    np.testing.assert_array_equal(_run(sd_pipe, steps=2, output_type="np"), baseline)


def test_exception_in_the_first_capture_leaves_no_maps_but_a_clear_error(sd_pipe, monkeypatch):
    def capture(*args, **kwargs):
        raise _Boom("capture failed")

    monkeypatch.setitem(dispatch._REGISTRY, "broken", dispatch.Backend("broken", -1, capture, capture))
    before = _processors(sd_pipe)
    with pytest.raises(_Boom), trace(sd_pipe, backend="broken") as tc:
        _run(sd_pipe)
    _assert_unpatched(sd_pipe, before)
    assert tc.records[-1].interrupted
    with pytest.raises(RuntimeError, match="traced no attention step"):  # not a division by zero heads
        tc.compute_global_heat_map()


# ------------------------------------------------------------------------------------------- nesting, reuse
def test_two_pipelines_traced_in_two_threads_do_not_mix(sd_pipe):
    other = tiny_sd_pipeline(seed=1)
    jobs = [(sd_pipe, "a red circle"), (other, "a blue square on green grass")]
    single = []
    for pipe, prompt in jobs:
        with trace(pipe) as tc:
            _run(pipe, prompt=prompt, steps=2, size=32)
            single.append(tc.compute_global_heat_map().heat_maps)
    befores = [_processors(p) for p, _ in jobs]
    barrier = threading.Barrier(2)
    results, errors = [[], []], []

    def work(i):
        pipe, prompt = jobs[i]
        try:
            for _ in range(2):
                with trace(pipe) as tc:
                    barrier.wait(timeout=60)  # both pipelines are patched at the same time
                    _run(pipe, prompt=prompt, steps=2, size=32)
                    results[i].append(tc.compute_global_heat_map().heat_maps)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread below
            barrier.abort()
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i in range(2):
        assert len(results[i]) == 2
        for maps in results[i]:
            assert torch.equal(maps, single[i])
        _assert_unpatched(jobs[i][0], befores[i])


def test_each_call_is_a_new_record_and_keep_records_bounds_them(sd_pipe):
    with trace(sd_pipe, keep_records=2) as tc:
        _run(sd_pipe, prompt="a red circle")
        first = tc.compute_global_heat_map().heat_maps
        _run(sd_pipe, prompt="a blue square")
        _run(sd_pipe, prompt="a red circle")
        assert len(tc.records) == 2
        assert [r.prompts for r in tc.records] == [["a blue square"], ["a red circle"]]
        # Nothing accumulates across calls: the same call again gives the same maps, not twice them.
        assert torch.equal(tc.compute_global_heat_map().heat_maps, first)
        assert tc.compute_global_heat_map(record=0).prompt == "a blue square"


def test_a_trace_object_can_be_entered_again_after_exit(sd_pipe):
    before = _processors(sd_pipe)
    tc = trace(sd_pipe)
    with tc:
        _run(sd_pipe, prompt="a red circle")
        first = tc.compute_global_heat_map().heat_maps
    _assert_unpatched(sd_pipe, before)
    with tc:
        with pytest.raises(RuntimeError, match="already being traced"), tc:
            pass
        assert all(type(p).__name__ == "UNetCrossAttnCaptureProcessor" for p in (m.processor for m in tc._modules))
        _run(sd_pipe, prompt="a blue square")
    _assert_unpatched(sd_pipe, before)
    assert [r.prompts for r in tc.records] == [["a red circle"], ["a blue square"]]
    assert torch.equal(tc.compute_global_heat_map(record=0).heat_maps, first)


# ------------------------------------------------------------------------------------------------ long runs
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS")
def test_200_generations_keep_memory_flat_and_leave_nothing_behind():
    pipe = tiny_sd_pipeline(seed=2)
    before = _processors(pipe)
    kw = dict(steps=1, size=32, guidance_scale=1.0)
    # One record at 32x32: latent 16x16, traced grids 16x16 and 8x8, all 77 positions (a full capture, so that
    # a leaked record would be large enough to see), fp32.
    record_bytes = 77 * (16 * 16 + 8 * 8) * 4
    with trace(pipe, keep_records=2, tokens=range(77)) as tc:  # 100 calls in one long-lived tracer
        for i in range(100):
            _run(pipe, **kw)
            maps = tc.compute_global_heat_map().heat_maps
            if i == 0:
                first = maps
            if i == 19:  # after warm-up: allocator pools, lazily built kernels, tokenizer caches
                gc.collect()
                rss0 = _rss_bytes()
        assert len(tc.records) == 2
        assert sum(s.buf.numel() * 4 for s in tc.records[-1].slots.values()) == record_bytes
    for _ in range(100):  # and 100 tracers, one per call
        with trace(pipe, tokens=range(77)) as tc:
            _run(pipe, **kw)
            last = tc.compute_global_heat_map().heat_maps
    gc.collect()
    growth = _rss_bytes() - rss0
    # 180 measured calls: keeping every record would add 180 x 98,560 B = 17.7 MB; the bound is 8 MB, under half
    # of that (a simulated leak of every record measured 87 kB of RSS per call); without a leak the growth
    # measured -1 MB here (allocator noise).
    assert growth < 8 * 2**20, f"RSS grew {growth} bytes over 180 traced generations"
    assert torch.equal(last, first)  # the 200th map is the first: nothing accumulated anywhere
    _assert_unpatched(pipe, before)
    ref = weakref.ref(pipe)
    del pipe, tc, before
    gc.collect()
    assert ref() is None, "something still holds the pipeline: " + repr(gc.get_referrers(ref())[:3])


# --------------------------------------------------------------------------------------------- memory guard
def test_snapshots_over_the_limit_are_refused_before_any_capture(sd_pipe):
    before = _processors(sd_pipe)
    with pytest.raises(SnapshotBudgetError) as info:
        with trace(sd_pipe, snapshots="step", max_snapshot_bytes=50_000) as tc:
            _run(sd_pipe, steps=2)
    # 2 steps x (1 conditional row x the prompt's 9 text positions x (32x32 + 16x16) queries x 4 bytes) = 92,160.
    assert "would need 92160 bytes (2 steps x 46080 bytes)" in str(info.value)
    assert "max_snapshot_bytes=50000" in str(info.value)
    assert isinstance(info.value, MemoryError)
    _assert_unpatched(sd_pipe, before)
    assert tc.records[-1].steps_seen == 0 and not tc.records[-1].slots


@pytest.mark.parametrize(
    "fixture,mode,size",
    [
        ("sd_pipe", {}, 48),
        ("sd_pipe", {"per_layer": True}, 48),
        ("sd_pipe", {"daam_compat": True}, 48),
        ("sd_pipe", {"mid_block": True, "per_layer": True, "negative": True}, 40),  # mid layer, CFG rows
        ("sdxl_pipe", {}, 48),
    ],
)
def test_snapshot_estimate_is_exact(request, fixture, mode, size):
    """The refusal's byte count is what the snapshots then really take: one byte less is refused, the exact
    amount is accepted."""
    pipe = request.getfixturevalue(fixture)
    with trace(pipe, **mode) as tc:
        _run(pipe, size=size)
        rec = tc.records[-1]
        actual = sum(s.buf.numel() * s.buf.element_size() for s in rec.slots.values())
        acc = tc.accumulator
        rows, n_tokens = rec.rows.stop - rec.rows.start, len(rec.positions)
        assert n_tokens == 9  # the prompt's positions (start, 7 tokens, end), the default capture
        assert step_bytes(acc.options, acc.layers, rec.latent_hw, rows, n_tokens) == actual
        if mode.get("mid_block"):
            assert tc.layers[-1].block == "mid" and tc.layers[-1].idx in rec.slots
    with (
        pytest.raises(SnapshotBudgetError),
        trace(pipe, snapshots="step", max_snapshot_bytes=2 * actual - 1, **mode),
    ):
        _run(pipe, size=size, steps=2)
    with trace(pipe, snapshots="step", max_snapshot_bytes=2 * actual, **mode) as tc:
        _run(pipe, size=size, steps=2)
        assert snapshot_bytes(tc.records[-1]) == actual  # one copy, after step 0; step 1 is the live buffer


def test_step_snapshots_give_each_steps_own_maps(sd_pipe):
    with trace(sd_pipe, snapshots="step") as tc:
        _run(sd_pipe, steps=3)
        total = tc.compute_global_heat_map().heat_maps
        per_step = tc.compute_step_heat_maps()
        with pytest.raises(ValueError, match=r"step 7 has no maps of its own; steps with maps: \[0, 1, 2\]"):
            tc.compute_global_heat_map(step=7)
    assert list(per_step) == [0, 1, 2]
    assert all(gm.heat_maps.shape == total.shape and gm.meta["step"] == s for s, gm in per_step.items())
    scale = float(total.abs().max())
    summed = sum(gm.heat_maps for gm in per_step.values())
    torch.testing.assert_close(summed, total, rtol=1e-5, atol=1e-6 * scale)
    for s in (0, 1):  # step 0: the first snapshot; step 1: a difference of two snapshots (step 2 is the sum above)
        with trace(sd_pipe, steps=[s]) as only:
            _run(sd_pipe, steps=3)
            expected = only.compute_global_heat_map().heat_maps
        torch.testing.assert_close(per_step[s].heat_maps, expected, rtol=1e-5, atol=1e-6 * scale)
    with trace(sd_pipe, snapshots="step", steps=[0, 2]) as some:  # an untraced step between two traced ones
        _run(sd_pipe, steps=3)
        selected = some.compute_step_heat_maps()
    assert list(selected) == [0, 2]
    for s in (0, 2):
        torch.testing.assert_close(selected[s].heat_maps, per_step[s].heat_maps, rtol=1e-5, atol=1e-6 * scale)


# --------------------------------------------------------------------------------------------------- saving
@pytest.fixture()
def gm():
    tokens = tokenize_prompt(clip_tokenizer(), "a red cat")
    maps = torch.rand(tokens.n_tokens(), 4, 6, generator=_gen())
    return GlobalHeatMap(tokens, maps, meta={"model": "test"})


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_an_interrupted_save_leaves_no_partial_file(gm, tmp_path, monkeypatch, exc):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        raise exc("disk full")

    path = tmp_path / "maps.safetensors"
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(exc):
        gm.save(path)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no final file, no temporary left
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    gm.save(path)
    good = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(exc):
        GlobalHeatMap(gm.tokens, gm.heat_maps * 2, meta={}).save(path)
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]  # the previous file is intact
    assert torch.equal(load(path).heat_maps, gm.heat_maps)


def test_saved_file_mode_follows_the_umask(gm, tmp_path):
    old = os.umask(0o027)
    try:
        path = gm.save(tmp_path / "maps.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # as open() would create it, not a temp file's 0600


def test_damaged_files_not_covered_elsewhere(gm, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(HeatMapFileError, match="corrupt or truncated"):
        load(tmp_path / "empty.safetensors")
    header = {"format": "daam_fast.heatmap", "format_version": "1", "positions": "[0, 1]", "meta": "{}"}
    save_file({"heat_maps": torch.zeros(2, 3, 3)}, str(tmp_path / "no_tokens.safetensors"), metadata=header)
    with pytest.raises(HeatMapFileError, match="corrupt or truncated"):  # a header field is missing
        load(tmp_path / "no_tokens.safetensors")
    path = gm.save(tmp_path / "maps.safetensors")
    full = load(path)
    header = {
        "format": "daam_fast.heatmap",
        "format_version": "1",
        "tokens": json.dumps(full.tokens.to_dict()),
        "positions": "[0, 1, 2]",
        "meta": "{}",
    }
    save_file({"heat_maps": torch.zeros(5, 3, 3)}, str(tmp_path / "mismatch.safetensors"), metadata=header)
    with pytest.raises(HeatMapFileError, match=r"maps \(5, 3, 3\) do not match 3 positions"):
        load(tmp_path / "mismatch.safetensors")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")
