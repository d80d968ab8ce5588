"""Models where users have them (daam_fast.loading): single-file checkpoints in the original layout (SD 1.x, SD 2.x,
SDXL; written here by tests/fixtures/checkpoints.py) loaded offline with --config, dtype defaults per family,
tracing under accelerate's offload hooks, VAE tiling, the demo model, and a console free of other libraries'
notices."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from daam_fast import loading, session, trace
from daam_fast.cli import main
from tests.fixtures.checkpoints import write_checkpoint, write_config_folder
from tests.fixtures.pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPT = "a red circle and a blue square"
ROOT = Path(__file__).resolve().parents[1]
needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed (pip install accelerate)"
)

#: name: (builder, file suffix, text-encoder layout of the checkpoint)
CHECKPOINTS = {
    "sd1": (tiny_sd_pipeline, ".safetensors", "clip"),
    "sd2": (lambda: tiny_sd_pipeline(prediction_type="v_prediction"), ".ckpt", "open_clip"),
    # unequal text-encoder widths, as SDXL's 768 and 1280: the checkpoint's encoders are told apart by them
    "sdxl": (lambda: tiny_sdxl_pipeline(text_widths=(24, 40)), ".safetensors", "clip"),
}


def _traced(pipe, **kw):
    """(image [1, H, W, 3], maps) of one traced generation."""
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, **kw}
    with trace(pipe) as tc:
        image = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
        return image, tc.compute_global_heat_map().heat_maps


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``get(name)``: (original pipeline, checkpoint file, config folder without weights), built once per name."""
    made = {}

    def get(name):
        if name not in made:
            build, suffix, text_format = CHECKPOINTS[name]
            pipe = build()
            folder = tmp_path_factory.mktemp(name)
            ckpt = write_checkpoint(pipe, folder / f"model{suffix}", text_format)
            made[name] = pipe, ckpt, write_config_folder(pipe, folder / "configs")
        return made[name]

    return get


@pytest.fixture(params=list(CHECKPOINTS))
def checkpoint(request, checkpoints):
    return (request.param, *checkpoints(request.param))


def test_single_file_checkpoint_loads_offline_and_traces_as_the_original(checkpoint):
    name, pipe, ckpt, configs = checkpoint
    assert not list(configs.rglob("*.safetensors"))  # configs and tokenizers only
    loaded = session.load_pipeline(str(ckpt), "cpu", config=str(configs), quiet=True)
    assert type(loaded) is type(pipe)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is None:
            continue
        want, got = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), component
    (image, maps), (image2, maps2) = _traced(pipe), _traced(loaded)
    assert np.array_equal(image, image2) and torch.equal(maps, maps2)


def test_the_checkpoint_names_its_pipeline_class(checkpoint):
    name, pipe, ckpt, _ = checkpoint
    assert loading.single_file_pipeline_class(ckpt) is type(pipe)  # from the weights' names alone


