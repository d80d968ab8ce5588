"""Full traced runs on tiny pipelines against a naive float64 DAAM; image equality; restoration."""

import pytest
import torch
from naive import NaiveRecorder

from daam_fast import UnsupportedPipelineError, trace

PROMPT = "a red circle and a blue square"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _run(pipe, **kw):
    kw.setdefault("num_inference_steps", 2)
    return pipe(generator=_gen(), output_type="np", **kw).images


def _latent(pipe, height, width):
    return height // pipe.vae_scale_factor, width // pipe.vae_scale_factor


CASES = [
    # (pipe fixture, height, width, images per prompt, guidance): what it exercises
    ("sd_pipe", 64, 64, 1, 7.5),  # square, CFG
    ("sd_pipe", 64, 40, 2, 7.5),  # non-square, 2 images, CFG
    ("sd_pipe", 48, 64, 1, 1.0),  # landscape, no CFG
    ("sd_pipe", 64, 64, 2, 1.0),  # 2 images, no CFG
    ("sdxl_pipe", 64, 64, 1, 5.0),
    ("sdxl_pipe", 64, 40, 2, 5.0),
    ("sdxl_pipe", 48, 64, 2, 1.0),
]


@pytest.mark.parametrize("fixture,height,width,n,guidance", CASES)
def test_traced_maps_equal_naive_float64(request, fixture, height, width, n, guidance):
    pipe = request.getfixturevalue(fixture)
    kw = dict(prompt=PROMPT, height=height, width=width, num_images_per_prompt=n, guidance_scale=guidance)
    with trace(pipe) as tc:
        traced = _run(pipe, **kw)
        gm = tc.compute_global_heat_map()
        per_image = [tc.compute_global_heat_map(image_idx=i).heat_maps for i in range(n)]
        names = [info.name for info in tc.layers]
    with NaiveRecorder(pipe, names) as naive:
        plain = _run(pipe, **kw)
    assert torch.equal(torch.from_numpy(traced), torch.from_numpy(plain))  # same image, bit for bit
    B = next(iter(naive.sums.values())).shape[0]
    rows = slice(B - n, B)  # the conditional half (all rows without CFG)
    # daam's per-(layer, head) up-sampling is linear: its mean is the single up-sampling of the default mode,
    # which then clamps at 0 once.
    expected = naive.aggregate(_latent(pipe, height, width), rows, clamp=False).clamp(min=0)
    T = gm.tokens.n_tokens()
    assert gm.heat_maps.shape == (T, *_latent(pipe, height, width))
    torch.testing.assert_close(gm.heat_maps.double(), expected.mean(0)[:T], rtol=1e-5, atol=1e-7)
    for i in range(n):
        torch.testing.assert_close(per_image[i].double(), expected[i, :T], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fixture,height,width,n", [("sd_pipe", 64, 40, 1), ("sdxl_pipe", 64, 64, 2)])
def test_daam_compat_equals_daam_aggregation(request, fixture, height, width, n):
    pipe = request.getfixturevalue(fixture)
    kw = dict(prompt=PROMPT, height=height, width=width, num_images_per_prompt=n)
    with trace(pipe, daam_compat=True) as tc:
        _run(pipe, **kw)
        gm = tc.compute_global_heat_map()
        one_head = tc.compute_global_heat_map(layer_idx=0, head_idx=1)
        names = [info.name for info in tc.layers]
    with NaiveRecorder(pipe, names) as naive:
        _run(pipe, **kw)
    B = next(iter(naive.sums.values())).shape[0]
    latent = _latent(pipe, height, width)
    expected = naive.aggregate(latent, slice(B - n, B), clamp=True).mean(0)
    T = gm.tokens.n_tokens()
    torch.testing.assert_close(gm.heat_maps.double(), expected[:T], rtol=1e-5, atol=1e-7)
    # A single (layer, head) map, as daam's compute_global_heat_map(layer_idx=0, head_idx=1).
    single = NaiveRecorder(pipe, names[:1])
    single.sums = {names[0]: naive.sums[names[0]][:, 1:2]}
    torch.testing.assert_close(
        one_head.heat_maps.double(),
        single.aggregate(latent, slice(B - n, B), clamp=True).mean(0)[:T],
        rtol=1e-5,
        atol=1e-7,
    )
    # Without the clamp the default mode differs from daam only by the clamped undershoot.
    assert (gm.heat_maps >= 0).all()


@pytest.fixture(scope="module")
def demo_pipe():
    from daam_fast.demo import load_pipeline

    return load_pipeline()


def test_default_maps_clamp_the_single_upsampling_at_zero(demo_pipe):
    # The demo model's maps are sharp: bicubic up-sampling overshoots below 0 at their edges, which the default
    # mode clamps once, after summing at native resolution (DESIGN.md §1); normalize then divides by a sum > 0.
    kw = dict(prompt=PROMPT, num_inference_steps=4)
    with trace(demo_pipe) as tc:
        _run(demo_pipe, **kw)
        gm = tc.compute_global_heat_map()
        norm = tc.compute_global_heat_map(normalize=True)
        names = [info.name for info in tc.layers]
    with NaiveRecorder(demo_pipe, names) as naive:
        _run(demo_pipe, **kw)
    B = next(iter(naive.sums.values())).shape[0]
    unclamped = naive.aggregate((16, 16), slice(B - 1, B), clamp=False)[0]
    T = gm.tokens.n_tokens()
    assert unclamped[:T].min() < -0.01 * unclamped[:T].max()  # the case exercises the clamp
    torch.testing.assert_close(gm.heat_maps.double(), unclamped[:T].clamp(min=0), rtol=1e-5, atol=1e-6)
    inner = gm.heat_maps[1 : T - 1]
    torch.testing.assert_close(norm.heat_maps, gm.heat_maps / (inner.sum(0, keepdim=True) + 1e-6))
    assert norm.heat_maps.min() >= 0 and norm.heat_maps[1 : T - 1].sum(0).max() <= 1


def test_negative_prompt_maps_are_the_unconditional_half(sd_pipe):
    kw = dict(prompt=PROMPT, negative_prompt="a green triangle", height=64, width=64)
    with trace(sd_pipe, negative=True) as tc:
        _run(sd_pipe, **kw)
        neg = tc.compute_global_heat_map(negative=True)
        pos = tc.compute_global_heat_map()
        names = [info.name for info in tc.layers]
    with NaiveRecorder(sd_pipe, names) as naive:
        _run(sd_pipe, **kw)
    expected = naive.aggregate((32, 32), slice(0, 1), clamp=False)[0].clamp(min=0)
    assert neg.prompt == "a green triangle"
    torch.testing.assert_close(neg.heat_maps.double(), expected[: neg.tokens.n_tokens()], rtol=1e-5, atol=1e-7)
    assert neg.compute_word_heat_map("triangle").heatmap.shape == (32, 32)
    assert pos.prompt == PROMPT


def test_prompt_list_maps_per_image(sd_pipe):
    prompts = ["a red circle", "a blue square on a green field"]
    with trace(sd_pipe) as tc:
        _run(sd_pipe, prompt=prompts, height=64, width=64)
        with pytest.raises(ValueError, match="different prompts"):
            tc.compute_global_heat_map()
        second = tc.compute_global_heat_map(image_idx=1)
        assert second.prompt == prompts[1]
        assert second.compute_word_heat_map("field").heatmap.shape == (32, 32)
        with pytest.raises(IndexError, match="made 2 image"):
            tc.compute_global_heat_map(image_idx=2)


def test_each_call_is_a_record_and_last_is_default(sd_pipe):
    with trace(sd_pipe) as tc:
        _run(sd_pipe, prompt="a red circle", height=64, width=64)
        _run(sd_pipe, prompt="a blue square", height=64, width=48, num_inference_steps=3)
        assert len(tc.records) == 2
        assert tc.compute_global_heat_map().prompt == "a blue square"
        first = tc.compute_global_heat_map(record=0)
        assert first.prompt == "a red circle" and first.heat_maps.shape[1:] == (32, 32)
        assert tc.records[1].steps_traced == 3 and tc.records[1].complete


def test_step_and_layer_selection(sd_pipe):
    with trace(sd_pipe, steps=[1], per_layer=True) as tc:
        _run(sd_pipe, prompt=PROMPT, height=64, width=64, num_inference_steps=3)
        assert tc.records[-1].steps_traced == 1
        layer0 = tc.compute_global_heat_map(layer_idx=0)
        assert layer0.heat_maps.shape[1:] == (32, 32)
        with pytest.raises(ValueError, match="daam_compat=True"):
            tc.compute_global_heat_map(head_idx=0)
    with pytest.raises(ValueError, match="valid indices"):
        trace(sd_pipe, layers=[99])
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        trace(sd_pipe, layers=["nope"])


def _processors(pipe):
    return {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_processors_restored_after_exception_mid_step(sd_pipe, exc):
    before = _processors(sd_pipe)
    had_check_inputs = "check_inputs" in sd_pipe.__dict__
    baseline = _run(sd_pipe, prompt=PROMPT, height=64, width=64)

    def fail(pipe, i, t, kwargs):
        if i == 1:
            raise exc("stop")
        return kwargs

    with pytest.raises(exc), trace(sd_pipe) as tc:
        _run(sd_pipe, prompt=PROMPT, height=64, width=64, num_inference_steps=3, callback_on_step_end=fail)
    after = _processors(sd_pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert ("check_inputs" in sd_pipe.__dict__) == had_check_inputs
    assert not sd_pipe.unet._forward_pre_hooks
    rec = tc.records[-1]
    assert rec.interrupted and not rec.complete and rec.steps_seen == 2
    assert tc.compute_global_heat_map().compute_word_heat_map("circle").heatmap.isfinite().all()
    np = pytest.importorskip("numpy")
    np.testing.assert_array_equal(_run(sd_pipe, prompt=PROMPT, height=64, width=64), baseline)


def test_normal_exit_restores_and_nesting_is_refused(sd_pipe):
    before = _processors(sd_pipe)
    with trace(sd_pipe), pytest.raises(RuntimeError, match="already being traced"), trace(sd_pipe):
        pass
    after = _processors(sd_pipe)
    assert all(after[k] is before[k] for k in before)


def test_unsupported_pipeline_named():
    class NotAPipeline:
        pass

    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionXLPipeline"):
        trace(NotAPipeline())


def test_no_maps_before_a_step(sd_pipe):
    with trace(sd_pipe) as tc, pytest.raises(RuntimeError, match="call the pipeline inside"):
        tc.compute_global_heat_map()


def test_v_prediction_img2img_and_inpaint(sd_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    from tests.fixtures.pipelines import tiny_sd_pipeline

    v_pipe = tiny_sd_pipeline(prediction_type="v_prediction")
    with trace(v_pipe) as tc:
        _run(v_pipe, prompt=PROMPT, height=64, width=64)
        assert tc.compute_global_heat_map().heat_maps.isfinite().all()
    i2i = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 48)
    with trace(i2i) as tc:
        i2i(prompt=PROMPT, image=image, strength=0.5, num_inference_steps=4, generator=_gen(), output_type="np")
        rec = tc.records[-1]
        assert rec.latent_hw == (32, 24) and rec.steps_seen == 2 and rec.complete
        assert tc.compute_global_heat_map().compute_word_heat_map("square").heatmap.shape == (32, 24)
    inpaint = StableDiffusionInpaintPipeline(**sd_pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    mask = torch.zeros(1, 1, 48, 64)
    mask[..., 10:30, 20:50] = 1
    with trace(inpaint) as tc:
        inpaint(
            prompt=PROMPT,
            image=torch.rand(1, 3, 48, 64),
            mask_image=mask,
            height=48,
            width=64,
            num_inference_steps=2,
            generator=_gen(),
            output_type="np",
        )
        assert tc.records[-1].latent_hw == (24, 32)
        assert tc.compute_global_heat_map().compute_word_heat_map("circle").heatmap.shape == (24, 32)
