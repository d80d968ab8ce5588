"""``daam-fast ui``: a small local web UI (standard library ``http.server`` + one HTML page, no extra packages).

Why not Gradio: ``gradio`` 6.31 would pull about 20 packages (fastapi, uvicorn, pandas, ...) and downgrade
Pillow from the installed 13.0 to 12.3; this page needs none of that.

The page takes a prompt, a negative prompt, a model, seeds, steps and a size; the server generates under
:func:`daam_fast.trace`, writes the same outputs as ``daam-fast generate`` into a per-request folder and answers
with their URLs. The page shows the image, the words as buttons (click one: its overlay appears), the overlap
matrix, the dominance map, the seed sweep (2+ seeds) and a download link of the maps. One generation runs at a
time (a lock); the server listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from . import session

__all__ = ["PAGE", "UIServer", "make_server", "serve"]

logger = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>daam-fast</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 1100px; }
 fieldset { border: 1px solid #ccc; display: grid; grid-template-columns: 9em 1fr; gap: .4em .8em; }
 input { font: inherit; padding: .2em; }
 #words button { margin: .2em; padding: .3em .7em; border: 1px solid #888; border-radius: 1em; background: #f4f4f4; }
 #words button.active { background: #222; color: #fff; }
 .row { display: flex; gap: 1em; flex-wrap: wrap; align-items: flex-start; }
 .row img { image-rendering: pixelated; border: 1px solid #ddd; }
 #status.error { color: #b00; }
</style></head>
<body>
<h1>daam-fast</h1>
<form id="form"><fieldset>
 <label for="prompt">prompt</label><input id="prompt" name="prompt" value="a red circle and a blue square">
 <label for="negative_prompt">negative prompt</label><input id="negative_prompt" name="negative_prompt" value="">
 <label for="model">model</label><input id="model" name="model" value="__MODEL__">
 <label for="seeds">seed(s)</label><input id="seeds" name="seeds" value="0" title="3, 0-7 or 1,4,9">
 <label for="steps">steps</label><input id="steps" name="steps" type="number" min="1" value="__STEPS__">
 <label for="size">size (WxH)</label><input id="size" name="size" value="__SIZE__">
</fieldset><p><button id="generate" type="submit">Generate</button> <span id="status"></span></p></form>
<div id="result" hidden>
 <div class="row">
  <figure><img id="image" width="256" alt="image"><figcaption>image (seed <span id="seed"></span>)</figcaption></figure>
  <figure><img id="overlay" width="256" alt="overlay">
   <figcaption>overlay: <b id="overlay-word">-</b></figcaption></figure>
 </div>
 <p>words (click one): <span id="words"></span></p>
 <p><a id="download" download>download the maps (safetensors)</a> · <a id="report" target="_blank">report.json</a></p>
 <div class="row"><img id="overlap" alt="overlap matrix" width="520"><img id="dominance" alt="dominance map"
   width="560"></div>
 <div class="row"><img id="seed_sweep" alt="seed sweep" width="700" hidden></div>
</div>
<script>
const $ = (id) => document.getElementById(id);
function showWord(res, word) {
  $("overlay").src = res.overlays[word];
  $("overlay").dataset.word = word;
  $("overlay-word").textContent = word;
  for (const b of document.querySelectorAll("#words button")) b.classList.toggle("active", b.dataset.word === word);
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = Object.fromEntries(new FormData($("form")).entries());
  $("status").className = ""; $("status").textContent = "generating...";
  $("generate").disabled = true;
  try {
    const r = await fetch("/api/generate", {method: "POST", body: JSON.stringify(body),
                                            headers: {"Content-Type": "application/json"}});
    const res = await r.json();
    if (!r.ok) throw new Error(res.error || r.statusText);
    $("image").src = res.image; $("seed").textContent = res.seed;
    $("overlap").src = res.overlap; $("dominance").src = res.dominance;
    $("download").href = res.maps; $("report").href = res.report;
    $("seed_sweep").hidden = !res.seed_sweep; if (res.seed_sweep) $("seed_sweep").src = res.seed_sweep;
    $("words").replaceChildren(...res.words.map((w) => {
      const b = document.createElement("button");
      b.type = "button"; b.textContent = w; b.dataset.word = w; b.className = "word";
      b.addEventListener("click", () => showWord(res, w));
      return b;
    }));
    $("overlay").removeAttribute("src"); $("overlay").dataset.word = ""; $("overlay-word").textContent = "-";
    $("result").hidden = false;
    $("status").textContent = "done";
  } catch (e) {
    $("status").className = "error"; $("status").textContent = "error: " + e.message;
  } finally {
    $("generate").disabled = false;
  }
});
</script></body></html>
"""


class _UserError(ValueError):
    """A bad request: answered with 400 and its message."""


