"""The HTTP side: the page, and a small JSON API over `LabelQueue` on 127.0.0.1.

    GET  /             the labeling page (page.html)
    GET  /api/state    {"state": ...}                          (see `LabelQueue.state`)
    POST /api/choice   {"id": ..., "choice": "left" | "right" | "tie" | "skip"} -> {"state": ...}
    POST /api/undo     {} -> {"undone": id, "state": ...}

A refused choice or undo answers 409 with {"error", "state"}: the page shows the message and the
pair the files now say is next. Requests must name this host (no DNS rebinding), and POSTs must
be JSON from this origin (another site cannot make the browser send them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from jaxdpo.annotate import DEFAULT_PORT
from jaxdpo.annotate.queue import Conflict, LabelQueue
from jaxdpo.experiment.folder import resume_command
from jaxdpo.errors import UserError


def make_server(out_dir: str | os.PathLike, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """A server (not yet serving) for the pending pairs of the run in `out_dir`; port 0 picks a free one."""
    queue = LabelQueue(out_dir)
    if queue.state()["pair"] is None:
        raise UserError(f"every pair requested in {queue.folder} is labeled; continue the run with: {resume_command(queue.out_dir)}")
    handler = type("Handler", (_Handler,), {"queue": queue})
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), handler)
    except (OSError, OverflowError) as error:  # in use, not allowed, out of range
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({error}); choose another port with --port") from None


def serve(out_dir: str | os.PathLike, port: int = DEFAULT_PORT, *, say: Callable[[str], None] = print) -> None:
    """Serve the page until Ctrl-C."""
    server = make_server(out_dir, port)
    state = server.RequestHandlerClass.queue.state()
    say(
        f"{state['total'] - state['done']} pairs to label: open http://127.0.0.1:{server.server_port}/ "
        "(Ctrl-C stops; every choice is saved the moment it is made)"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped; every choice made is saved")
    finally:
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    queue: LabelQueue

    def do_GET(self) -> None:
        if not self._local_host():
            self._send_json(403, {"error": "unknown host"})
        elif self.path == "/":
            self._send(200, resources.files("jaxdpo.annotate").joinpath("page.html").read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/api/state":
            self._reply(lambda: {"state": self.queue.state()})
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if not (self._local_host() and self._from_this_page()):
            self._send_json(403, {"error": "only this page may post, as JSON"})
        elif self.path == "/api/choice":
            self._reply(lambda: {"state": self.queue.choose(*_choice_of(self._body()))})
        elif self.path == "/api/undo":
            self._reply(lambda: dict(zip(("undone", "state"), self.queue.undo())))
        else:
            self._send_json(404, {"error": "not found"})

    def _reply(self, action: Callable[[], dict]) -> None:
        try:
            self._send_json(200, action())
        except Conflict as conflict:
            self._send_json(409, {"error": str(conflict), "state": self.queue.state()})
        except ValueError as error:
            self._send_json(400, {"error": f"bad request: {error}"})
        except UserError as error:  # an answer file damaged by hand: the message names its lines
            self._send_json(500, {"error": str(error)})

    def _local_host(self) -> bool:
        return self.headers.get("Host") in (f"127.0.0.1:{self.server.server_port}", f"localhost:{self.server.server_port}")

    def _from_this_page(self) -> bool:
        origin = self.headers.get("Origin")
        return self.headers.get_content_type() == "application/json" and origin in (None, f"http://{self.headers['Host']}")

    def _body(self):
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")

    def _send_json(self, status: int, reply: dict) -> None:
        self._send(status, json.dumps(reply).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # quiet: the page says what happened
        pass


def _choice_of(body) -> tuple[str, str]:
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(body.get("choice"), str):
        raise ValueError('expected {"id": string, "choice": string}')
    return body["id"], body["choice"]
