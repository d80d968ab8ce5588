from PIL import Image

from daam_fast import load
from daam_fast.cli import main


def test_demo_writes_an_overlay_per_word(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--steps", "1", "--prompt", "a red circle"]) == 0
    for word in ("a", "red", "circle"):
        with Image.open(tmp_path / f"overlay_{word}.png") as im:
            assert im.format == "PNG"
    gm = load(tmp_path / "maps.safetensors")
    assert gm.prompt == "a red circle" and gm.meta["seed"] == 0
