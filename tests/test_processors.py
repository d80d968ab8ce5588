"""Tracing under every attention processor a user may have installed (diffusers' stock ones, attention slicing,
custom ones of any standard signature): the image stays bit-identical, the maps stay right, the processor gets
exactly the arguments it accepts, and a processor change made inside ``with trace(pipe)`` survives its exit."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from daam_fast import trace
from tests.fixtures.pipelines import tiny_sd_pipeline

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    # Its own pipeline: the tests swap processors, which must not leak into the session's shared one.
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def reference(pipe):
    """Maps through the default path (stock AttnProcessor2_0, checked against a naive DAAM in test_trace.py)."""
    with trace(pipe) as tc:
        _run(pipe)
        return tc.compute_global_heat_map().heat_maps


def _run(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=2, height=64, width=48, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images  # fmt: skip


class FourArgProcessor:
    """The minimal custom processor diffusers' docs show: ``__call__(attn, hidden_states, encoder_hidden_states=None,
    attention_mask=None)``, nothing else."""

    def __init__(self):
        self.stock = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask)


class KeywordProcessor:
    """A processor with an option of its own, given through ``cross_attention_kwargs``; it changes the output,
    so an image with the option dropped differs."""

    def __init__(self, seen):
        self.seen = seen
        self.stock = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *, out_scale=1.0):
        self.seen.append(out_scale)
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask) * out_scale


def _cross(pipe):
    return [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]


INSTALLS = {
    # kind: how the user installed it
    "sliced_auto": lambda p: p.enable_attention_slicing(),  # the low-VRAM switch: SlicedAttnProcessor everywhere
    "sliced_max": lambda p: p.enable_attention_slicing("max"),  # one head per slice
    "classic": lambda p: p.unet.set_attn_processor(AttnProcessor()),  # the pre-2.0 processor (accepts temb)
    "sdpa": lambda p: p.unet.set_attn_processor(AttnProcessor2_0()),
    "four_arg": lambda p: [m.set_processor(FourArgProcessor()) for m in _cross(p)],
}


@pytest.mark.parametrize("kind", sorted(INSTALLS))
def test_every_processor_keeps_its_image_and_gives_the_same_maps(pipe, reference, kind):
    saved = pipe.unet.attn_processors
    INSTALLS[kind](pipe)
    try:
        installed = [m.processor for m in _cross(pipe)]
        plain = _run(pipe)
        with trace(pipe) as tc:
            traced = _run(pipe)
            maps = tc.compute_global_heat_map().heat_maps
        assert [m.processor for m in _cross(pipe)] == installed  # the user's processors are back
    finally:
        pipe.unet.set_attn_processor(saved)
    assert torch.equal(torch.from_numpy(traced), torch.from_numpy(plain))  # bit for bit
    torch.testing.assert_close(maps, reference, rtol=2e-4, atol=1e-6)  # other kernels round differently


def test_a_processors_own_keyword_reaches_it_and_temb_does_not(pipe):
    seen = []
    saved = pipe.unet.attn_processors
    for m in _cross(pipe):
        m.set_processor(KeywordProcessor(seen))
    try:
        plain = _run(pipe, cross_attention_kwargs={"out_scale": 0.5})
        n_plain = len(seen)
        with trace(pipe):
            traced = _run(pipe, cross_attention_kwargs={"out_scale": 0.5})
    finally:
        pipe.unet.set_attn_processor(saved)
    assert seen == [0.5] * (2 * n_plain)  # the traced calls got the option too
    assert torch.equal(torch.from_numpy(traced), torch.from_numpy(plain))


def test_a_processor_change_inside_the_trace_survives_its_exit(pipe):
    saved = pipe.unet.attn_processors
    try:
        with trace(pipe, layers=[0, 1]):
            pipe.enable_attention_slicing()  # the user switches every attention module inside the block
            sliced = pipe.unet.attn_processors
        after = pipe.unet.attn_processors
        # Nothing the tracer installed is left, and everything the user installed stays (traced layers included).
        assert after == sliced
        assert all(type(p).__name__ == "SlicedAttnProcessor" for p in after.values())
        with trace(pipe) as tc:  # the next trace wraps the user's processors
            _run(pipe)
    finally:
        pipe.unet.set_attn_processor(saved)
    assert tc.compute_global_heat_map().heat_maps.isfinite().all()


def test_a_single_layer_changed_inside_the_trace_keeps_the_users_processor(pipe):
    saved = pipe.unet.attn_processors
    mine = FourArgProcessor()
    try:
        with trace(pipe) as tc:
            first = dict(pipe.unet.named_modules())[tc.layers[0].name]
            first.set_processor(mine)  # a traced layer, replaced by the user mid-block
        assert first.processor is mine
        others = [m.processor for m in _cross(pipe) if m is not first]
        assert all(type(p) is AttnProcessor2_0 for p in others)  # the tracer's own wrappers were undone
    finally:
        pipe.unet.set_attn_processor(saved)
