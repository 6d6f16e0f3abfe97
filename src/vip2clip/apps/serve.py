"""`vip2clip serve`: the prediction API and its browser page, a FastAPI app served by uvicorn.

Routes: `GET /` the page (package data `serve_page.html`), `GET /api/info` model, thresholds and limits,
`GET /api/examples` the bundled synthetic examples, `POST /api/example?name=...` and `POST /api/predict` a
prediction (JSON; `?images=true` adds the display PNGs the page draws). OpenAPI at `/openapi.json` and `/docs`
(Swagger UI served from the fastapi-offline package's files, so it works without internet; `/redoc` too).
`POST /api/predict` takes the image as the raw request body (`Content-Type: image/*` or
`application/octet-stream`) or as the one file of a `multipart/form-data` upload.

Limits (`ServeLimits`): Content-Length is checked before the body is read and the bytes are counted while they
arrive (chunked bodies), so nothing above `max_upload_bytes` is held (413); a body must arrive within `body_timeout`
(408) and request headers within `header_timeout` (else the connection is closed); images above `max_pixels` are
refused from their header (413); at most `max_queue` requests are admitted at once (uploading, waiting or running)
and the rest get 503 with Retry-After; decoding and prediction run one at a time on a worker thread
(`serve_jobs.JobQueue`), off the event loop. Clients that leave are dropped quietly (a job still waiting is
skipped). Every error is JSON `{"error": "..."}`.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket

from fastapi_offline import FastAPIOffline

from vip2clip import __version__
from vip2clip.apps.serve_jobs import (
    Example,
    ServeLimits,
)
from vip2clip.apps.serve_routes import EXCEPTION_HANDLERS, ServeState, router
from vip2clip.inference.predictor import Predictor

logger = logging.getLogger(__name__)


def create_app(predictor: Predictor, *, limits: ServeLimits | None = None, examples: list[Example] | None = None):
    """The FastAPI app of `vip2clip serve` for `predictor`: the routes of `vip2clip.apps.serve_routes` with their
    shared `ServeState` on `app.state.serve` (its job queue also on `app.state.jobs`)."""
    state = ServeState.of(predictor, limits=limits, examples=examples)
    app = FastAPIOffline(  # /docs with Swagger UI's files from the fastapi-offline package: no CDN, works offline
        title="vip2clip",
        version=__version__,
        description="Zero-shot anomaly detection (ViP²-CLIP): score an image, get its decision and defect area.",
    )
    app.state.serve, app.state.jobs = state, state.jobs
    for kind, handler in EXCEPTION_HANDLERS:
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str = "127.0.0.1", port: int = 7860) -> socket.socket:
    """A listening TCP socket (port 0 picks a free port); ValueError naming the address when that fails.

    Bound before the model loads, so a taken port is reported at once. Warns for a non-loopback address.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0 picks a free port), got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    if not is_loopback(host):
        logger.warning("binding %s: the server is reachable from other machines and has no authentication", host)
    return sock


def _protocol_with_header_timeout(seconds: float) -> type:
    """uvicorn's h11 protocol, also closing a connection whose request headers are not complete `seconds` after it
    opened or after its previous answer: uvicorn times out idle kept-alive connections and we time out bodies, but
    nothing else stops a client that trickles its headers (slowloris) from holding a connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _armed = 0  # generation of the latest timer: an older timer has nothing left to check

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self._armed += 1
            self.loop.call_later(seconds, self._expire, self._armed)

        def _expire(self, armed: int) -> None:
            if armed == self._armed and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def make_server(predictor: Predictor, *, limits: ServeLimits | None = None, examples: list[Example] | None = None):
    """A uvicorn.Server for the app (not yet running: `server.run(sockets=[listen(...)])`)."""
    import uvicorn

    limits = limits or ServeLimits()
    config = uvicorn.Config(
        create_app(predictor, limits=limits, examples=examples),
        http=_protocol_with_header_timeout(limits.header_timeout),
        log_config=None,  # uvicorn's records go through the CLI's logging set-up
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  (a float works)
        timeout_graceful_shutdown=5,
        limit_concurrency=max(256, 4 * limits.max_queue),  # connections beyond this get uvicorn's plain-text 503
        server_header=False,
    )
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop chatter; warnings stay
    server = uvicorn.Server(config)
    server.handle_exit = _saying_stopping(server)  # uvicorn installs it as the SIGINT/SIGTERM handler when it runs
    return server


def _saying_stopping(server):
    """uvicorn's signal handler, which first says that the server stops (uvicorn's own line is silenced above)."""
    handle_exit = server.handle_exit

    def stopping(sig: int, frame) -> None:
        if not server.should_exit:
            name = signal.Signals(sig).name
            print(f"stopping ({name}): new connections refused, waiting requests dropped", flush=True)
        handle_exit(sig, frame)

    return stopping


def serve(
    predictor: Predictor,
    sock: socket.socket,
    *,
    limits: ServeLimits | None = None,
    examples: list[Example] | None = None,
) -> None:
    """Serve on the listening `sock` (see `listen`) until SIGINT/SIGTERM; prints the URL once it serves."""
    server = make_server(predictor, limits=limits, examples=examples)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    start = server.startup

    async def start_then_announce(sockets: list[socket.socket] | None = None) -> None:
        # The URL is printed once uvicorn serves and handles SIGINT/SIGTERM (`_saying_stopping`): a Ctrl+C sent on
        # seeing it always gets "stopping (SIGINT)"; printed before `run`, an early one met Python's default handler.
        await start(sockets=sockets)
        if server.started:
            docs = "API docs: /docs, schema: /openapi.json; Ctrl+C stops"
            print(f"serving the vip2clip demo on http://{shown}:{port}/ ({docs})", flush=True)

    server.startup = start_then_announce
    try:
        server.run(sockets=[sock])
    finally:
        server.config.app.state.jobs.close()
        sock.close()
