"""The live streaming server (WebSocket + static page) for any ``StreamEngine``.

Wire format and control messages: ``protocol``; per-session state and backpressure: ``session``;
the single model worker: ``worker``; recording: ``recording``; the server itself: ``app``.
"""

from student.server.app import StreamServer, run_server, serve, serve_main
from student.server.config import ServerConfig
from student.server.protocol import ProtocolLimits

__all__ = ["ProtocolLimits", "ServerConfig", "StreamServer", "run_server", "serve", "serve_main"]
