"""The single model worker: one thread runs every engine call, serving sessions round-robin.

Each turn serves one session: apply its pending controls (so they land exactly at a chunk
boundary), then generate ONE chunk if the session is running, unpaused and has queue room.
Because a session without room (a slow client) is skipped rather than waited on, a slow client
never stalls the others, and sessions never mix: every engine, recorder and chunk is owned by
exactly one session. Engine calls never run on the event loop, so sockets stay responsive while
the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from student.server import protocol as P
from student.server.recording import Mp4Recorder
from student.server.session import Session, Turn, TurnResult
from student.stream_types import FrameChunk, StreamEngine

log = logging.getLogger(__name__)

EngineFactory = Callable[[], StreamEngine]
_IDLE_RECHECK_S = 0.05


class SessionEngine:
    """The worker-thread half of a session: its engine (made lazily by the factory on the first
    start, dropped on stop) and its recorder. Only the model worker thread calls ``run_turn``;
    ``close`` may run on any thread (the recorder locks)."""

    def __init__(self, engine_factory: EngineFactory):
        self._factory = engine_factory
        self.engine: StreamEngine | None = None
        self.recorder: Mp4Recorder | None = None
        self._prompt = ""

    def run_turn(self, turn: Turn) -> TurnResult:
        """Apply ``turn.controls`` in order, then maybe generate one chunk; never raises."""
        started = None
        try:
            for control in turn.controls:
                started = self._apply(control, turn.record_path) or started
        except Exception as exc:   # noqa: BLE001 - any engine failure ends only this session
            code = P.E_RECORDING if isinstance(exc, _RecordingError) else P.E_ENGINE
            log.warning("session %d: control failed: %s", turn.session_id, exc, exc_info=True)
            return TurnResult(turn.epoch, error_code=code, error=f"{type(exc).__name__}: {exc}")
        chunk = None
        if turn.generate and self.engine is not None:
            try:
                chunk = self._next_chunk()
            except Exception as exc:   # noqa: BLE001
                log.warning("session %d: next_chunk failed: %s", turn.session_id, exc,
                            exc_info=True)
                return TurnResult(turn.epoch, started=started, error_code=P.E_ENGINE,
                                  error=f"{type(exc).__name__}: {exc}")
        return TurnResult(turn.epoch, chunk=chunk, started=started,
                          generated=turn.generate and self.engine is not None)

    def _apply(self, control: P.Control, record_path: str | None) -> dict | None:
        if isinstance(control, P.Start):
            self.close_recording()
            if self.engine is None:
                self.engine = _checked_engine(self._factory())
            engine = self.engine
            engine.start(control.prompt, seed=control.seed, guidance=control.guidance)
            self._prompt = control.prompt
            if control.record:
                if record_path is None:
                    raise _RecordingError("start asked to record but no record path was given")
                try:
                    self.recorder = Mp4Recorder(record_path, engine.fps, engine.width,
                                                engine.height)
                except Exception as exc:
                    raise _RecordingError(f"cannot record to {record_path}: {exc}") from exc
            return {"fps": float(engine.fps), "width": int(engine.width),
                    "height": int(engine.height), "recording": record_path}
        if isinstance(control, P.Stop):
            self.close_recording()
            self.engine = None   # frees the engine's caches (KV, VAE) while no stream runs
            return None
        engine = self.engine
        if engine is None:
            return None
        if isinstance(control, P.SetPrompt):
            engine.set_prompt(control.prompt)
            self._prompt = control.prompt
        elif isinstance(control, P.SetSeed):
            engine.set_seed(control.seed)
        elif isinstance(control, P.SetGuidance):
            engine.set_guidance(control.guidance)
        elif isinstance(control, P.Pause):
            engine.pause()
        elif isinstance(control, P.Resume):
            engine.resume()
        elif isinstance(control, P.Reset):
            engine.reset()
        return None

    def _next_chunk(self) -> FrameChunk | None:
        engine = self.engine
        assert engine is not None
        chunk = engine.next_chunk()
        if chunk is None:
            return None
        if not isinstance(chunk, FrameChunk):
            raise TypeError(f"{type(engine).__name__}.next_chunk returned "
                            f"{type(chunk).__name__}; it must return a FrameChunk or None")
        if chunk.frames.shape[1:3] != (engine.height, engine.width):
            raise ValueError(f"{type(engine).__name__} produced frames "
                             f"{list(chunk.frames.shape)} but declares height={engine.height}, "
                             f"width={engine.width}")
        if self.recorder is not None:
            self.recorder.append(chunk.frames, chunk.prompt_version, self._prompt)
        return chunk

    def detach(self) -> Mp4Recorder | None:
        """Drop the engine and hand over the recorder (for a session that has ended)."""
        recorder, self.recorder = self.recorder, None
        self.engine = None
        return recorder

    def close_recording(self) -> Path | None:
        recorder, self.recorder = self.recorder, None
        return recorder.close() if recorder is not None else None


class _RecordingError(RuntimeError):
    pass


def _checked_engine(engine: object) -> StreamEngine:
    if not isinstance(engine, StreamEngine):
        raise TypeError(f"the engine factory returned {type(engine).__name__}, which lacks "
                        "methods of student.stream_types.StreamEngine")
    for name in ("fps", "width", "height"):
        value = getattr(engine, name)
        if not value > 0:
            raise ValueError(f"{type(engine).__name__}.{name}={value} must be > 0")
    return engine


class ModelWorker:
    """Round-robin scheduler over sessions, running engine work on one dedicated thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-worker")
        self._sessions: list[tuple[Session, SessionEngine]] = []
        self._next = 0
        self._wake = asyncio.Event()
        self.turns = 0
        self.busy_seconds = 0.0

    def add(self, session: Session, engine_side: SessionEngine) -> None:
        self._sessions.append((session, engine_side))
        self.notify()

    def remove(self, session: Session) -> None:
        self._sessions = [(s, e) for s, e in self._sessions if s is not session]

    def notify(self) -> None:
        """Something changed (control, credit, queue room): re-check who is runnable."""
        self._wake.set()

    def _pick(self) -> tuple[Session, SessionEngine] | None:
        n = len(self._sessions)
        for i in range(n):
            k = (self._next + i) % n
            session, engine_side = self._sessions[k]
            if session.runnable():
                self._next = (k + 1) % n
                return session, engine_side
        return None

    async def run(self) -> None:
        """Serve turns until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            picked = self._pick()
            if picked is None:
                self._wake.clear()
                try:
                    # The timeout re-checks sessions in a short back-off after an empty chunk.
                    await asyncio.wait_for(self._wake.wait(), _IDLE_RECHECK_S)
                except (asyncio.TimeoutError, TimeoutError):
                    pass
                continue
            session, engine_side = picked
            turn = session.take_turn()
            t0 = time.perf_counter()
            try:
                result = await loop.run_in_executor(self._executor, engine_side.run_turn, turn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # noqa: BLE001 - run_turn never raises; belt and braces
                result = TurnResult(turn.epoch, error_code=P.E_ENGINE, error=repr(exc))
            self.busy_seconds += time.perf_counter() - t0
            self.turns += 1
            session.deliver(result)

    async def detach(self, engine_side: SessionEngine) -> Mp4Recorder | None:
        """Release a closed session's engine; returns its recorder for the caller to close.

        The detach runs on the model thread, so it is ordered after any turn still in flight for
        this session (which may have just opened or appended to the recorder); the slower ffmpeg
        finalisation is left to the caller, off the model thread.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, engine_side.detach)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
