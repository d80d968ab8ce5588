"""The web UI: its HTTP API, and a real headless Chromium that generates, clicks a word and sees its overlay."""

import json
import os
import shutil
import socket
import urllib.error
import urllib.request

import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def server(ui_server):
    host, port = ui_server.server_address[:2]
    return ui_server, f"http://{host}:{port}"


def _post(url, body: dict):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.headers, r.read()


def test_listens_on_localhost_by_default(server):
    srv, _ = server
    assert srv.server_address[0] == "127.0.0.1"


def test_api_generates_and_serves_outputs(server):
    srv, base = server
    status, res = _post(base + "/api/generate", {"prompt": PROMPT, "seeds": "0-1", "negative_prompt": "ugly"})
    assert status == 200, res
    assert res["words"] == ["a", "red", "circle", "and", "blue", "square"]
    assert res["seed_sweep"] is not None
    status, headers, body = _get(base + res["overlays"]["red"])
    assert headers["Content-Type"] == "image/png"
    rel = res["overlays"]["red"][len("/files/") :]
    assert body == (srv.workdir / rel).read_bytes()
    _, headers, body = _get(base + res["maps"])
    assert "attachment" in headers["Content-Disposition"] and len(body) > 1000
    _, _, report = _get(base + res["report"])
    assert json.loads(report)["prompt"] == PROMPT


def test_api_rejects_bad_input_and_path_traversal(server):
    _, base = server
    assert _post(base + "/api/generate", {"prompt": ""})[0] == 400
    status, res = _post(base + "/api/generate", {"prompt": "x", "seeds": "a-b"})
    assert status == 400 and "seeds" in res["error"]
    with pytest.raises(urllib.error.HTTPError) as exc:
        _get(base + "/files/../../etc/passwd")
    assert exc.value.code == 404
    with pytest.raises(urllib.error.HTTPError):
        _get(base + "/files/%2e%2e/%2e%2e/etc/passwd")


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver not installed: run scripts/install_browser.sh"
)
def test_browser_generate_click_word_shows_overlay(server, tmp_path):
    from webdriver import Chrome

    _, base = server
    browser = Chrome(CHROMIUM, CHROMEDRIVER, str(tmp_path / "chrome-profile"))
    try:
        browser.get(base + "/")
        browser.type(browser.find("#prompt"), PROMPT)
        browser.click(browser.find("#generate"))
        browser.wait_for("return document.querySelectorAll('#words button').length", what="the word list")
        assert browser.js("return [...document.querySelectorAll('#words button')].map(b => b.textContent)") == [
            "a",
            "red",
            "circle",
            "and",
            "blue",
            "square",
        ]
        assert browser.js("return document.getElementById('overlay').dataset.word") == ""  # nothing shown yet
        browser.click(browser.find('#words button[data-word="circle"]'))
        browser.wait_for(
            "const o = document.getElementById('overlay');"
            "return o.dataset.word === 'circle' && o.complete && o.naturalWidth > 0",
            timeout=60,
            what="the overlay of 'circle'",
        )
        src = browser.js("return document.getElementById('overlay').src")
        assert src.endswith("_circle.png")
        box = browser.js("return document.getElementById('overlay').getBoundingClientRect().width")
        assert box > 100  # visible on the page, not a collapsed element
        assert browser.js("return document.querySelector('#words .active').dataset.word") == "circle"
        assert browser.js("return document.getElementById('image').naturalWidth") == 32
        shot = tmp_path / "ui.png"
        browser.screenshot(shot)
        with Image.open(shot) as im:
            assert im.format == "PNG" and im.size[0] > 500
        if os.environ.get("DAAM_FAST_UI_SCREENSHOT"):  # e.g. docs/figures/ui.png
            shutil.copy(shot, os.environ["DAAM_FAST_UI_SCREENSHOT"])
    finally:
        browser.quit()


def test_ui_command_bad_arguments_exit_2(capsys):
    from daam_fast.cli import main

    assert main(["ui", "--size", "huge"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["ui", "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "Traceback" not in err
    assert main(["ui", "--help"]) == 0 and "127.0.0.1" in capsys.readouterr().out
