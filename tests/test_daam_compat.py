"""daam 0.2.0's documented usage runs against daam_fast with only the import changed.

Each test is one of daam's usages, written from its README and run/generate.py (``from daam import ...`` ->
``from daam_fast import ...``), on tiny random pipelines and on the demo model. Where newer diffusers changed
an argument (``callback`` needs ``callback_steps`` since ``callback_steps`` lost its default), the test says so.
"""

import numpy as np
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # daam's README puts the pipeline on its auto device
#: (prompt, word) of the README example per pipeline: daam's own for SDXL, a scene the demo model knows.
README_PROMPTS = {"sdxl": ("A dog runs across the field", "dog"), "demo": ("a red circle and a blue square", "circle")}


@pytest.fixture(scope="module")
def sdxl():
    from tests.fixtures.pipelines import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline().to(DEVICE)


@pytest.fixture(scope="module")
def sd():
    from tests.fixtures.pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline().to(DEVICE)


@pytest.fixture(scope="module")
def demo():
    from daam_fast.demo import load_pipeline

    return load_pipeline(DEVICE)


def _readme_example(pipe, prompt: str, word: str, plt):
    # daam README, "Using DAAM as a Library", with `from daam import trace, set_seed` changed (and fewer steps).
    from daam_fast import set_seed, trace

    gen = set_seed(0)  # for reproducibility
    with torch.no_grad():
        with trace(pipe) as tc:
            out = pipe(prompt, num_inference_steps=3, generator=gen)
            heat_map = tc.compute_global_heat_map()
            heat_map = heat_map.compute_word_heat_map(word)
            heat_map.plot_overlay(out.images[0])
            plt.show()
    return out, heat_map


@pytest.mark.filterwarnings("ignore:FigureCanvasAgg is non-interactive")
@pytest.mark.parametrize("which", ["sdxl", "demo"])
def test_readme_library_example(which, request, pyplot):
    pipe = request.getfixturevalue(which)
    prompt, word = README_PROMPTS[which]
    out, heat_map = _readme_example(pipe, prompt, word, pyplot)
    latent = pipe.unet.config.sample_size
    assert heat_map.heatmap.shape == (latent, latent) and torch.isfinite(heat_map.heatmap).all()
    fig = pyplot.gcf()  # the overlay is in the current figure, which plt.show() shows
    assert pyplot.get_fignums() == [fig.number] and fig.axes[0].get_title() == word
    w, h = out.images[0].size
    assert fig.axes[0].images[1].get_array().shape == (h, w, 4)


