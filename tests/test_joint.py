"""Joint-attention transformers (tiny random SD3 and Flux pipelines): traced maps against a float64 naive joint
softmax, image equality, restoration, CLIP / T5 word lookup, and the capture's memory bound."""

import functools

import pytest
import torch
from naive_joint import NaiveJointRecorder

from daam_fast import trace
from daam_fast.heatmap import JointGlobalHeatMap, load
from daam_fast.tokens import TruncatedWordError, tokenize_prompt, tokenize_shared

PROMPT = "a red circle and a blue square"
NEGATIVE = "a cat wearing a hat"
T5_LEN = 32  # max_sequence_length: a short T5 window keeps the tiny runs fast
TOL = dict(rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def sd3_pipe():
    from tests.fixtures.pipelines import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


def _flux_too_old() -> str | None:
    from daam_fast.processors.versions import FLUX_MIN, diffusers_version

    if diffusers_version()[:2] < FLUX_MIN:
        return f"tracing Flux needs diffusers >= {FLUX_MIN[0]}.{FLUX_MIN[1]} (FluxAttnProcessor)"
    return None


def _diffusers_before(minor: int) -> bool:
    from daam_fast.processors.versions import diffusers_version

    return diffusers_version()[:2] < (0, minor)


@pytest.fixture(scope="module")
def flux_pipe():
    from tests.fixtures.pipelines import tiny_flux_pipeline

    if _flux_too_old():
        pytest.skip(_flux_too_old())

    return tiny_flux_pipeline()


def _run(pipe, **kw):
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("max_sequence_length", T5_LEN)
    return torch.from_numpy(pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images)


def _grid(pipe, height, width):
    # SD3 patchifies the latent by patch_size; Flux packs 2x2 latents per token.
    per_token = pipe.vae_scale_factor * (
        pipe.transformer.config.patch_size if type(pipe).__name__ == "StableDiffusion3Pipeline" else 2
    )
    return height // per_token, width // per_token


def _traced_and_naive(pipe, trace_kw=None, **kw):
    with trace(pipe, **(trace_kw or {})) as tc:
        traced = _run(pipe, **kw)
    with NaiveJointRecorder(pipe) as naive:
        plain = _run(pipe, **kw)
    assert torch.equal(traced, plain)  # the same image, bit for bit
    return tc, naive


SD3_CASES = [
    # height, width, images per prompt, guidance: batched CFG (uncond + cond rows) or none
    (32, 48, 1, 5.0),
    (48, 32, 2, 1.0),
    (32, 32, 2, 5.0),
]


@pytest.mark.parametrize("height,width,n,guidance", SD3_CASES)
def test_sd3_maps_equal_naive_float64(sd3_pipe, height, width, n, guidance):
    kw = dict(prompt=PROMPT, height=height, width=width, num_images_per_prompt=n, guidance_scale=guidance)
    tc, naive = _traced_and_naive(sd3_pipe, **kw)
    gm = tc.compute_global_heat_map()
    grid = _grid(sd3_pipe, height, width)
    B = next(iter(naive.sums.values())).shape[0]
    expected = naive.aggregate(grid, rows=slice(B - n, B))  # the conditional rows
    assert isinstance(gm, JointGlobalHeatMap) and gm.heat_maps.shape[1:] == grid
    # Rows: the CLIP window (start, prompt, end), then the T5 window after the 77 CLIP positions.
    n_clip = tokenize_shared([sd3_pipe.tokenizer, sd3_pipe.tokenizer_2], PROMPT).n_tokens()
    n_t5 = tokenize_prompt(sd3_pipe.tokenizer_3, PROMPT, max_length=T5_LEN).n_tokens()
    assert gm.positions == list(range(n_clip)) + list(range(77, 77 + n_t5))
    torch.testing.assert_close(gm.heat_maps.double(), expected.mean(0)[gm.positions], **TOL)
    for i in range(n):
        got = tc.compute_global_heat_map(image_idx=i).heat_maps.double()
        torch.testing.assert_close(got, expected[i, gm.positions], **TOL)


FLUX_CASES = [
    # height, width, images per prompt; distilled guidance (guidance_embeds): one call per step
    (32, 48, 1),
    (48, 32, 2),
]


@pytest.mark.parametrize("height,width,n", FLUX_CASES)
def test_flux_maps_equal_naive_float64(flux_pipe, height, width, n):
    kw = dict(prompt=PROMPT, height=height, width=width, num_images_per_prompt=n, guidance_scale=3.5)
    tc, naive = _traced_and_naive(flux_pipe, dict(per_layer=True), **kw)
    grid = _grid(flux_pipe, height, width)
    gm = tc.compute_global_heat_map()
    n_t5 = tokenize_prompt(flux_pipe.tokenizer_2, PROMPT, max_length=T5_LEN).n_tokens()
    assert gm.positions == list(range(n_t5)) and gm.heat_maps.shape[1:] == grid
    torch.testing.assert_close(gm.heat_maps.double(), naive.aggregate(grid).mean(0)[:n_t5], **TOL)
    # Each block on its own: the double-stream block and the single-stream ones (text = first positions).
    names = naive.names()
    assert [info.name for info in tc.layers] == names
    assert [info.block for info in tc.layers] == ["double", "single", "single"]
    for idx, name in enumerate(names):
        got = tc.compute_global_heat_map(layer_idx=idx).heat_maps.double()
        torch.testing.assert_close(got, naive.aggregate(grid, names=[name]).mean(0)[:n_t5], **TOL)


def test_flux_true_cfg_cond_and_negative_maps(flux_pipe):
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=2.0, height=32, width=40)
    tc, naive = _traced_and_naive(flux_pipe, dict(negative=True), **kw)
    grid = _grid(flux_pipe, 32, 40)
    rec = tc.records[-1]
    assert rec.calls.true_cfg and rec.steps_seen == 2  # two transformer calls per step, counted as one step
    gm = tc.compute_global_heat_map()
    neg = tc.compute_global_heat_map(negative=True)
    assert neg.prompt == NEGATIVE
    torch.testing.assert_close(gm.heat_maps.double(), naive.aggregate(grid)[0, gm.positions], **TOL)
    torch.testing.assert_close(neg.heat_maps.double(), naive.aggregate(grid, pass_="uncond")[0, neg.positions], **TOL)
    # Without negative=True the unconditional pass is skipped and asking for it says how to get it.
    with trace(flux_pipe) as tc2:
        _run(flux_pipe, **kw)
    torch.testing.assert_close(tc2.compute_global_heat_map().heat_maps, gm.heat_maps, rtol=0, atol=0)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        tc2.compute_global_heat_map(negative=True)


