"""Per-session state on the event-loop side: credits, the bounded frame queue, pending controls.

Everything here runs on the server's asyncio loop thread (no locks needed); the engine itself
lives on the model worker thread (``worker.SessionEngine``) and only ever sees the controls this
object hands it at a chunk boundary.

Backpressure policy (credit based, HOLD, not drop): the client grants frames with
``credit {n}`` (every ``start`` begins with zero credit, so a client grants right after its
start); the sender sends a frame only while credits > 0. Frames the client has no credit for
wait in the session's queue; the worker generates for a session only while less than one chunk
waits there (one chunk of look-ahead), so a slow client costs no compute, holds fewer than two
chunks of frames (hard bound ``queue_frames``), and never delays other sessions. Frames are
DROPPED (counted in ``drops`` and flagged ``DROPPED_BEFORE`` on the next frame sent) only when
they went stale: the queue and the chunk in flight are discarded on ``reset``, ``start`` and
``stop``; and a chunk larger than the queue bound trims the oldest queued frames. A prompt
switch does not flush: with one chunk of look-ahead the new prompt reaches the client behind at
most two chunks (the queued one and the one in flight) plus the client's own credit window, and
the video is not cut.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from student.server import protocol as P
from student.server.config import ServerConfig
from student.stream_types import FrameChunk

_FPS_WINDOW_S = 2.0
_MAX_OUTBOX = 64
_NONE_BACKOFF_S = 0.05


@dataclass
class QueuedFrame:
    """One generated frame waiting for credit: pixels uint8 [H, W, 3] plus its header fields."""

    pixels: np.ndarray
    header: P.FrameHeader
    epoch: int


@dataclass(frozen=True)
class Turn:
    """What the worker does for a session in one turn: apply ``controls`` in order, then
    generate one chunk if ``generate``. ``epoch`` tags the result so stale output is dropped."""

    session_id: int
    controls: tuple[P.Control, ...]
    generate: bool
    epoch: int
    record_path: str | None


@dataclass(frozen=True)
class TurnResult:
    epoch: int
    chunk: FrameChunk | None = None
    generated: bool = False                 # next_chunk was called this turn
    started: dict[str, Any] | None = None   # fps, width, height, recording after a Start
    error_code: str | None = None
    error: str | None = None


def _control_slot(control: P.Control) -> str:
    # Pending controls coalesce per slot, last writer wins; pause/resume share one slot.
    return "pause" if isinstance(control, (P.Pause, P.Resume)) else type(control).__name__


class Session:
    """One WebSocket client. States: idle (connected) -> running <-> stopped -> closed."""

    def __init__(self, session_id: int, config: ServerConfig):
        self.id = session_id
        self.config = config
        self.state = "idle"
        self.paused = False
        self.credits = 0
        self.queue: deque[QueuedFrame] = deque()
        self.outbox: deque[str] = deque()
        self.epoch = 0
        self.pending: list[P.Control] = []
        self.turn_in_flight = False
        self.record_path: str | None = None
        self.prompt = ""
        self._starts = 0
        self._last_chunk_frames = 0
        self._next_frame_index = 0
        self._drop_flag = False
        self._sent_times: deque[float] = deque(maxlen=512)
        self._t_start: float | None = None
        self._start_epoch = 0
        self._retry_at = 0.0
        # Counters (cumulative over the connection).
        self.frames_generated = 0
        self.frames_sent = 0
        self.drops = 0
        self.queue_peak = 0
        self.gen_seconds = 0.0
        self.ttff_s: float | None = None
        self.prompt_version_sent: int | None = None
        self.errors_sent = 0
        # Wakes the sender task (new frame, credit or message) and the reader (outbox room).
        self.wake_sender = asyncio.Event()
        self.outbox_room = asyncio.Event()
        self.outbox_room.set()

    # -------------------------------------------------------------------- messages to the client

    def post(self, message: str) -> None:
        """Queue a text message for the sender task (sent before any further frame)."""
        self.outbox.append(message)
        if len(self.outbox) >= _MAX_OUTBOX:
            self.outbox_room.clear()
        self.wake_sender.set()

    def post_error(self, code: str, message: str) -> None:
        self.errors_sent += 1
        self.post(P.error_message(code, message))

    def pop_message(self) -> str | None:
        if not self.outbox:
            return None
        message = self.outbox.popleft()
        if len(self.outbox) < _MAX_OUTBOX:
            self.outbox_room.set()
        return message

    # -------------------------------------------------------------------------------- controls

    def apply_control(self, control: P.Control) -> None:
        """Update session state for a validated client control; replies go to the outbox."""
        if isinstance(control, P.Credit):
            self.credits = min(self.credits + control.n, self.config.limits.max_credit)
            self.wake_sender.set()
            return
        if isinstance(control, P.Start):
            self._start(control)
            return
        if self.state != "running":
            self.post_error(P.E_NOT_STARTED, f"'{P.CONTROL_NAME[type(control)]}' needs a running "
                                             "stream; send {\"type\": \"start\", ...} first")
            return
        if isinstance(control, P.Stop):
            self.state = "stopped"
            self.paused = False
            self._invalidate()
            self.pending = [control]
            self.post(P.server_message("stopped", frames_sent=self.frames_sent))
            return
        if isinstance(control, P.Reset):
            self._invalidate()
        elif isinstance(control, P.Pause):
            self.paused = True
        elif isinstance(control, P.Resume):
            self.paused = False
        elif isinstance(control, P.SetPrompt):
            self.prompt = control.prompt
        slot = _control_slot(control)
        for i, queued in enumerate(self.pending):
            if _control_slot(queued) == slot:
                self.pending[i] = control
                break
        else:
            self.pending.append(control)
        self.post(P.server_message("ok", of=P.CONTROL_NAME[type(control)]))

    def _start(self, control: P.Start) -> None:
        if self.state == "running":
            self.post_error(P.E_ALREADY_STARTED, "the stream is running; send "
                                                 "{\"type\": \"stop\"} before a new start")
            return
        record = control.record or self.config.record_all
        if record and self.config.record_dir is None:
            self.post_error(P.E_RECORDING, "recording was asked for but the server has no "
                                           "record dir; restart it with --record-dir DIR or "
                                           "send start without \"record\"")
            return
        self._starts += 1
        name = f"session-{self.id:05d}-{self._starts:03d}-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
        self.record_path = str(self.config.record_dir / name) if record else None
        self.state = "running"
        self.paused = False
        self.prompt = control.prompt
        self._invalidate()
        # Every stream starts with an empty credit window: the client grants after its start.
        self.credits = 0
        self._start_epoch = self.epoch
        # Everything queued before a start belongs to the previous stream.
        self.pending = [P.Start(control.prompt, control.seed, control.guidance, record)]
        self._t_start = time.monotonic()
        self.ttff_s = None

    def _invalidate(self) -> None:
        """Discard queued frames and whatever chunk is in flight (they belong to a dead stream)."""
        self.epoch += 1
        if self.queue:
            self.drops += len(self.queue)
            self._drop_flag = True
            self.queue.clear()

    # --------------------------------------------------------------------------- worker side

    def _has_room(self) -> bool:
        # Generate only while less than one chunk waits for credit: one chunk of look-ahead hides
        # generation time, more would only add latency (a prompt switch queues behind it). An
        # empty queue always has room, so a chunk larger than the bound cannot deadlock.
        if not self.queue:
            return True
        n = len(self.queue)
        chunk = self._last_chunk_frames
        return n < chunk and n + chunk <= self.config.queue_frames

    def runnable(self) -> bool:
        """True when the worker has something to do for this session this round."""
        if self.state == "closed" or self.turn_in_flight:
            return False
        if self.pending:
            return True
        return (self.state == "running" and not self.paused and self._has_room()
                and time.monotonic() >= self._retry_at)

    def take_turn(self) -> Turn:
        generate = self.state == "running" and not self.paused and self._has_room()
        turn = Turn(self.id, tuple(self.pending), generate, self.epoch, self.record_path)
        self.pending = []
        self.turn_in_flight = True
        return turn

    def deliver(self, result: TurnResult) -> None:
        """Take the worker's output for this session (loop thread)."""
        self.turn_in_flight = False
        if self.state == "closed":
            if result.chunk is not None:   # generated (and recorded) after the client left
                self.frames_generated += result.chunk.n_frames
                self.drops += result.chunk.n_frames
            return
        current = result.epoch == self.epoch
        if result.started is not None and current:
            self.post(P.server_message("started", session=self.id, **result.started))
        if result.error is not None:
            self.post_error(result.error_code or P.E_ENGINE, result.error + " (the stream was "
                            "stopped; send start to try again)")
            if current:
                self.state = "stopped"
                self.paused = False
                self._invalidate()
                self.pending = [P.Stop()]   # the worker drops the engine and closes the recording
            return
        chunk = result.chunk
        if chunk is None:
            if result.generated:
                # The engine had nothing although asked (it paused itself): do not spin on it.
                self._retry_at = time.monotonic() + _NONE_BACKOFF_S
            return
        n = chunk.n_frames
        base = self._next_frame_index
        self._next_frame_index += n
        self.frames_generated += n
        self.gen_seconds += chunk.gen_seconds
        self._last_chunk_frames = n
        if not current or self.state != "running":
            self.drops += n
            self._drop_flag = True
            return
        gen_ms = 1000.0 * chunk.gen_seconds
        for k in range(n):
            flags = 0
            if self._drop_flag:
                flags |= P.FLAG_DROPPED_BEFORE
                self._drop_flag = False
            if chunk.first_frame_index + k == 0:
                flags |= P.FLAG_STREAM_START
            header = P.FrameHeader(frame_index=base + k, prompt_version=chunk.prompt_version,
                                   timestamp=float(chunk.timestamps[k]), gen_ms=gen_ms,
                                   chunk_frames=n, chunk_pos=k, flags=flags)
            self.queue.append(QueuedFrame(chunk.frames[k], header, self.epoch))
        # Safety bound for a chunk bigger than the queue: drop the oldest, flag the new head.
        overflow = len(self.queue) - self.config.queue_frames
        if overflow > 0:
            for _ in range(overflow):
                self.queue.popleft()
            self.drops += overflow
            head = self.queue[0]
            head.header = _with_flag(head.header, P.FLAG_DROPPED_BEFORE)
        self.queue_peak = max(self.queue_peak, len(self.queue))
        self.wake_sender.set()

    # --------------------------------------------------------------------------- sender side

    def pop_frame(self) -> QueuedFrame | None:
        """The next frame the client has credit for (consumes one credit), else None."""
        if self.credits <= 0 or not self.queue:
            return None
        self.credits -= 1
        return self.queue.popleft()

    def frame_sent(self, frame: QueuedFrame) -> None:
        now = time.monotonic()
        self.frames_sent += 1
        self._sent_times.append(now)
        self.prompt_version_sent = frame.header.prompt_version
        if self.ttff_s is None and self._t_start is not None:
            self.ttff_s = now - self._t_start

    def frame_stale(self, frame: QueuedFrame) -> bool:
        """True (and counted as a drop) when a reset/stop happened while it was being encoded."""
        if frame.epoch == self.epoch and self.state == "running":
            return False
        self.drops += 1
        self._drop_flag = True
        # The client granted credit for a frame it will now never get: give the credit back,
        # unless it was granted for a stream that a start has since replaced.
        if frame.epoch >= self._start_epoch:
            self.credits = min(self.credits + 1, self.config.limits.max_credit)
        return True

    def close(self) -> None:
        self.state = "closed"
        self.epoch += 1
        self.queue.clear()
        self.pending = []
        self.wake_sender.set()
        self.outbox_room.set()

    # --------------------------------------------------------------------------------- stats

    def fps(self) -> float:
        """Frames sent per second over the last ~2 s (0 when fewer than 2 frames or idle)."""
        now = time.monotonic()
        recent = [t for t in self._sent_times if now - t <= _FPS_WINDOW_S]
        if len(recent) < 2 or recent[-1] == recent[0]:
            return 0.0
        return (len(recent) - 1) / (recent[-1] - recent[0])

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready per-session stats (``/metrics`` and the ``stats`` message)."""
        return {
            "session": self.id, "state": self.state, "paused": self.paused,
            "prompt": self.prompt[:200], "prompt_version": self.prompt_version_sent,
            "frames_generated": self.frames_generated, "frames_sent": self.frames_sent,
            "drops": self.drops, "queue_frames": len(self.queue), "queue_peak": self.queue_peak,
            "queue_capacity": self.config.queue_frames, "credits": self.credits,
            "ttff_s": self.ttff_s, "fps": round(self.fps(), 3),
            "gen_fps": round(self.frames_generated / self.gen_seconds, 3) if self.gen_seconds > 0
            else None,
            "errors_sent": self.errors_sent, "recording": self.record_path,
        }



def _with_flag(header: P.FrameHeader, flag: int) -> P.FrameHeader:
    return P.FrameHeader(**{**header.__dict__, "flags": header.flags | flag})