class UIServer(ThreadingHTTPServer):
    """The UI's HTTP server. ``pipelines`` maps model strings to already loaded pipelines (others are loaded with
    :func:`daam_fast.session.load_pipeline` on first use, with ``load_options`` (dtype, config, offload,
    vae_tiling), and kept); outputs go under ``workdir``."""

    daemon_threads = True

    def __init__(
        self,
        address,
        *,
        model: str = "",
        steps: int = 20,
        size: str = "512x512",
        pipelines=None,
        workdir=None,
        device: str = "auto",
        load_options: dict | None = None,
    ):
        super().__init__(address, _Handler)
        self.default_model, self.default_steps, self.default_size = model, steps, size
        self.pipelines = dict(pipelines or {})
        self.device = device
        self.load_options = dict(load_options or {})
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="daam_fast_ui_"))
        self.lock = threading.Lock()
        self.counter = 0

    def page(self) -> bytes:
        html = PAGE.replace("__MODEL__", _attr(self.default_model))
        html = html.replace("__STEPS__", str(self.default_steps)).replace("__SIZE__", _attr(self.default_size))
        return html.encode()

    def pipeline(self, model: str):
        if model not in self.pipelines:
            options = dict(self.load_options)
            if not Path(model).expanduser().is_file():  # configs of a single-file checkpoint only
                options.pop("config", None)
            self.pipelines[model] = session.load_pipeline(model, self.device, quiet=True, what="model", **options)
        return self.pipelines[model]

    def generate(self, form: dict) -> dict:
        """Run one request: ``form`` has prompt, negative_prompt, model, seeds, steps, size (strings)."""
        try:
            request = session.make_request(
                form.get("prompt", ""),
                seeds=str(form.get("seeds", "0")),
                size=str(form.get("size", self.default_size)),
                steps=form.get("steps", self.default_steps),
                negative_prompt=form.get("negative_prompt"),
                option_prefix="",
                max_seeds=16,
            )
        except session.UsageError as exc:
            raise _UserError(str(exc)) from None
        model = str(form.get("model") or self.default_model)
        if not model:
            raise _UserError("no model given")
        with self.lock:
            try:
                pipe = self.pipeline(model)
            except session.UsageError as exc:
                raise _UserError(str(exc)) from None
            self.counter += 1
            rid = f"r{self.counter}"
            report = session.generate(pipe, request, self.workdir / rid, model=model, command="ui", progress=False)
        url = lambda rel: f"/files/{rid}/{rel}"  # noqa: E731
        run, figs = report["runs"][0], report["figures"]
        return {
            "seed": run["seed"],
            "image": url(run["image"]),
            "words": report["words"],
            "overlays": {w: url(p) for w, p in run["overlays"].items()},
            "overlap": url(figs[f"seed{run['seed']}/overlap"]["path"]),
            "dominance": url(figs[f"seed{run['seed']}/dominance"]["path"]),
            "maps": url(run["maps"]),
            "report": url("report.json"),
            "seed_sweep": url("seed_sweep.png") if report["seed_sweep"] else None,
        }


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


_TYPES = {".png": "image/png", ".json": "application/json", ".safetensors": "application/octet-stream"}


class _Handler(BaseHTTPRequestHandler):
    server: UIServer

    def log_message(self, fmt, *args):  # route the access log to logging, not stderr
        logger.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):  # noqa: N802
        path = unquote(urlparse(self.path).path)
        if path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.server.page(), "text/html; charset=utf-8")
        if path.startswith("/files/"):
            root = self.server.workdir.resolve()
            target = (root / path[len("/files/") :]).resolve()
            # Only files inside the work folder: no "..", no absolute paths, no symlinks out.
            if root in target.parents and target.is_file():
                extra = {"Content-Disposition": f'attachment; filename="{target.name}"'}
                extra = extra if target.suffix == ".safetensors" else None
                ctype = _TYPES.get(target.suffix, "application/octet-stream")
                return self._send(HTTPStatus.OK, target.read_bytes(), ctype, extra)
        self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path}"})

    def do_POST(self):  # noqa: N802
        if urlparse(self.path).path != "/api/generate":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if length > 100_000:
                raise _UserError("request too large")
            form = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(form, dict):
                raise _UserError("expected a JSON object")
            self._json(HTTPStatus.OK, self.server.generate(form))
        except (_UserError, json.JSONDecodeError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:  # the page shows the message; the log keeps the traceback
            logger.exception("generation failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})


def make_server(host: str = "127.0.0.1", port: int = 7860, **kwargs) -> UIServer:
    """A :class:`UIServer` bound to ``host:port`` (``port=0``: a free port, see ``server.server_address``);
    call ``serve_forever()`` (e.g. in a thread) and ``shutdown()``. ``kwargs`` go to :class:`UIServer`."""
    return UIServer((host, port), **kwargs)


def serve(host: str = "127.0.0.1", port: int = 7860, **kwargs) -> None:
    """Run the UI until interrupted (``daam-fast ui``)."""
    server = make_server(host, port, **kwargs)
    h, p = server.server_address[:2]
    logger.info("daam-fast UI on http://%s:%s/", h, p)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
