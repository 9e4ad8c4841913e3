"""The live streaming server: WebSocket sessions + the static page + /metrics + /healthz.

One process, one asyncio loop, one model worker thread (``worker.ModelWorker``), a small JPEG
encode pool. Built on the ``websockets`` package alone: plain HTTP GETs are answered in
``process_request`` (the page, ``/metrics``, ``/healthz``); ``/ws`` upgrades to a session.

Entry points:
    ``serve(engine_factory, host, port, ...)``      async context manager (tests: port=0)
    ``run_server(engine_factory, host, port, ...)`` blocking, until cancelled / Ctrl-C
    ``serve_main(engine_factory, host, port, record_dir, max_sessions, ...)`` the CLI body
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import io
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from student.server import protocol as P
from student.server.config import ServerConfig
from student.server.session import Session
from student.server.worker import EngineFactory, ModelWorker, SessionEngine

log = logging.getLogger(__name__)

PAGE_PATH = Path(__file__).resolve().parent.parent / "web" / "index.html"
WS_PATH = "/ws"
_COUNTERS = ("frames_generated", "frames_sent", "drops")


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] RGB -> JPEG bytes (PIL releases the GIL while encoding)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _http_response(status: int, reason: str, content_type: str, body: bytes) -> Response:
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                       ("Content-Length", str(len(body))), ("Content-Type", content_type),
                       ("Cache-Control", "no-store")])
    return Response(status, reason, headers, body)


class StreamServer:
    """Sessions, the worker and the HTTP routes of one running server (made by ``serve``)."""

    def __init__(self, engine_factory: EngineFactory, config: ServerConfig):
        if not callable(engine_factory):
            raise TypeError(f"engine_factory must be a callable returning a StreamEngine, got "
                            f"{type(engine_factory).__name__}")
        if not PAGE_PATH.is_file():
            raise FileNotFoundError(f"the web page {PAGE_PATH} is missing from the installation")
        self.config = config
        self.engine_factory = engine_factory
        self.worker = ModelWorker()
        self.sessions: dict[int, Session] = {}
        self.host = "127.0.0.1"
        self.port = 0
        self.rejected_sessions = 0
        self._encode_pool = ThreadPoolExecutor(config.encode_threads, thread_name_prefix="jpeg")
        self._ids = itertools.count(1)
        self._sessions_total = 0
        self._closed_totals = dict.fromkeys(_COUNTERS, 0)
        self._t0 = time.monotonic()
        self._page = PAGE_PATH.read_bytes()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1).rstrip("/") + WS_PATH

    # ------------------------------------------------------------------------------- metrics

    def metrics(self) -> dict:
        """Server-wide counters (closed sessions included) and a snapshot per live session."""
        live = [s.snapshot() for s in self.sessions.values()]
        totals = {k: self._closed_totals[k] + sum(s[k] for s in live) for k in _COUNTERS}
        uptime = time.monotonic() - self._t0
        return {
            "uptime_s": round(uptime, 3), "sessions": len(live),
            "max_sessions": self.config.max_sessions, "sessions_total": self._sessions_total,
            "rejected_sessions": self.rejected_sessions, **totals,
            "worker": {"turns": self.worker.turns, "busy_s": round(self.worker.busy_seconds, 3),
                       "utilization": round(self.worker.busy_seconds / max(uptime, 1e-9), 4)},
            "per_session": live,
        }

    # ---------------------------------------------------------------------------------- HTTP

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            # Refuse cross-site WebSocket hijacking: a browser page from another origin must not
            # drive (or read) this server. Non-browser clients send no Origin and pass.
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("Host"):
                return connection.respond(403, f"cross-origin WebSocket from {origin} refused\n")
            return None
        if path in ("/", "/index.html"):
            return _http_response(200, "OK", "text/html; charset=utf-8", self._page)
        if path == "/metrics":
            body = json.dumps(self.metrics(), allow_nan=False).encode()
            return _http_response(200, "OK", "application/json", body)
        if path == "/healthz":
            body = json.dumps({"ok": True, "sessions": len(self.sessions)}).encode()
            return _http_response(200, "OK", "application/json", body)
        return connection.respond(404, f"no page at {path[:100]}; try / /metrics /healthz "
                                       f"{WS_PATH}\n")

    # ----------------------------------------------------------------------------- sessions

    async def handle(self, ws: ServerConnection) -> None:
        """One WebSocket connection = one session, until the client leaves."""
        if len(self.sessions) >= self.config.max_sessions:
            self.rejected_sessions += 1
            await ws.send(P.error_message(
                P.E_SERVER_FULL, f"the server is serving its maximum of "
                                 f"{self.config.max_sessions} sessions; try again later",
                fatal=True))
            await ws.close(1013, "server full")
            return
        session = Session(next(self._ids), self.config)
        engine_side = SessionEngine(self.engine_factory)
        self.sessions[session.id] = session
        self._sessions_total += 1
        self.worker.add(session, engine_side)
        limits = dataclasses.asdict(self.config.limits)
        session.post(P.server_message(
            "hello", protocol=P.PROTOCOL_VERSION, session=session.id, header_bytes=P.HEADER_BYTES,
            limits=limits, queue_frames=self.config.queue_frames,
            recording_available=self.config.record_dir is not None))
        sender = asyncio.create_task(self._sender(session, ws), name=f"sender-{session.id}")
        stats = asyncio.create_task(self._stats(session), name=f"stats-{session.id}")
        try:
            async for raw in ws:
                # Bounded outbox: stop reading (TCP pushes back) while replies are not drained.
                await session.outbox_room.wait()
                if sender.done():
                    break
                try:
                    control = P.parse_control(raw, self.config.limits)
                except P.ProtocolError as exc:
                    session.post_error(exc.code, exc.message)
                    continue
                session.apply_control(control)
                self.worker.notify()
        except ConnectionClosed:
            pass   # abrupt disconnects and oversize messages (1009) end up here
        finally:
            session.close()
            self.worker.remove(session)
            for task in (sender, stats):
                task.cancel()
            await asyncio.gather(sender, stats, return_exceptions=True)
            del self.sessions[session.id]
            recorder = await self.worker.detach(engine_side)
            # After the detach no turn of this session is in flight: its counters are final.
            for k in _COUNTERS:
                self._closed_totals[k] += getattr(session, k)
            if recorder is not None:
                await asyncio.get_running_loop().run_in_executor(None, recorder.close)

    async def _sender(self, session: Session, ws: ServerConnection) -> None:
        """The only writer of frames and messages for a session: messages first, then frames
        while the client has credit."""
        loop = asyncio.get_running_loop()
        timeout = self.config.send_timeout_s
        try:
            while session.state != "closed":
                message = session.pop_message()
                if message is not None:
                    await asyncio.wait_for(ws.send(message), timeout)
                    continue
                frame = session.pop_frame()
                if frame is not None:
                    self.worker.notify()   # the queue has room again
                    jpeg = await loop.run_in_executor(self._encode_pool, encode_jpeg,
                                                      frame.pixels, self.config.jpeg_quality)
                    if session.frame_stale(frame):
                        continue
                    header = dataclasses.replace(frame.header, sent_unix_ms=time.time() * 1000.0)
                    await asyncio.wait_for(ws.send(P.pack_frame(header, jpeg)), timeout)
                    session.frame_sent(frame)
                    continue
                session.wake_sender.clear()
                await session.wake_sender.wait()
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("session %d: send blocked > %.1f s; dropping the client", session.id,
                        timeout)
            ws.transport.abort()
        except ConnectionClosed:
            pass
        finally:
            # A dead sender drains nothing: never leave the reader waiting for outbox room.
            session.outbox_room.set()

    async def _stats(self, session: Session) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            # Skip when messages are still waiting: stats never pile up for a slow reader.
            if session.state in ("running", "stopped") and not session.outbox:
                session.post(P.server_message("stats", **session.snapshot()))

    def shutdown(self) -> None:
        self.worker.shutdown()
        self._encode_pool.shutdown(wait=True, cancel_futures=True)


@asynccontextmanager
async def serve(engine_factory: EngineFactory, host: str = "127.0.0.1", port: int = 0, *,
                config: ServerConfig | None = None, **config_fields) -> AsyncIterator[StreamServer]:
    """Run the server inside ``async with``; yields the ``StreamServer`` (``.url``, ``.port``,
    ``.metrics()``). ``port=0`` picks a free port. Either pass ``config`` or ServerConfig fields
    as keywords (e.g. ``max_sessions=2, record_dir=path``)."""
    if config is not None and config_fields:
        raise TypeError(f"pass either config= or ServerConfig fields, not both "
                        f"(got {sorted(config_fields)})")
    config = config or ServerConfig(**config_fields)
    server = StreamServer(engine_factory, config)
    worker_task: asyncio.Task | None = None
    try:
        async with ws_serve(server.handle, host, port, process_request=server.process_request,
                            max_size=config.ws_max_size, compression=None,
                            # JPEG does not deflate; compression would only burn CPU.
                            ) as ws_server:
            sockname = ws_server.sockets[0].getsockname()
            server.host, server.port = host, int(sockname[1])
            worker_task = asyncio.create_task(server.worker.run(), name="model-worker")
            yield server
    finally:
        # Connections are closed (and their handlers finished, recordings detached) above.
        if worker_task is not None:
            worker_task.cancel()
            await asyncio.gather(worker_task, return_exceptions=True)
        server.shutdown()


def run_server(engine_factory: EngineFactory, host: str = "127.0.0.1", port: int = 8765, *,
               config: ServerConfig | None = None, ready: Callable[[str], None] | None = None,
               **config_fields) -> None:
    """Serve until interrupted (Ctrl-C raises KeyboardInterrupt after a clean shutdown).
    ``ready(url)`` is called once the socket is bound (useful with port=0)."""

    async def main() -> None:
        async with serve(engine_factory, host, port, config=config, **config_fields) as server:
            if ready is not None:
                ready(server.url)
            await asyncio.Event().wait()

    asyncio.run(main())


def serve_main(engine_factory: EngineFactory, host: str = "127.0.0.1", port: int = 8765,
               record_dir: str | Path | None = None, max_sessions: int = 4,
               **config_fields) -> None:
    """The body of ``wan-distill serve``: print the URL, block until Ctrl-C.

    Extra keywords are ``ServerConfig`` fields (queue_frames, jpeg_quality, record_all, ...).
    """
    config = ServerConfig(max_sessions=max_sessions,
                          record_dir=Path(record_dir) if record_dir is not None else None,
                          **config_fields)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {host} exposes the generator to the network without "
              "authentication", flush=True)

    def ready(url: str) -> None:
        print(f"streaming on {url}  (metrics: {url}metrics; Ctrl-C stops)", flush=True)

    try:
        run_server(engine_factory, host, port, config=config, ready=ready)
    except KeyboardInterrupt:
        print("stopped", flush=True)
