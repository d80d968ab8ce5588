"""The embedded demo: procedural data, the shipped model folder, and its word maps through trace()."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

from daam_fast.demo import MODEL_DIR, load_pipeline, shapes

# ------------------------------------------------------------------------------------------------ data


def test_scenes_are_deterministic_per_seed_and_index():
    a, b = shapes.random_scene(7, 3), shapes.random_scene(7, 3)
    assert a.caption == b.caption and a.objects == b.objects
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    # Random access: scene 3 does not depend on generating scenes 0..2 first, and seeds differ.
    images, labels, captions, _ = shapes.make_dataset(5, 7)
    np.testing.assert_array_equal(images[3], a.image)
    assert captions[3] == a.caption
    other = shapes.make_dataset(5, 8)
    assert not np.array_equal(other[0], images)


@pytest.mark.parametrize("seed", [0, 1])
def test_masks_are_exact_disjoint_and_coloured(seed):
    counts = set()
    for i in range(60):
        sc = shapes.random_scene(seed, i)
        n = len(sc.objects)
        counts.add(n)
        assert 1 <= n <= 3
        assert len({o.colour for o in sc.objects}) == n and len({o.shape for o in sc.objects}) == n
        assert sc.caption == " and ".join(f"a {o.colour} {o.shape}" for o in sc.objects)
        assert sc.masks.shape == (n, shapes.SIZE, shapes.SIZE) and sc.masks.dtype == bool
        assert (sc.masks.sum(0) <= 1).all(), "masks overlap"
        assert all(m.sum() >= 20 for m in sc.masks), "an object is too small to see"
        for o, m in zip(sc.objects, sc.masks, strict=True):
            assert (sc.image[m] == shapes.COLOURS[o.colour]).all()
        assert (sc.image[~sc.masks.any(0)] == shapes.BACKGROUND).all()
        # At least one background pixel between objects (4-neighbourhood), so colour blobs stay apart.
        for a in range(n):
            for b in range(a + 1, n):
                assert not (shapes._dilate(sc.masks[a]) & sc.masks[b]).any()
        # word_masks: each colour and shape word names exactly its object's mask.
        wm = sc.word_masks()
        for o, m in zip(sc.objects, sc.masks, strict=True):
            np.testing.assert_array_equal(wm[o.colour], m)
            np.testing.assert_array_equal(wm[o.shape], m)
    assert counts == {1, 2, 3}


def test_shapes_differ_and_render_refuses_overlap():
    c = shapes.render([shapes.Obj("red", "circle", 16, 16, 6)]).masks[0]
    s = shapes.render([shapes.Obj("red", "square", 16, 16, 6)]).masks[0]
    t = shapes.render([shapes.Obj("red", "triangle", 16, 16, 6)]).masks[0]
    assert c.sum() != s.sum() and not np.array_equal(c, t) and not np.array_equal(s, t)
    # The triangle is wider at the bottom than at the top.
    rows = np.where(t.any(1))[0]
    assert t[rows[-1]].sum() > t[rows[0]].sum()
    with pytest.raises(ValueError, match="overlaps"):
        shapes.render([shapes.Obj("red", "circle", 16, 16, 6), shapes.Obj("blue", "square", 18, 18, 5)])


def test_colour_segmentation_recovers_rendered_masks():
    for i in range(20):
        sc = shapes.random_scene(3, i)
        seg = shapes.segment_by_colour(sc.image)
        for o, m in zip(sc.objects, sc.masks, strict=True):
            np.testing.assert_array_equal(seg[o.colour], m)
        unused = set(shapes.COLOURS) - {o.colour for o in sc.objects}
        assert all(not seg[c].any() for c in unused)


# ------------------------------------------------------------------------------------------------ model


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def test_shipped_folder_is_small_fp16_and_standard():
    files = [f for f in MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    from safetensors import safe_open

    weights = list(MODEL_DIR.glob("*/*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    for w in weights:
        with safe_open(str(w), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, w


def test_shipped_pipeline_loads_with_from_pretrained(pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert pipe.text_encoder.config.vocab_size == 49408 and pipe.text_encoder.config.max_position_embeddings == 77
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert pipe.vae_scale_factor == 2
    cfg = pipe.unet.config
    assert list(cfg.down_block_types) == ["CrossAttnDownBlock2D"] * 2
    assert list(cfg.up_block_types) == ["CrossAttnUpBlock2D"] * 2
    out = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, shapes.SIZE, shapes.SIZE, 3) and np.isfinite(out.images).all()


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_shipped_weights_load_without_missing_or_unused_keys():
    """Every component's weights come from the shipped files, tensor for tensor, with no "newly initialized" /
    "not used" report: a key layout this transformers / diffusers does not read would leave random weights."""
    from safetensors.torch import load_file

    handler = _Collect()
    # transformers' and diffusers' loggers do not propagate to the root logger: listen on them directly.
    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        fresh = load_pipeline()
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    bad = re.compile(r"newly initiali[sz]ed|not used|not initiali[sz]ed|missing|unexpected", re.IGNORECASE)
    assert not [m for m in handler.messages if bad.search(m)], handler.messages
    for name, module in (("unet", fresh.unet), ("vae", fresh.vae), ("text_encoder", fresh.text_encoder)):
        (weights,) = (MODEL_DIR / name).glob("*.safetensors")
        # Checkpoints on the hub store CLIPTextModel's keys under "text_model.", the layout transformers 4.x and
        # 5.x both read; transformers 5's module itself has no such prefix.
        stored = {k.removeprefix("text_model."): v for k, v in load_file(str(weights)).items()}
        state = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
        assert set(stored) == set(state), (name, sorted(set(stored) ^ set(state))[:5])
        for key, tensor in stored.items():
            assert torch.equal(state[key].to(tensor.dtype), tensor), (name, key)


def test_word_maps_land_on_rendered_objects(pipe):
    """The CI check of the whole path (img2img pipeline -> trace -> word maps -> DAAM threshold):
    on 20 held-out rendered scenes, word maps beat the all-foreground baseline by a clear margin."""
    from daam_fast.demo.evaluate import evaluate

    result = evaluate(pipe, n_scenes=20, n_generated=0, steps=10)["rendered"]
    assert result["daam"]["all"] >= 0.6, result
    assert result["daam"]["all"] >= result["all_foreground"]["all"] + 0.15, result
    for kind in ("colour", "shape"):
        assert result["daam"][kind] >= result["all_foreground"][kind] + 0.1, result


def test_run_demo_writes_images_overlays_and_dominance(pipe, tmp_path, pyplot):
    from daam_fast.demo import run_demo

    res = run_demo(tmp_path, prompts=["a red circle and a blue square"], steps=5, pipe=pipe, progress=False)
    assert pyplot.get_fignums() == []  # its own figures: no backend switch (the fixture checks), no pyplot figures
    names = {f.name for f in res[0]["files"]}
    assert names == {"0_image.png", "0_red.png", "0_circle.png", "0_blue.png", "0_square.png", "0_dominance.png"}
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
    assert res[0]["heatmaps"]["red"].shape == (16, 16) and res[0]["heatmaps"]["red"].dtype == torch.float32