def test_layer_selection_and_per_head_maps(sd3_pipe, flux_pipe):
    # Blocks chosen by index; daam_compat keeps heads apart.
    kw = dict(prompt=PROMPT, height=32, width=32, guidance_scale=1.0)
    tc, naive = _traced_and_naive(flux_pipe, dict(layers=[2], daam_compat=True), **kw)
    name = naive.names()[2]
    gm = tc.compute_global_heat_map()
    T = len(gm.positions)
    grid = _grid(flux_pipe, 32, 32)
    torch.testing.assert_close(gm.heat_maps.double(), naive.aggregate(grid, names=[name])[0, :T], **TOL)
    one = tc.compute_global_heat_map(layer_idx=2, head_idx=1).heat_maps.double()
    torch.testing.assert_close(one, naive.aggregate(grid, names=[name], head=1)[0, :T], **TOL)
    with pytest.raises(ValueError, match="out of range"):
        trace(sd3_pipe, layers=[5])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_other_processors_keep_their_output_and_maps(request, family):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    if family == "sd3" and _diffusers_before(32):
        pytest.skip("diffusers < 0.32 does not pass joint_attention_kwargs on to SD3's attention processors")
    pipe = request.getfixturevalue(f"{family}_pipe")
    from naive_joint import FluxAttnProcessor
    # A user's subclass of the stock processor is not reproduced in place: the capture normalises on its own.
    # Its own keyword argument (through joint_attention_kwargs) must still reach it.
    base = JointAttnProcessor2_0 if family == "sd3" else FluxAttnProcessor
    seen = []

    class Custom(base):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *a, tag=None, **kw):
            seen.append(tag)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *a, **kw)

    custom = Custom
    kw = dict(prompt=PROMPT, height=32, width=48, guidance_scale=1.0)
    with NaiveJointRecorder(pipe) as naive:
        plain = _run(pipe, **kw)
    names = naive.names()
    mods = dict(pipe.transformer.named_modules())
    originals = {n: mods[n].processor for n in names}
    try:
        for n in names:
            mods[n].set_processor(custom())
        with trace(pipe) as tc:
            traced = _run(pipe, joint_attention_kwargs={"tag": "mine"}, **kw)
        assert all(type(mods[n].processor) is custom for n in names)
        assert seen == ["mine"] * (2 * len(names))  # every block, both steps
    finally:
        for n in names:
            mods[n].set_processor(originals[n])
    assert torch.equal(traced, plain)
    gm = tc.compute_global_heat_map()
    expected = naive.aggregate(_grid(pipe, 32, 48))[0, gm.positions]
    torch.testing.assert_close(gm.heat_maps.double(), expected, **TOL)


