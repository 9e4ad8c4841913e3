"""Run knobs of the streaming server (one typed config, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from student.server.protocol import ProtocolLimits


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``serve``/``run_server`` can be tuned with.

    Attributes:
        max_sessions: concurrent WebSocket sessions; one more is answered ``server_full``.
        queue_frames: hard per-session bound on generated-but-unsent frames. The worker only
            generates for a session while less than one chunk waits (hold), so the queue stays
            under two chunks; set this >= 2 chunks - 1, or the oldest frames are dropped.
        jpeg_quality: PIL JPEG quality of streamed frames (85 is ~4x smaller than 100 and
            visually lossless for previews; see reference/streaming.md 4.7).
        encode_threads: JPEG encode threads shared by all sessions (off the model worker).
        record_dir: where per-session MP4 recordings go; None disables recording.
        record_all: record every session, not only those whose start message asks for it.
        stats_interval_s: how often each session is pushed a ``stats`` message.
        send_timeout_s: a send that takes longer closes that client (dead socket guard).
        limits: client message bounds (prompt length, message size, credits).
        ws_max_size: hard WebSocket frame limit in bytes; messages above
            ``limits.max_message_bytes`` but below this get an error reply, above it the
            connection is closed with 1009 (the message is never buffered).
    """

    max_sessions: int = 4
    queue_frames: int = 32
    jpeg_quality: int = 85
    encode_threads: int = 2
    record_dir: Path | None = None
    record_all: bool = False
    stats_interval_s: float = 1.0
    send_timeout_s: float = 10.0
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    ws_max_size: int = 65536

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"ServerConfig.max_sessions must be >= 1, got {self.max_sessions}")
        if self.queue_frames < 1:
            raise ValueError(f"ServerConfig.queue_frames must be >= 1, got {self.queue_frames}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"ServerConfig.jpeg_quality must be in [1, 100], got "
                             f"{self.jpeg_quality}")
        if self.encode_threads < 1:
            raise ValueError(f"ServerConfig.encode_threads must be >= 1, got "
                             f"{self.encode_threads}")
        if self.record_all and self.record_dir is None:
            raise ValueError("ServerConfig.record_all=True needs record_dir (a folder for the "
                             "MP4s)")
        if self.ws_max_size < self.limits.max_message_bytes:
            raise ValueError(f"ServerConfig.ws_max_size={self.ws_max_size} must be >= "
                             f"limits.max_message_bytes={self.limits.max_message_bytes}")
        if not (self.stats_interval_s > 0 and self.send_timeout_s > 0):
            raise ValueError("ServerConfig.stats_interval_s and send_timeout_s must be > 0")
        if self.record_dir is not None:
            object.__setattr__(self, "record_dir", Path(self.record_dir))
