"""`daam-fast generate` / `analyze` on a saved tiny pipeline: every output file, report.json fields, exit codes."""

import json

import pytest
from PIL import Image

from daam_fast import load
from daam_fast.cli import main
from daam_fast.report import REPORT_FIELDS, RUN_FIELDS

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sd_pipe):
    path = tmp_path_factory.mktemp("tiny_sd")
    sd_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def generated(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    argv = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        PROMPT,
        "--negative-prompt",
        "ugly blurry",
        "--words",
        "red",
        "square",
        "--seeds",
        "0-1",
        "--steps",
        "3",
        "--size",
        "48x32",
        "--out",
        str(out),
        "--quiet",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    return out, json.loads((out / "report.json").read_text())


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_generate_writes_every_documented_output(generated):
    out, report = generated
    assert tuple(report) == REPORT_FIELDS
    assert report["command"] == "generate" and report["words"] == ["red", "square"]
    assert report["seeds"] == [0, 1] and report["size"] == [48, 32] and report["steps"] == 3
    assert len(report["runs"]) == 2
    for run, seed in zip(report["runs"], [0, 1], strict=True):
        assert tuple(run) == RUN_FIELDS and run["seed"] == seed
        assert _png_size(out / run["image"]) == (48, 32)
        assert set(run["overlays"]) == {"red", "square"}
        for png in run["overlays"].values():
            assert _png_size(out / png) == (48, 32)  # overlays keep the image's size
        gm = load(out / run["maps"])
        assert gm.prompt == PROMPT and gm.meta["seed"] == seed and gm.heat_maps.shape[1:] == (16, 24)
        assert load(out / run["negative_maps"]).prompt == "ugly blurry"
        assert {r["word"] for r in run["influence"]} == {"a", "red", "circle", "and", "blue", "square"}
        assert sum(r["share"] for r in run["influence"]) == pytest.approx(1.0)
        assert {r["word"] for r in run["negative_influence"]} == {"ugly", "blurry"}
        assert run["overlap"]["words"] == ["red", "square"] and run["overlap"]["iou"][0][0] == pytest.approx(1.0)
        assert sum(run["dominance_area"].values()) == pytest.approx(1.0)
    assert report["seed_sweep"]["seeds"] == [0, 1] and set(report["seed_sweep"]["stability"]) == {"red", "square"}
    tp = report["time_profile"]
    assert tp["seed"] == 0 and len(tp["share"]) == 3 and tp["phases"]["middle"] == [1, 2]
    expected = {
        f"seed{s}/{n}" for s in (0, 1) for n in ("overlay_grid", "overlap", "dominance", "negative_overlay_grid")
    }
    assert set(report["figures"]) == expected | {"seed_sweep", "time_profile"}
    for fig in report["figures"].values():
        assert _png_size(out / fig["path"]) == (fig["width"], fig["height"])
    listed = {run[k] for run in report["runs"] for k in ("image", "maps", "negative_maps")}
    listed |= {p for run in report["runs"] for p in run["overlays"].values()}
    listed |= {f["path"] for f in report["figures"].values()} | {"report.json"}
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == listed  # nothing undocumented


def test_analyze_reruns_on_saved_maps(generated, tmp_path):
    out, report = generated
    maps = [str(out / r["maps"]) for r in report["runs"]]
    assert main(["analyze", maps[0], "--words", "red", "circle", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert tuple(one) == REPORT_FIELDS and one["command"] == "analyze" and one["words"] == ["red", "circle"]
    assert one["prompt"] == PROMPT and one["seeds"] == [0] and one["size"] == [48, 32]
    run = one["runs"][0]
    assert run["influence"] == report["runs"][0]["influence"]  # same maps, same numbers
    assert _png_size(tmp_path / "one" / run["overlays"]["circle"]) == (48, 32)  # image.png next to the maps
    for fig in one["figures"].values():
        assert _png_size(tmp_path / "one" / fig["path"]) == (fig["width"], fig["height"])
    assert main(["analyze", *maps, "--out", str(tmp_path / "sweep")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "report.json").read_text())
    assert set(sweep["seed_sweep"]["stability"]) == {"a", "red", "circle", "and", "blue", "square"}
    assert sweep["seed_sweep"]["stability"]["red"] == pytest.approx(report["seed_sweep"]["stability"]["red"])
    assert (tmp_path / "sweep" / "seed_sweep.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "M", "--prompt", "p", "--seeds", "x"], "--seeds"),
        (["generate", "--model", "M", "--prompt", "p", "--seeds", "5-2"], "empty"),
        (["generate", "--model", "M", "--prompt", "p", "--size", "big"], "WIDTHxHEIGHT"),
        (["generate", "--model", "M", "--prompt", "p", "--size", "500x512"], "multiples of 8"),
        (["generate", "--model", "M", "--prompt", "p", "--steps", "0"], "at least 1"),
        (["generate", "--model", "./no/such/folder", "--prompt", "p"], "no such folder"),
        (["generate", "--prompt", "p"], "--model"),
        (["generate", "--model", "M", "--prompt", "p", "--steps", "many"], "invalid int"),
        (["analyze", "missing.safetensors"], "no such file"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_files_and_words_exit_2(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["analyze", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    argv = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        PROMPT,
        "--words",
        "dog",
        "--quiet",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'dog' is not in the prompt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # checked before generating anything
    assert main(["generate", "--model", str(tmp_path), "--prompt", PROMPT]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_unreachable_hub_id_is_a_runtime_failure(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    assert main(["generate", "--model", "some-org/some-model", "--prompt", "p", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "could not load model 'some-org/some-model'" in err and "Traceback" not in err


def test_help_documents_report_fields(capsys):
    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    for field in REPORT_FIELDS + RUN_FIELDS:
        assert field in text, field
    assert "exit codes" in text and "daam-fast generate --model" in text
    assert main(["analyze", "--help"]) == 0
