"""The web UI against a hostile page and hostile requests: only its own address (Host) and origin (Origin) are
served, POSTs must be JSON, ``model`` is one of the models given at start-up (or the bundled demo model), errors
reveal nothing about the file system, and every bad request gets a 4xx with a one-line reason."""

import http.client
import json

import pytest

from daam_fast import session

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def server(ui_server):
    return ui_server


def _request(srv, method, path, body=None, headers=None, raw_body: bytes | None = None):
    """``(status, parsed JSON or raw bytes)`` of one request sent exactly as given (no client-side fixing)."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)  # a hung server fails the test
    hdrs = {"Host": f"{host}:{port}"}
    data = raw_body
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    if data is not None:
        hdrs["Content-Length"] = str(len(data))
    hdrs.update(headers or {})
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in hdrs.items():
        if v is not None:
            conn.putheader(k, v)
    conn.endheaders(data)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(payload)
    except ValueError:
        return resp.status, payload


def _one_line_error(res) -> str:
    assert isinstance(res, dict) and isinstance(res.get("error"), str), res
    assert "\n" not in res["error"] and 0 < len(res["error"]) < 300
    return res["error"]


def test_a_cross_origin_post_is_refused_and_runs_nothing(server):
    before = server.counter
    for origin in ("http://evil.example", "null", f"http://localhost:{server.server_address[1] + 1}"):
        status, res = _request(server, "POST", "/api/generate", {"prompt": PROMPT}, {"Origin": origin})
        assert status == 403 and "Origin" in _one_line_error(res)
    # text/plain: what a page on any site can send without a preflight.
    status, res = _request(server, "POST", "/api/generate", raw_body=json.dumps({"prompt": PROMPT}).encode(),
                           headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})  # fmt: skip
    assert status == 403
    status, res = _request(server, "POST", "/api/generate", raw_body=json.dumps({"prompt": PROMPT}).encode(),
                           headers={"Content-Type": "text/plain"})  # fmt: skip
    assert status == 415 and "application/json" in _one_line_error(res)
    status, _ = _request(server, "GET", "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "iframe"})
    assert status == 403  # framed or fetched by another site's page
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert _request(server, "GET", "/", headers=link)[0] == 200  # a link followed from another site
    assert server.counter == before  # no generation ran


def test_only_the_servers_own_host_is_served(server):
    port = server.server_address[1]
    for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1:{port + 1}", "", None):
        status, res = _request(server, "GET", "/", headers={"Host": host})
        assert status == 421, host
        assert "Host" in _one_line_error(res)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        assert _request(server, "GET", "/", headers={"Host": host})[0] == 200
    origin = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
    status, res = _request(server, "POST", "/api/generate", {"prompt": PROMPT}, origin)
    assert status == 200, res


def test_model_is_one_given_at_start_up_and_errors_reveal_no_paths(server):
    status, page = _request(server, "GET", "/")
    assert status == 200 and b'<option value="tiny" selected>' in page and b'<option value="demo">' in page
    answers = set()
    for model in ("/etc", "/nonexistent", "../../", "runwayml/stable-diffusion-v1-5", "tiny "):
        status, res = _request(server, "POST", "/api/generate", {"prompt": PROMPT, "model": model})
        assert status == 400
        answers.add(_one_line_error(res).replace(repr(model), "M"))
    assert len(answers) == 1  # the same answer whether a folder exists, is a pipeline or not
    assert "model_index" not in answers.pop()


def test_the_bundled_demo_model_is_always_offered(server):
    status, res = _request(server, "POST", "/api/generate", {"prompt": "a red circle", "model": "demo"})
    assert status == 200, res
    assert set(res["words"]) == {"a", "red", "circle"}


BAD_BODIES = [
    # (body or raw bytes, headers, status, words of the reason)
    ({"prompt": PROMPT, "steps": None}, {}, 400, "steps"),
    ({"prompt": PROMPT, "steps": 2.9}, {}, 400, "steps"),
    ({"prompt": PROMPT, "steps": True}, {}, 400, "steps"),
    ({"prompt": PROMPT, "steps": 5000}, {}, 400, "at most 1000"),
    ({"prompt": "!!!"}, {}, 400, "no words"),
    ({"prompt": ["a", "list"]}, {}, 400, "prompt must be a string"),
    ({"prompt": PROMPT, "seeds": "0-999999999999"}, {}, 400, "more than 16"),
    ({"prompt": PROMPT, "seeds": "9" * 5000}, {}, 400, "seeds"),
    ({"prompt": PROMPT, "size": {"w": 1}}, {}, 400, "size"),
    ({"prompt": PROMPT, "frobnicate": 1}, {}, 400, "unknown field 'frobnicate'"),
    (b"\xff\xfe not utf-8", {"Content-Type": "application/json"}, 400, "JSON"),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400, "JSON object"),
    (b"{" * 50_000, {"Content-Type": "application/json"}, 400, "JSON"),
    (b"{}", {"Content-Type": "application/json", "Content-Length": "abc"}, 400, "Content-Length"),
    (b"{}", {"Content-Type": "application/json", "Content-Length": "-5"}, 400, "Content-Length"),
    (None, {"Content-Type": "application/json"}, 411, "Content-Length"),
    (b"{}", {"Content-Type": "application/json", "Content-Length": "200000"}, 413, "too large"),
]


@pytest.mark.parametrize("body, headers, status, reason", BAD_BODIES)
def test_every_bad_post_gets_a_4xx_and_a_one_line_reason(server, body, headers, status, reason):
    if isinstance(body, dict):
        got, res = _request(server, "POST", "/api/generate", body, headers)
    else:
        got, res = _request(server, "POST", "/api/generate", raw_body=body, headers=headers)
    assert got == status, res
    assert reason in _one_line_error(res)


@pytest.mark.parametrize("path", ["/files/%00", "/files/" + "a" * 300, "/files/a%00b/c", "/files/" + "%C3%A9/" * 3000])
def test_bad_file_names_get_404_not_a_dropped_connection(server, path):
    status, res = _request(server, "GET", path)
    assert status in (404, 414)
    if status == 404:
        _one_line_error(res)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_other_methods_get_405(server, method):
    status, _ = _request(server, method, "/api/generate")
    assert status == 405


def test_get_on_the_api_says_to_post(server):
    status, res = _request(server, "GET", "/api/generate")
    assert status == 405 and "POST" in _one_line_error(res)


def test_ui_models_are_checked_at_start_up(tmp_path):
    from daam_fast.cli import main

    assert main(["ui", "--model", str(tmp_path), "--port", "0"]) == 2  # a folder that is no pipeline
    with pytest.raises(session.UsageError, match="model_index.json"):
        session.check_model(str(tmp_path))
