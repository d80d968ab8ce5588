from PIL import Image

from daam_fast.cli import main


def test_demo_writes_image_overlay_per_word_and_dominance(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--prompt", "a red circle"]) == 0
    for name in ("0_image", "0_red", "0_circle", "0_dominance"):
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 32
