"""``daam-fast ui``: a small local web UI (standard library ``http.server`` + one HTML page, no extra packages).

Why not Gradio: ``gradio`` 6.31 would pull about 20 packages (fastapi, uvicorn, pandas, ...) and downgrade
Pillow from the installed 13.0 to 12.3; this page needs none of that.

The page takes a prompt, a negative prompt, a model, seeds, steps and a size; the server generates under
:func:`daam_fast.trace`, writes the same outputs as ``daam-fast generate`` into a per-request folder and answers
with their URLs. The page shows the image, the words as buttons (click one: its overlay appears), the overlap
matrix, the dominance map, the seed sweep (2+ seeds) and a download link of the maps. One generation runs at a
time (a lock); the server listens on 127.0.0.1 unless told otherwise.

Against other web pages and hostile requests: only requests addressed to the server's own listen address (the
``Host`` header: DNS rebinding) and, when they carry one, from its own origin (``Origin``; ``Sec-Fetch-Site:
cross-site`` too) are served (else 421 / 403); a POST must be ``application/json`` (a page on another site can
send ``text/plain`` without asking); ``model`` is one of the models given at start-up or the bundled demo model
(``demo``), and no answer says whether a path exists; every bad request gets a 4xx with a one-line reason, and
an unexpected failure a 500 whose details stay in the server's log.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import re
import tempfile
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse, urlsplit

from . import session

__all__ = ["DEMO_MODEL", "PAGE", "UIServer", "make_server"]

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
 <label for="model">model</label><select id="model" name="model">__MODELS__</select>
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


#: The bundled demo model's name in the ``model`` field: always offered (``daam_fast/demo/model``).
DEMO_MODEL = "demo"
#: The fields a request may have.
FIELDS = ("prompt", "negative_prompt", "model", "seeds", "steps", "size")
#: Largest request body, in bytes.
MAX_BODY = 100_000
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_WILDCARD = {"", "0.0.0.0", "::"}


class _UserError(ValueError):
    """A bad request: answered with ``status`` (default 400) and its message."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def _host_port(value: str) -> tuple[str | None, int | None]:
    """``(host lower-cased without brackets, port or None)`` of a ``Host`` value; ``(None, None)`` if malformed."""
    try:
        parts = urlsplit("//" + value)
        return parts.hostname, parts.port
    except ValueError:
        return None, None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class UIServer(ThreadingHTTPServer):
    """The UI's HTTP server.

    Args:
        model: the model(s) a request may use, as given at start-up (folders, checkpoint files or hub ids; the
            first is the page's default); the bundled demo model (:data:`DEMO_MODEL`) is always offered too.
        pipelines: already loaded pipelines by model name (offered as well); the others are loaded on first use
            with :func:`daam_fast.session.load_pipeline` and ``load_options`` (dtype, config, offload, vae_tiling),
            and kept.
        workdir: where each request's outputs go (default: a new temporary folder).
    """

    daemon_threads = True

    def __init__(
        self,
        address,
        *,
        model: str | Sequence[str] = (),
        steps: int = 20,
        size: str = "512x512",
        pipelines=None,
        workdir=None,
        device: str = "auto",
        load_options: dict | None = None,
    ):
        super().__init__(address, _Handler)
        self._given = [m for m in ([model] if isinstance(model, str) else list(model)) if m]
        self.pipelines = dict(pipelines or {})
        #: The models a request may name, the page's default first.
        self.models = list(dict.fromkeys(self._given + list(self.pipelines) + [DEMO_MODEL]))
        self.default_model, self.default_steps, self.default_size = self.models[0], steps, size
        self.device = device
        self.load_options = dict(load_options or {})
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="daam_fast_ui_"))
        self.lock = threading.Lock()
        self.counter = 0
        host, self.port = self.server_address[0].lower(), self.server_address[1]
        self._wildcard = host in _WILDCARD
        # Names a browser may use for this server: its listen address, and loopback names when it listens there.
        self._names = {host} | (_LOOPBACK if host in _LOOPBACK or self._wildcard else set())

    def serves_host(self, value: str | None) -> bool:
        """Whether a request's ``Host`` is this server's own address (a page whose name was rebound to this
        machine's address sends its own name). IP literals are accepted on a wildcard listen address."""
        name, port = _host_port(value or "")
        if name is None or (port if port is not None else 80) != self.port:
            return False
        return name in self._names or (self._wildcard and _is_ip(name))

    def serves_origin(self, origin: str) -> bool:
        """Whether ``Origin`` is this server's own page (``http://`` + an address :meth:`serves_host` accepts)."""
        scheme, _, rest = origin.partition("://")
        return scheme.lower() == "http" and "/" not in rest and self.serves_host(rest)

    def page(self) -> bytes:
        options = "".join(
            f'<option value="{html.escape(m)}"{" selected" if i == 0 else ""}>{html.escape(m)}</option>'
            for i, m in enumerate(self.models)
        )
        html_page = PAGE.replace("__MODELS__", options)
        html_page = html_page.replace("__STEPS__", str(self.default_steps))
        return html_page.replace("__SIZE__", _attr(self.default_size)).encode()

    def pipeline(self, model: str):
        """The loaded pipeline of ``model`` (one of :attr:`models`, else :class:`_UserError`, the same answer for
        every other name: nothing about paths is revealed)."""
        if model not in self.models:
            raise _UserError(f"model {model!r} is not offered here; the models are {self.models}")
        if model not in self.pipelines:
            options = dict(self.load_options)
            if not Path(model).expanduser().is_file():  # configs of a single-file checkpoint only
                options.pop("config", None)
            self.pipelines[model] = session.load_pipeline(model, self.device, quiet=True, what="model", **options)
        return self.pipelines[model]

    def generate(self, form: dict) -> dict:
        """Run one request: ``form`` has prompt, negative_prompt, model, seeds, steps, size (see :data:`FIELDS`)."""
        unknown = [k for k in form if k not in FIELDS]
        if unknown:
            raise _UserError(f"unknown field {unknown[0]!r}; the fields are {list(FIELDS)}")
        for name in ("model", "size"):
            if name in form and not isinstance(form[name], str):
                raise _UserError(f"{name} must be a string, got {type(form[name]).__name__}")
        seeds = form.get("seeds", "0")
        if not isinstance(seeds, str) and not (isinstance(seeds, int) and not isinstance(seeds, bool)):
            raise _UserError(f"seeds must be a string such as 0-3, got {type(seeds).__name__}")
        try:
            request = session.make_request(
                form.get("prompt", ""),
                seeds=str(seeds),
                size=form.get("size", self.default_size),
                steps=form.get("steps", self.default_steps),
                negative_prompt=form.get("negative_prompt"),
                option_prefix="",
                max_seeds=16,
            )
        except session.UsageError as exc:
            raise _UserError(str(exc)) from None
        model = form.get("model") or self.default_model
        with self.lock:
            try:
                pipe = self.pipeline(model)
                self.counter += 1
                rid = f"r{self.counter}"
                report = session.generate(pipe, request, self.workdir / rid, model=model, command="ui", progress=False)
            except session.UsageError as exc:
                raise _UserError(str(exc)) from None
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

    def file(self, rel: str) -> Path | None:
        """The output file at ``rel`` under :attr:`workdir`, or None: only files inside the work folder (no "..",
        no absolute paths, no symlinks out); names the file system refuses (NUL, too long) are simply not there."""
        root = self.workdir.resolve()
        try:
            target = (root / rel).resolve()
            return target if root in target.parents and target.is_file() else None
        except (OSError, ValueError):
            return None


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
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")  # no framing by another page (clicks through it)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, extra: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", extra)

    def _error(self, status: int, message: str, extra: dict | None = None) -> None:
        self._json(status, {"error": " ".join(message.split())[:300]}, extra)

    def _refused(self) -> bool:
        """Answer (and return True) a request not addressed to this server or coming from another site's page."""
        host = self.headers.get("Host")
        if not self.server.serves_host(host):
            self._error(HTTPStatus.MISDIRECTED_REQUEST, f"refused: Host {host!r} is not this server's address")
            return True
        origin = self.headers.get("Origin")
        if origin is not None and not self.server.serves_origin(origin):
            self._error(HTTPStatus.FORBIDDEN, f"refused: a request from another origin (Origin {origin!r})")
            return True
        # From another site only a top-level navigation (a link followed to this page) is served: no fetches,
        # no embedding of its files or frames.
        navigation = (self.headers.get("Sec-Fetch-Mode"), self.headers.get("Sec-Fetch-Dest")) == (
            "navigate",
            "document",
        )
        if self.headers.get("Sec-Fetch-Site", "").lower() == "cross-site" and not navigation:
            self._error(HTTPStatus.FORBIDDEN, "refused: a request from another site (Sec-Fetch-Site: cross-site)")
            return True
        return False

    def do_GET(self):  # noqa: N802
        if self._refused():
            return None
        path = unquote(urlparse(self.path).path)
        if path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.server.page(), "text/html; charset=utf-8")
        if path == "/api/generate":
            return self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST a JSON request here", {"Allow": "POST"})
        target = self.server.file(path[len("/files/") :]) if path.startswith("/files/") else None
        try:
            body = None if target is None else target.read_bytes()
        except OSError:  # gone or unreadable since it was found
            body = None
        if body is None:
            return self._error(HTTPStatus.NOT_FOUND, f"not found: {path[:100]!r}")
        extra = {"Content-Disposition": f'attachment; filename="{target.name}"'}
        extra = extra if target.suffix == ".safetensors" else None
        return self._send(HTTPStatus.OK, body, _TYPES.get(target.suffix, "application/octet-stream"), extra)

    def _form(self) -> dict:
        """The request's JSON object, or :class:`_UserError` with the status that says what is wrong."""
        if self.headers.get_content_type() != "application/json":
            raise _UserError("POST a JSON body (Content-Type: application/json)", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise _UserError("a POST needs a Content-Length", HTTPStatus.LENGTH_REQUIRED)
        if not re.fullmatch(r"\s*[0-9]{1,12}\s*", raw):
            raise _UserError(f"bad Content-Length {raw[:40]!r}: expected a number of bytes")
        if int(raw) > MAX_BODY:
            raise _UserError(
                f"request too large: {int(raw)} bytes, at most {MAX_BODY}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        try:
            form = json.loads(self.rfile.read(int(raw)).decode("utf-8") or "{}")
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _UserError("the body is not JSON (UTF-8)") from None
        if not isinstance(form, dict):
            raise _UserError("expected a JSON object")
        return form

    def do_POST(self):  # noqa: N802
        if self._refused():
            return None
        if urlparse(self.path).path != "/api/generate":
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        try:
            return self._json(HTTPStatus.OK, self.server.generate(self._form()))
        except _UserError as exc:
            return self._error(exc.status, str(exc))
        except Exception as exc:  # the log keeps the traceback; the answer reveals nothing of the machine
            logger.exception("generation failed")
            return self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed ({type(exc).__name__}); see the server log"
            )

    def _not_allowed(self):
        if not self._refused():
            self._error(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{self.command} is not supported: GET pages and files, POST /api/generate",
                {"Allow": "GET, POST"},
            )

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed


def make_server(host: str = "127.0.0.1", port: int = 7860, **kwargs) -> UIServer:
    """A :class:`UIServer` bound to ``host:port`` (``port=0``: a free port, see ``server.server_address``);
    call ``serve_forever()`` (e.g. in a thread) and ``shutdown()``. ``kwargs`` go to :class:`UIServer`."""
    return UIServer((host, port), **kwargs)