def test_readme_serialization_example(sd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # daam README: "You can also serialize and deserialize the DAAM maps pretty easily" (import changed).
    from daam_fast import GenerationExperiment, trace

    pipe = sd
    with trace(pipe) as tc:
        pipe("A dog and a cat", num_inference_steps=2)
        exp = tc.to_experiment("experiment-dir")
        exp.save()  # experiment-dir now contains all the data and heat maps

    exp2 = GenerationExperiment.load("experiment-dir")  # load the experiment
    assert exp2.prompt == "A dog and a cat"
    assert torch.equal(exp2.global_heat_map, exp.global_heat_map.cpu())
    names = {p.name for p in (tmp_path / "experiment-dir").iterdir()}
    assert {"prompt.txt", "seed.txt", "output.png", "dog.heat_map.png", "cat.heat_map.png"} <= names
    assert not any(n.endswith(".pt") for n in names)
    dog = exp2.heat_map().compute_word_heat_map("dog").heatmap
    assert torch.equal(dog, exp.heat_map().compute_word_heat_map("dog").heatmap.cpu())


@pytest.mark.parametrize("all_heads_opt_in", [False, True])
def test_generate_script_quickgen_and_all_heads(sd, tmp_path, all_heads_opt_in):
    # daam's run/generate.py main loop (quickgen with --all-heads), imports changed to daam_fast.
    from daam_fast import GenerationExperiment, set_seed, trace

    pipe, output_folder, missing = sd, str(tmp_path), []
    prompts = [("p0", "A dog, running.")]
    extra = {"daam_compat": True} if all_heads_opt_in else {}  # per-head maps are opt-in in daam_fast
    with torch.no_grad():
        for _gen_idx, (prompt_id, prompt) in enumerate(prompts):
            seed = 0
            prompt = prompt.replace(",", " ,").replace(".", " .").strip()
            gen = set_seed(seed)
            prompt_id = str(prompt_id)
            with trace(pipe, low_memory=False, save_heads=False, load_heads=False, **extra) as tc:
                # diffusers >= 0.27 gives callback_steps no default: daam's `callback=` alone fails there.
                out = pipe(prompt, num_inference_steps=2, generator=gen, callback=tc.time_callback, callback_steps=1)
                exp = tc.to_experiment(output_folder, id=prompt_id, seed=seed)
                exp.save(output_folder, heat_maps=True)
                exp.clear_checkpoint()
                for word in prompt.split():
                    if word in {",", "."}:
                        continue
                    exp.save_heat_map(word)
                    for head_idx in range(4):
                        for layer_idx, layer_name in enumerate(tc.layer_names):
                            try:
                                heat_map = tc.compute_global_heat_map(layer_idx=layer_idx, head_idx=head_idx)
                                exp = GenerationExperiment(
                                    path=tmp_path, id=prompt_id, global_heat_map=heat_map.heat_maps, seed=seed,
                                    prompt=prompt, image=out.images[0],
                                    tokenizer=pipe.tokenizer,  # daam's script omits it and then fails itself
                                )
                                exp.save_heat_map(word, output_prefix=f"l{layer_idx}-{layer_name}-h{head_idx}-")
                            except RuntimeError:
                                missing.append((layer_idx, head_idx, layer_name))
    folder = tmp_path / "p0"
    assert tc.time_idx == 2 and tc.last_prompt == "A dog , running ."
    assert GenerationExperiment.read_prompt(tmp_path, "p0") == "A dog , running ."
    assert {"dog.heat_map.png", "running.heat_map.png", "output.png"} <= {p.name for p in folder.iterdir()}
    n_layers = len(tc.layer_names)
    heads = [layer.heads for layer in tc.layers]
    per_head = sorted(folder.glob("l*-h*-dog.heat_map.png"))
    if all_heads_opt_in:
        assert len(per_head) == sum(min(h, 4) for h in heads)  # heads beyond a layer's count are "missing"
        assert len(missing) == 3 * (4 * n_layers - len(per_head))
    else:
        assert per_head == [] and len(missing) == 3 * 4 * n_layers  # caught as daam's RuntimeError


def test_trace_accepts_daams_options(sd, tmp_path):
    from daam_fast import set_seed, trace

    def run(**kw):
        with trace(sd, **kw) as tc:
            sd("a red cat", num_inference_steps=2, generator=set_seed(0))
            return tc, tc.compute_global_heat_map().heat_maps

    full_tc, full = run()
    low_tc, low = run(low_memory=True, data_dir=str(tmp_path))
    # daam's low_memory traces only the first cross-attention of each block: fewer layers, another mean
    assert len(low_tc.layer_names) < len(full_tc.layer_names) and not torch.equal(low, full)
    assert all(name.endswith("-attn-0") for name in low_tc.layer_names)
    with trace(sd, True) as positional_tc:  # daam's positional order: pipeline, low_memory, load_heads, ...
        sd("a red cat", num_inference_steps=2, generator=set_seed(0))
        positional = positional_tc.compute_global_heat_map().heat_maps
    assert torch.equal(positional, low)
    for option in ("save_heads", "load_heads"):
        with pytest.raises(ValueError, match=f"{option}=True is not supported: .*daam_compat=True"):
            trace(sd, **{option: True})
    with pytest.raises(ValueError, match="either low_memory=True or layers="):
        trace(sd, low_memory=True, layers=[0])
    # Not opted into per-layer / per-head buffers: the error daam's loops catch (RuntimeError), also a ValueError.
    from daam_fast import HeatMapSelectionError

    for selection in ({"layer_idx": 0}, {"head_idx": 0}):
        with pytest.raises(RuntimeError, match="needs per-") as info:
            full_tc.compute_global_heat_map(**selection)
        assert isinstance(info.value, (ValueError, HeatMapSelectionError))


def test_tracer_remembers_the_last_prompt_and_image(sdxl):
    from daam_fast import trace

    with trace(sdxl) as tc:
        assert tc.last_prompt == "" and tc.last_image is None  # daam's values before any call
        out = sdxl(
            ["a blue dog"], num_inference_steps=3, generator=torch.Generator(DEVICE).manual_seed(0),
            callback_on_step_end=tc.time_callback,  # diffusers wants the callback's tensors back
        )
        assert tc.last_prompt == "a blue dog" and tc.time_idx == 3
        assert np.array_equal(np.asarray(tc.last_image), np.asarray(out.images[-1]))
        sdxl("a red cat", num_inference_steps=1, output_type="np")
        assert tc.last_prompt == "a red cat" and tc.last_image.size == out.images[-1].size  # arrays become PIL
        sdxl("a red cat", num_inference_steps=1, output_type="latent")
        assert tc.last_image is None
        with pytest.raises(RuntimeError, match="no image to export"):
            tc.to_experiment("unused")


def test_default_maps_are_attributions_with_a_sound_normalize(demo):
    from daam_fast import trace

    with trace(demo) as tc:
        demo("a red circle and a blue square", num_inference_steps=10, generator=torch.Generator(DEVICE).manual_seed(0))
        raw = tc.compute_global_heat_map().heat_maps
        norm = tc.compute_global_heat_map(normalize=True).heat_maps
    assert raw.min() >= 0 and raw.max() > 0
    assert norm.min() >= 0 and norm[1:-1].sum(0).max() <= 1 + 1e-5


#: README "Differences from daam": (lowest Pearson, highest max relative difference) of the default mode against
#: daam's aggregation (daam_compat=True) over the prompt tokens' maps. Random-weight maps are smooth, so the
#: bicubic up-sampling never overshoots below 0 there; the demo model's maps are sharp.
DEFAULT_VS_DAAM = {"sd": (0.99999, 1e-5), "sdxl": (0.99999, 1e-5), "demo": (0.9995, 0.05)}


@pytest.mark.parametrize("which", sorted(DEFAULT_VS_DAAM))
def test_default_mode_against_daams_aggregation(which, request):
    from daam_fast import trace

    pipe = request.getfixturevalue(which)
    maps = {}
    for compat in (False, True):
        with trace(pipe, daam_compat=compat) as tc:
            pipe(README_PROMPTS["demo"][0], num_inference_steps=4, generator=torch.Generator(DEVICE).manual_seed(0))
            maps[compat] = tc.compute_global_heat_map().heat_maps[1:-1].flatten(1).double().cpu()
    x, y = maps[False], maps[True]
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    pearson = (xc * yc).sum(1) / (xc.norm(dim=1) * yc.norm(dim=1))
    relative = (x - y).abs().amax(1) / y.amax(1)
    low, high = DEFAULT_VS_DAAM[which]
    assert pearson.min() >= low and relative.max() <= high