def test_processors_restored_after_exception(flux_pipe):
    mods = [
        b.attn for b in (*flux_pipe.transformer.transformer_blocks, *flux_pipe.transformer.single_transformer_blocks)
    ]
    before = [m.processor for m in mods]
    hooks = dict(flux_pipe.transformer._forward_pre_hooks)

    def boom(*a, **k):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), trace(flux_pipe) as tc:
        _run(flux_pipe, prompt=PROMPT, height=32, width=32, callback_on_step_end=boom)
    assert [m.processor for m in mods] == before
    assert dict(flux_pipe.transformer._forward_pre_hooks) == hooks
    assert "check_inputs" not in flux_pipe.__dict__
    assert tc.records[-1].interrupted and not tc.records[-1].complete
    with trace(flux_pipe):  # tracing works again
        pass


def test_word_lookup_across_clip_and_t5(sd3_pipe, tmp_path):
    # 80 words: the last ones lie past CLIP's 77-token window but inside a 128-token T5 window.
    prompt = " ".join(["red"] * 78 + ["blue", "circle"])
    with trace(sd3_pipe) as tc:
        _run(sd3_pipe, prompt=prompt, height=32, width=32, guidance_scale=1.0, max_sequence_length=128)
        gm = tc.compute_global_heat_map()
    clip, c_off = gm.source_tokens("clip")
    t5, t_off = gm.source_tokens("t5")
    assert (c_off, t_off) == (0, 77) and gm.default_source == "both"

    def rows(positions):
        return gm.heat_maps[[gm.positions.index(p) for p in positions]].mean(0)

    red_clip = rows(clip.positions("red"))
    red_t5 = rows([77 + p for p in t5.positions("red")])
    torch.testing.assert_close(gm.compute_word_heat_map("red", source="clip").heatmap, red_clip, rtol=0, atol=0)
    torch.testing.assert_close(gm.compute_word_heat_map("red", source="t5").heatmap, red_t5, rtol=0, atol=0)
    both = gm.compute_word_heat_map("red")  # default: the mean of the two encoders' maps
    torch.testing.assert_close(both.heatmap, (red_clip + red_t5) / 2, rtol=1e-6, atol=0)
    # "circle" was cut from the CLIP window: only T5 has it.
    with pytest.raises(TruncatedWordError):
        gm.compute_word_heat_map("circle", source="clip")
    circle = gm.compute_word_heat_map("circle")
    assert circle.positions == [77 + p for p in t5.positions("circle")]
    torch.testing.assert_close(circle.heatmap, rows(circle.positions), rtol=0, atol=0)
    assert circle.expand((32, 32)).shape == (32, 32)
    # word_idx counts one tokenizer's prompt tokens; saved maps keep both sources.
    assert gm.compute_word_heat_map("", word_idx=0, source="clip").positions == [1]
    assert gm.compute_word_heat_map("", word_idx=0, source="t5").positions == [77]
    path = gm.save(tmp_path / "sd3.safetensors")
    again = load(path)
    assert isinstance(again, JointGlobalHeatMap)
    torch.testing.assert_close(again.compute_word_heat_map("circle").heatmap, circle.heatmap, rtol=0, atol=0)


def test_flux_words_from_t5_and_normalize(flux_pipe):
    with trace(flux_pipe) as tc:
        _run(flux_pipe, prompt=PROMPT, height=32, width=32)
        gm = tc.compute_global_heat_map()
        norm = tc.compute_global_heat_map(normalize=True)
    t5, off = gm.source_tokens("t5")
    assert off == 0 and gm.default_source == "t5"
    with pytest.raises(ValueError, match="no 'clip' text"):
        gm.compute_word_heat_map("circle", source="clip")
    w = gm.compute_word_heat_map("circle")
    assert w.positions == t5.positions("circle")
    assert w.heatmap.shape == _grid(flux_pipe, 32, 32) and gm.meta["image_size"] == [32, 32]
    # normalize: each cell's prompt tokens (T5's end token excluded) sum to 1.
    inner = [i for i, (a, b) in enumerate(t5.offsets) if b > a]
    torch.testing.assert_close(norm.heat_maps[inner].sum(0), torch.ones(_grid(flux_pipe, 32, 32)), rtol=1e-4, atol=0)