def test_generate_command_on_a_single_file_checkpoint(checkpoints, tmp_path):
    _, ckpt, configs = checkpoints("sd1")  # one family is enough for the command line; loading is tested on all
    out = tmp_path / "out"
    argv = ["generate", "--model", str(ckpt), "--config", str(configs), "--prompt", PROMPT, "--words", "red"]
    assert main([*argv, "--steps", "1", "--size", "32x32", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    assert (out / "seed0" / "maps.safetensors").is_file()


def test_single_file_errors_say_what_to_do(checkpoints, tmp_path, monkeypatch, capsys):
    _, ckpt, configs = checkpoints("sd1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: the hub's configs are out of reach
    with pytest.raises(RuntimeError, match="--config DIR"):
        session.load_pipeline(str(ckpt), "cpu", quiet=True)
    with pytest.raises(session.UsageError, match="--config applies to single-file checkpoints"):
        session.load_pipeline(str(configs), "cpu", config=str(configs))
    with pytest.raises(session.UsageError, match="no model_index.json"):
        session.load_pipeline(str(ckpt), "cpu", config=str(tmp_path))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(session.UsageError, match="not an SD 1.x/2.x or SDXL checkpoint"):
        session.load_pipeline(str(tmp_path / "lora.safetensors"), "cpu")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(session.UsageError, match=r"ends in \.safetensors or \.ckpt"):
        session.load_pipeline(str(tmp_path / "weights.bin"), "cpu")
    assert main(["generate", "--model", str(configs), "--config", str(configs), "--prompt", "p"]) == 2
    assert "--config applies to single-file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "class_name,device,dtype",
    [
        ("StableDiffusionPipeline", "cuda", torch.float16),
        ("StableDiffusionXLPipeline", "cuda:1", torch.float16),
        ("StableDiffusion3Pipeline", "cuda", torch.bfloat16),  # fp16 overflows in SD3 and Flux activations
        ("FluxPipeline", "cuda", torch.bfloat16),
        ("FluxPipeline", "cpu", torch.float32),
        ("StableDiffusionPipeline", "cpu", torch.float32),
    ],
)
def test_default_dtype_per_family(class_name, device, dtype):
    assert loading.default_dtype(class_name, device) is dtype


def test_load_passes_the_familys_dtype(tmp_path, monkeypatch):
    # What a CUDA load asks diffusers for, without a GPU: from_pretrained records its arguments.
    from diffusers import DiffusionPipeline

    asked = {}

    class Loaded:
        def to(self, device):
            asked["device"] = device
            return self

        def set_progress_bar_config(self, **kw):
            pass

    def from_pretrained(source, **kw):
        asked.update(kw)
        return Loaded()

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", from_pretrained)
    expected = {"StableDiffusion3Pipeline": torch.bfloat16, "StableDiffusionXLPipeline": torch.float16}
    for class_name, dtype in expected.items():
        (tmp_path / "model_index.json").write_text(f'{{"_class_name": "{class_name}"}}')
        session.load_pipeline(str(tmp_path), "cuda")
        assert asked[loading._dtype_kwarg()] is dtype and asked["device"] == "cuda"
    session.load_pipeline(str(tmp_path), "cuda", dtype="fp32")
    assert asked[loading._dtype_kwarg()] is torch.float32


def test_dtype_and_vae_tiling_options(tmp_path, sd_pipe):
    sd_pipe.save_pretrained(tmp_path)
    assert session.load_pipeline(str(tmp_path), "cpu", quiet=True).unet.dtype == torch.float32  # auto on the CPU
    tiled = session.load_pipeline(str(tmp_path), "cpu", dtype="bf16", vae_tiling=True, quiet=True)
    assert tiled.unet.dtype == torch.bfloat16 and tiled.vae.use_tiling
    plain = session.load_pipeline(str(tmp_path), "cpu", vae_tiling=True, quiet=True)
    # 64x64 images are decoded in tiles (the tiny VAE's tile is 32 pixels); the maps come from the UNet alone.
    image, maps = _traced(plain, height=64, width=64)
    assert image.shape == (1, 64, 64, 3) and torch.equal(maps, _traced(sd_pipe, height=64, width=64)[1])
    with pytest.raises(session.UsageError, match="--dtype 'half'"):
        session.load_pipeline(str(tmp_path), "cpu", dtype="half")


@needs_accelerate
def test_tracing_under_model_cpu_offload(tmp_path, sd_pipe):
    sd_pipe.save_pretrained(tmp_path)
    offloaded = session.load_pipeline(str(tmp_path), "cpu", offload="model", quiet=True)
    assert type(offloaded.unet._hf_hook).__name__ == "CpuOffload"  # accelerate's hook, execution device cpu
    (image, maps), (image2, maps2) = _traced(sd_pipe), _traced(offloaded)
    assert np.array_equal(image, image2) and torch.equal(maps, maps2)


@needs_accelerate
def test_tracing_under_sequential_offload_hooks():
    # diffusers' enable_sequential_cpu_offload hooks every layer with accelerate's AlignDevicesHook (weights on the
    # meta device until a layer runs). diffusers makes the execution device "cpu:0", which accelerate 1.x cannot
    # handle on the CPU, so the hooks are installed as diffusers does, with execution device cpu.
    from accelerate import cpu_offload

    reference, offloaded = tiny_sd_pipeline(), tiny_sd_pipeline()
    for name in ("unet", "text_encoder", "vae"):
        cpu_offload(getattr(offloaded, name), torch.device("cpu"), offload_buffers=True)
    assert offloaded.unet.conv_in.weight.device.type == "meta"
    (image, maps), (image2, maps2) = _traced(reference), _traced(offloaded)
    assert np.array_equal(image, image2) and torch.equal(maps, maps2)


def test_offload_errors(tmp_path, sd_pipe, monkeypatch):
    sd_pipe.save_pretrained(tmp_path)
    with pytest.raises(session.UsageError, match="CUDA device"):
        session.load_pipeline(str(tmp_path), "cpu", offload="sequential")
    with pytest.raises(session.UsageError, match="valid are model, sequential"):
        session.load_pipeline(str(tmp_path), "cpu", offload="disk")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name))
    with pytest.raises(session.UsageError, match="pip install accelerate"):
        session.load_pipeline(str(tmp_path), "cpu", offload="model")


def test_ui_without_model_serves_the_demo_model(tmp_path):
    from daam_fast.cli import _parser, _size
    from daam_fast.ui import UIServer

    args = _parser().parse_args(["ui"])
    assert args.model is None and _size(args) == "32x32"  # no --model: the demo model, at its own size
    srv = UIServer(("127.0.0.1", 0), model=args.model or [], steps=2, size=_size(args), device="cpu", workdir=tmp_path)
    assert srv.default_model == "demo"
    try:
        res = srv.generate({"prompt": PROMPT})
    finally:
        srv.server_close()
    assert res["words"] == ["a", "red", "circle", "and", "blue", "square"]
    from daam_fast.demo import MODEL_DIR

    assert Path(srv.pipelines["demo"].unet.config._name_or_path).parent == MODEL_DIR


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--steps", "2", "--prompt", PROMPT],
        ["generate", "--model", "demo", "--prompt", PROMPT, "--steps", "1", "--quiet", "--no-time-profile"],
    ],
)
def test_console_carries_no_notices_of_other_libraries(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "daam_fast.cli", *argv, "--out", str(tmp_path / "out"), "--threads", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    console = (run.stdout + run.stderr).lower()
    for notice in ("torchvision", "accelerate", "warning", "deprecated", "[transformers]"):
        assert notice not in console, console
