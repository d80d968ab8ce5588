"""The front-end session on every model family: `daam-fast generate` on a tiny pipeline folder saved with
save_pretrained (SD 1.x, SDXL, SD3, Flux), words from each family's own text sources, the guidance scale the
report records, and request checks shared by the command line and the web UI."""

import inspect
import json

import pytest

from daam_fast import load, session
from daam_fast.cli import main
from daam_fast.report import REPORT_FIELDS
from daam_fast.ui import UIServer
from tests.fixtures.pipelines import tiny_pipeline

PROMPT = "a red circle and a blue square"
# Each family's text sources, by name, as the tracer's maps carry them.
SOURCES = {"sd": ["clip"], "sdxl": ["clip"], "sd3": ["clip", "t5"], "flux": ["t5"]}


def _call_default(pipe, name):
    return inspect.signature(type(pipe).__call__).parameters[name].default


@pytest.fixture(scope="module", params=list(SOURCES))
def saved(request, tmp_path_factory):
    """(family, pipeline folder, the pipeline's default guidance scale)."""
    pipe = tiny_pipeline(request.param)
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    pipe.save_pretrained(path)
    return request.param, path, _call_default(pipe, "guidance_scale")


def test_generate_on_a_saved_pipeline_of_every_family(saved, tmp_path):
    family, path, default_guidance = saved
    out = tmp_path / "out"
    argv = ["generate", "--model", str(path), "--prompt", PROMPT, "--negative-prompt", "ugly blurry"]
    argv += ["--words", "red", "square", "--steps", "2", "--size", "32x32", "--out", str(out), "--quiet"]
    assert main([*argv, "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert tuple(report) == REPORT_FIELDS and report["words"] == ["red", "square"]
    assert report["guidance_scale"] == default_guidance  # what ran: the pipeline's own default
    run = report["runs"][0]
    gm = load(out / run["maps"])
    assert [s["name"] for s in gm.meta.get("text_sources", [{"name": "clip"}])] == SOURCES[family]
    for word in ("red", "square"):
        assert gm.compute_word_heat_map(word).heatmap.isfinite().all()
    assert {r["word"] for r in run["influence"]} >= {"red", "circle", "blue", "square"}
    assert report["time_profile"]["words"] == ["red", "square"]
    # Flux runs CFG only with true_cfg_scale > 1: no negative maps then, and no failure.
    assert (run["negative_maps"] is None) == (family == "flux")


def test_guidance_scale_given_is_recorded_and_used(sdxl_pipe, tmp_path):
    request = session.make_request(PROMPT, steps=1, size="32x32", guidance_scale=1.0)
    report = session.generate(sdxl_pipe, request, tmp_path, model="tiny sdxl", progress=False)
    assert report["guidance_scale"] == 1.0 and sdxl_pipe.guidance_scale == 1.0  # what the pipeline ran with


def test_prompt_words_come_from_the_family_text_sources(saved):
    family, path, _ = saved
    pipe = session.load_pipeline(str(path), "cpu", quiet=True)
    sources = session.prompt_sources(pipe, PROMPT)
    assert [s.name for s in sources] == SOURCES[family]
    assert session.check_words(pipe, PROMPT, ["circle"]) == ["circle"]
    with pytest.raises(session.UsageError, match="--words: 'dog' is not in the prompt"):
        session.check_words(pipe, PROMPT, ["dog"])


def test_ui_records_the_pipeline_default_guidance(sdxl_pipe, tmp_path):
    srv = UIServer(("127.0.0.1", 0), model="x", steps=1, size="32x32", pipelines={"x": sdxl_pipe}, workdir=tmp_path)
    try:
        res = srv.generate({"prompt": PROMPT})
    finally:
        srv.server_close()
    report = json.loads((tmp_path / res["report"][len("/files/") :]).read_text())
    assert report["command"] == "ui" and report["guidance_scale"] == _call_default(sdxl_pipe, "guidance_scale") == 5.0


@pytest.mark.parametrize(
    "fields, prefix, message",
    [
        ({"seeds": "x"}, "--", "--seeds 'x': expected"),
        ({"seeds": "x"}, "", "seeds 'x': expected"),
        ({"seeds": "0-20"}, "", "seeds '0-20': 21 seeds is more than 16"),
        ({"size": "33x32"}, "--", "--size '33x32': width and height must be multiples of 8"),
        ({"steps": "many"}, "", "steps 'many': expected a whole number"),
        ({"steps": 0}, "--", "--steps 0: must be at least 1"),
        ({"prompt": "  "}, "", "prompt is empty"),
    ],
)
def test_requests_are_checked_before_any_model_is_loaded(fields, prefix, message):
    kw = {"prompt": PROMPT, **fields}
    with pytest.raises(session.UsageError) as exc:
        session.make_request(kw.pop("prompt"), option_prefix=prefix, max_seeds=16, **kw)
    assert str(exc.value).startswith(message)
