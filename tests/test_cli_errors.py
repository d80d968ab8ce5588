"""Exit codes as README says (0 ok, 2 bad arguments, 1 runtime failure), bad input found before any model is
loaded, and seed ranges checked before they are built."""

import tracemalloc

import pytest
from PIL import Image

from daam_fast import session
from daam_fast.cli import main


@pytest.fixture()
def no_model_load(monkeypatch):
    """Any model load fails the test: the bad input must be found before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for a request with a bad argument")

    monkeypatch.setattr(session, "load_pipeline", refuse)


def _gen(*extra):
    return ["generate", "--model", "some-org/some-model", "--prompt", "a red circle", *extra]


@pytest.mark.parametrize(
    "argv, message",
    [
        (_gen("--threads", "0"), "--threads 0: must be at least 1"),
        (_gen("--device", "foo"), "--device 'foo': expected auto, cpu, cuda, cuda:N"),
        (_gen("--device", "cuda:99"), "--device 'cuda:99'"),
        (_gen("--guidance-scale", "inf"), "--guidance-scale inf: must be a finite number >= 0"),
        (_gen("--guidance-scale", "nan"), "--guidance-scale nan: must be a finite number >= 0"),
        (_gen("--guidance-scale", "-2"), "--guidance-scale -2.0: must be a finite number >= 0"),
        (["generate", "--model", "M", "--prompt", "!!!"], "--prompt '!!!' has no words"),
        (["generate", "--model", "M", "--prompt", "(:1.3)"], "has no words"),
        (_gen("--words", "dog"), "--words: 'dog' is not in the prompt 'a red circle'; the prompt's words are"),
        (_gen("--words", "!!"), "--words: the query '!!' has no word characters"),
        (_gen("--steps", "5000"), "--steps 5000: at most 1000"),
        (_gen("--seeds", "0-20000000"), "--seeds '0-20000000': 20000001 seeds is more than 1000"),
        (_gen("--seeds", "0-999999999999"), "999999999999': 1000000000000 seeds is more than 1000"),
        (_gen("--seeds", "9" * 5000), "seeds must be integers 0..18446744073709551615"),
        (_gen("--seeds", str(2**64)), "seeds must be integers 0..18446744073709551615"),
        (["demo", "--steps", "0"], "--steps 0: must be at least 1"),
        (["demo", "--threads", "-1"], "--threads -1: must be at least 1"),
        (["demo", "--seed", "-1"], "--seed -1: must be an integer 0..18446744073709551615"),
        (["ui", "--port", "99999"], "--port 99999: must be 0..65535"),
        (["ui", "--port", "-1"], "--port -1: must be 0..65535"),
        (["ui", "--threads", "0"], "--threads 0: must be at least 1"),
        (["ui", "--model", "./no/such/folder"], "--model './no/such/folder': no such folder"),
    ],
)
def test_bad_arguments_exit_2_before_any_model_load(no_model_load, argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line


def test_an_output_folder_that_is_a_file_exits_2(no_model_load, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "below"):
        assert main(_gen("--out", str(out))) == 2
        assert f"--out {str(out)!r}: " in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_analyze_refuses_a_file_that_is_no_image(tmp_path, capsys, sd_pipe):
    from daam_fast import trace

    with trace(sd_pipe) as tc:
        sd_pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent")
        maps = tc.compute_global_heat_map().save(tmp_path / "maps.safetensors")
    (tmp_path / "notimage.png").write_bytes(b"\x89PNG but not really")
    assert main(["analyze", str(maps), "--image", str(tmp_path / "notimage.png"), "--out", str(tmp_path / "o")]) == 2
    assert "--image" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # An unreadable image.png next to the maps file is named too (it would be used for the overlays).
    (tmp_path / "image.png").write_bytes(b"garbage")
    assert main(["analyze", str(maps), "--out", str(tmp_path / "o")]) == 2
    assert "image.png" in capsys.readouterr().err and not (tmp_path / "o").exists()
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    assert main(["analyze", str(maps), "--out", str(tmp_path / "o")]) == 0


@pytest.mark.parametrize("text", ["0-20000000", "0-999999999999", ",".join(["0-999"] * 2000), "5," * 2000 + "6"])
def test_seed_ranges_are_checked_before_they_are_built(text):
    tracemalloc.start()
    try:
        with pytest.raises(session.UsageError, match="more than 1000"):
            session.parse_seeds(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # no list of millions of seeds on the way (was 1.15 GB for 0-20000000)


def test_seed_lists_keep_their_order_and_drop_repeats():
    assert session.parse_seeds("3,1-2,2,0") == [3, 1, 2, 0]
    assert session.parse_seeds(f"{2**64 - 1}") == [2**64 - 1]
    assert len(session.parse_seeds("0-999")) == 1000