def test_capture_memory_bounded_by_buffer_and_chunk(monkeypatch):
    # A Flux-like call: 1024 image tokens (32x32 grid) + 128 text tokens, 4 heads of dim 64. The joint softmax
    # (4 x 1152 x 1152 fp32, 21 MB) and even its image x text block (2 MB) must never exist at once.
    from torch.profiler import ProfilerActivity, profile

    from daam_fast.accumulate import Accumulator, CaptureOptions, Geometry, capture
    from daam_fast.kernels import dispatch

    B, H, T, N, D = 1, 4, 128, 1024, 64
    chunk = 256 * 2**10
    monkeypatch.setattr(
        capture.dispatch, "capture_from_lse", functools.partial(dispatch.capture_from_lse, max_chunk_bytes=chunk)
    )
    torch.manual_seed(0)
    q, k = torch.randn(B, H, T + N, D), torch.randn(B, H, T + N, D)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) / 8, dim=-1)
    acc = Accumulator(CaptureOptions(), [])
    acc.begin_call(Geometry((32, 32), B, T, 16))  # a Flux-like call: [text, image], one step
    rec = acc.records[-1]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        acc.on_joint_attention(0, q, k, lse, slice(T, T + N), slice(0, T), D**-0.5)
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    heat = B * T * N * 4
    k_sel = B * H * T * D * 4  # the selected text keys (and their scaled copy), 128 KB each
    assert heat <= peak <= heat + chunk + 2 * k_sel + 2**16, (peak, heat, chunk)
    probs = (q[:, :, T:] @ k[:, :, :T].transpose(-1, -2) / 8 - lse[:, :, T:, None]).exp().sum(1).transpose(1, 2)
    torch.testing.assert_close(rec.slots[(32, 32)].buf, probs, rtol=1e-5, atol=1e-7)


def test_sd3_without_t5_and_flux_prompt_2(sd3_pipe, flux_pipe):
    # SD3 without T5 fills the T5 part with zeros: only CLIP positions have words, and they are the default.
    encoder = sd3_pipe.text_encoder_3
    sd3_pipe.text_encoder_3 = None
    try:
        with trace(sd3_pipe) as tc:
            _run(sd3_pipe, prompt=PROMPT, height=32, width=32, guidance_scale=1.0)
            gm = tc.compute_global_heat_map()
    finally:
        sd3_pipe.text_encoder_3 = encoder
    assert gm.default_source == "clip" and list(gm.sources) == ["clip"] and max(gm.positions) < 77
    with pytest.raises(ValueError, match="no 't5' text"):
        gm.compute_word_heat_map("circle", source="t5")
    assert gm.compute_word_heat_map("circle").positions == gm.tokens.positions("circle")
    # Flux's T5 reads prompt_2 when given: its words are looked up there.
    with trace(flux_pipe) as tc:
        _run(flux_pipe, prompt=PROMPT, prompt_2=NEGATIVE, height=32, width=32)
        gm = tc.compute_global_heat_map()
    assert gm.prompt == NEGATIVE and gm.compute_word_heat_map("hat").positions == gm.tokens.positions("hat")


def test_unsupported_transformer_is_named():
    from types import SimpleNamespace

    from daam_fast import UnsupportedPipelineError

    pipe = SimpleNamespace(transformer=torch.nn.Linear(1, 1), tokenizer=object())
    with pytest.raises(UnsupportedPipelineError, match="transformer is a Linear.*SD3Transformer2DModel"):
        trace(pipe)


def test_bf16_images_identical_and_sd3_maps_close():
    # bf16 on the CPU: SDPA's flash kernel gives the lse too, so images stay identical. SD3 has no RoPE, so the
    # float64 naive sees the model's own bf16 q and k: the kernel tolerance for bf16 applies.
    from tests.fixtures.pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

    for make in (tiny_sd3_pipeline,) + (() if _flux_too_old() else (tiny_flux_pipeline,)):
        pipe = make().to(dtype=torch.bfloat16)
        kw = dict(prompt=PROMPT, height=32, width=48, guidance_scale=1.0)
        tc, naive = _traced_and_naive(pipe, **kw)
        if make is tiny_sd3_pipeline:
            gm = tc.compute_global_heat_map()
            expected = naive.aggregate(_grid(pipe, 32, 48))[0, gm.positions]
            torch.testing.assert_close(gm.heat_maps.double(), expected, rtol=1e-4, atol=1e-5)


