"""Default token selection: only the prompt's own text positions (start token, prompt tokens, end token) are
captured, read from the prompt the pipeline is called with. Maps must equal those of a trace that captures every
text position (``tokens=range(text length)``), while buffers and capture work shrink."""

import pytest
import torch

from daam_fast import trace

PROMPT = "a red circle and a blue square"
LONG_NEGATIVE = "blurry, low quality, watermark, text, extra fingers, cropped, jpeg artifacts, noise"
T5_LEN = 32  # short T5 window: fast tiny runs


@pytest.fixture(scope="module")
def sd3_pipe():
    from tests.fixtures.pipelines import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux_pipe():
    from tests.fixtures.pipelines import tiny_flux_pipeline

    return tiny_flux_pipeline()


def _run(pipe, family, **kw):
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    if family in ("sd3", "flux"):
        kw.setdefault("max_sequence_length", T5_LEN)
    return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def _buffer_tokens(tc) -> set[int]:
    return {slot.buf.shape[-2] for slot in tc.records[-1].slots.values()}


def _default_then_full(pipe, family, negative=False, **kw):
    with trace(pipe, negative=negative) as tc:
        _run(pipe, family, **kw)
        rec = tc.records[-1]
        default = tc.compute_global_heat_map(negative=negative)
        n_text = rec.geometry.text_len
        positions, buffers = rec.positions, _buffer_tokens(tc)
    with trace(pipe, negative=negative, tokens=range(n_text)) as tc:
        _run(pipe, family, **kw)
        full = tc.compute_global_heat_map(negative=negative)
    return default, full, positions, buffers, n_text


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_prompt_positions_by_default_maps_unchanged(request, family):
    pipe = request.getfixturevalue(f"{family}_pipe")
    default, full, positions, buffers, n_text = _default_then_full(pipe, family, prompt=PROMPT, guidance_scale=4.0)
    assert buffers == {len(positions)} and len(positions) < n_text  # fewer columns than the text window
    assert default.positions == full.positions  # the same prompt positions survive word lookup
    torch.testing.assert_close(default.heat_maps, full.heat_maps, rtol=1e-6, atol=1e-9)
    for word in ("red", "square"):
        torch.testing.assert_close(
            default.compute_word_heat_map(word).heatmap, full.compute_word_heat_map(word).heatmap, rtol=1e-6, atol=1e-9
        )


def test_unet_positions_are_start_prompt_end(sd_pipe):
    with trace(sd_pipe) as tc:
        _run(sd_pipe, "sd", prompt=PROMPT)
        gm = tc.compute_global_heat_map()
        assert tc.records[-1].positions == tuple(range(gm.tokens.n_tokens()))


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_negative_prompt_longer_than_prompt_is_covered(request, family):
    pipe = request.getfixturevalue(f"{family}_pipe")
    kw = dict(prompt="a cat", negative_prompt=LONG_NEGATIVE, guidance_scale=4.0)
    default, full, positions, _, _ = _default_then_full(pipe, family, negative=True, **kw)
    assert len(default.positions) > 4  # the negative prompt's tokens, not the 3-token prompt's window
    assert default.positions == full.positions
    torch.testing.assert_close(default.heat_maps, full.heat_maps, rtol=1e-6, atol=1e-9)


def test_batch_of_prompts_takes_the_longest(sd_pipe):
    prompts = ["a cat", PROMPT + " on a wooden table"]
    with trace(sd_pipe) as tc:
        _run(sd_pipe, "sd", prompt=prompts)
        long = tc.compute_global_heat_map(image_idx=1)
        assert tc.records[-1].positions == tuple(range(long.tokens.n_tokens()))
        short = tc.compute_global_heat_map(image_idx=0)
        assert short.heat_maps.shape[0] == short.tokens.n_tokens() == 4


def test_prompt_embeds_capture_every_position(sd_pipe):
    ids = sd_pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    embeds = sd_pipe.text_encoder(ids)[0]
    with trace(sd_pipe) as tc:
        _run(sd_pipe, "sd", prompt_embeds=embeds, guidance_scale=1.0)
        assert tc.records[-1].positions == tuple(range(77))
        gm = tc.compute_global_heat_map(prompt=PROMPT)
    assert gm.heat_maps.shape[0] == gm.tokens.n_tokens()


def test_explicit_tokens_override(sd_pipe):
    with trace(sd_pipe, tokens=[0, 2, 5]) as tc:
        _run(sd_pipe, "sd", prompt=PROMPT)
        assert tc.records[-1].positions == (0, 2, 5)
        assert _buffer_tokens(tc) == {3}