def test_steps_selection_adds_up(sd3_pipe):
    kw = dict(prompt=PROMPT, height=32, width=32, guidance_scale=5.0)
    maps = []
    for steps in (None, [0], [1]):
        with trace(sd3_pipe, steps=steps) as tc:
            _run(sd3_pipe, **kw)
        maps.append(tc.compute_global_heat_map().heat_maps)
        assert tc.records[-1].steps_traced == (2 if steps is None else 1)
    torch.testing.assert_close(maps[1] + maps[2], maps[0], rtol=1e-6, atol=0)
    assert not torch.equal(maps[1], maps[2])


@pytest.mark.skipif(_diffusers_before(32), reason="SD3.5's skip-layer guidance arrived in diffusers 0.32")
def test_sd3_skip_layer_guidance_pass_is_not_traced(sd3_pipe):
    # SD3.5's skip-layer guidance adds a third, cond-only transformer call in some steps (here steps 1..3).
    kw = dict(prompt=PROMPT, height=32, width=32, guidance_scale=5.0, num_inference_steps=4)
    kw.update(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    tc, naive = _traced_and_naive(sd3_pipe, **kw)
    assert len(tc.records) == 1 and tc.records[0].steps_seen == 4 and tc.records[0].complete
    assert ("transformer_blocks.0.attn", "skip") in naive.sums  # the extra pass ran
    gm = tc.compute_global_heat_map()
    expected = naive.aggregate(_grid(sd3_pipe, 32, 32), rows=slice(1, 2))[0, gm.positions]
    torch.testing.assert_close(gm.heat_maps.double(), expected, **TOL)


def test_token_selection_keeps_those_rows(sd3_pipe):
    # tokens= are text-sequence positions: here CLIP's "red" (2) and T5's first token (77).
    kw = dict(prompt=PROMPT, height=32, width=32, guidance_scale=1.0)
    with trace(sd3_pipe) as tc:
        _run(sd3_pipe, **kw)
    full = tc.compute_global_heat_map()
    with trace(sd3_pipe, tokens=[2, 77]) as tc:
        _run(sd3_pipe, **kw)
    part = tc.compute_global_heat_map()
    assert part.positions == [2, 77] and part.meta["latent_size"] == [16, 16]
    rows = [full.positions.index(2), full.positions.index(77)]
    torch.testing.assert_close(part.heat_maps, full.heat_maps[rows], rtol=1e-6, atol=0)
    assert part.compute_word_heat_map("red", source="clip").positions == [2]


@pytest.mark.skipif(_diffusers_before(35), reason="the attention dispatcher needs diffusers >= 0.35")
@pytest.mark.parametrize("backend,has_lse", [("native", True), ("flex", True), ("_native_math", False)])
def test_flux_dispatcher_backends_keep_their_kernel_without_recomputing(flux_pipe, monkeypatch, backend, has_lse):
    """Flux under any diffusers attention backend: the stock processor's body runs with that backend's own kernel
    (bit-identical image), its lse is taken where daam_fast knows the backend's lse-returning twin (native SDPA,
    flex), else the capture normalises on its own from the same q and k; q/k are never projected a second time."""
    import warnings

    from diffusers.models.attention_dispatch import attention_backend

    from daam_fast.accumulate import Accumulator
    from daam_fast.processors.joint import FluxCaptureProcessor

    recomputed, lses = [], []
    monkeypatch.setattr(FluxCaptureProcessor, "_recompute_capture", lambda *a, **k: recomputed.append(1))
    real = Accumulator.on_joint_attention

    def spy(self, layer_idx, q, k, lse, *args, **kwargs):
        lses.append(lse is not None)
        return real(self, layer_idx, q, k, lse, *args, **kwargs)

    monkeypatch.setattr(Accumulator, "on_joint_attention", spy)
    kw = dict(prompt=PROMPT, height=32, width=48, guidance_scale=3.5)
    with attention_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex in eager mode warns that it is unfused
        tc, naive = _traced_and_naive(flux_pipe, dict(per_layer=True), **kw)  # asserts the image bit for bit
    assert not recomputed and lses and set(lses) == {has_lse}
    grid = _grid(flux_pipe, 32, 48)
    gm = tc.compute_global_heat_map()
    torch.testing.assert_close(gm.heat_maps.double(), naive.aggregate(grid).mean(0)[gm.positions], **TOL)
