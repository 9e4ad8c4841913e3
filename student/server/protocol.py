"""Wire protocol of the streaming server: binary frame messages and JSON control messages.

Server -> client, binary (one WebSocket binary message per video frame)::

    offset size type  field
    0      2    bytes magic           b"WD"
    2      1    u8    version         1
    3      1    u8    kind            1 = JPEG payload
    4      2    u16   header_len      40 (payload starts here; a newer version may append fields)
    6      2    u16   flags           bit0 DROPPED_BEFORE: frames were discarded right before this
                                      one (queue flush on reset/prompt switch, or an overflow);
                                      bit1 STREAM_START: first frame after start/reset
    8      4    u32   frame_index     session-relative, counts every frame the session generated
                                      (a gap means drops); never resets during a connection
    12     4    u32   prompt_version  engine prompt version of this frame (0 after start)
    16     8    f64   timestamp       seconds of video time (engine frame index / fps)
    24     4    f32   gen_ms          wall-clock ms the engine spent on this frame's whole chunk
    28     2    u16   chunk_frames    frames in this frame's chunk
    30     2    u16   chunk_pos       position of this frame in its chunk (0 = chunk boundary)
    32     8    f64   sent_unix_ms    server wall clock (ms since the Unix epoch) at send time
    40     ...        payload         JPEG bytes

All fields little-endian. The same table is in ``student/web/index.html`` (``parseHeader``).

Server -> client, text: JSON objects with a ``type``: ``hello`` (on connect: protocol version,
fps, size, limits), ``started``, ``stopped``, ``ok`` (a control was queued), ``stats`` (about once
a second), ``error`` (``code`` + ``message``; the connection stays open unless it says
``fatal``).

Client -> server, text: JSON objects, at most ``ProtocolLimits.max_message_bytes`` bytes::

    {"type": "start", "prompt": str, "seed": int = 0, "guidance": float | null = null,
     "record": bool = false}
    {"type": "prompt", "prompt": str}       {"type": "seed", "seed": int}
    {"type": "guidance", "guidance": float | null}
    {"type": "pause"}  {"type": "resume"}  {"type": "reset"}  {"type": "stop"}
    {"type": "credit", "n": int}            grant n more frames (credit-based backpressure;
                                            each start begins with zero credit, outstanding
                                            credit is capped at max_credit)

Unknown types or fields, wrong types, out-of-range values and non-JSON all get an ``error``
reply; none of them ends the connection.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Union

MAGIC = b"WD"
PROTOCOL_VERSION = 1
KIND_JPEG = 1
FLAG_DROPPED_BEFORE = 1
FLAG_STREAM_START = 2

_HEADER = struct.Struct("<2sBBHHIIdfHHd")
HEADER_BYTES = _HEADER.size  # 40
assert HEADER_BYTES == 40, HEADER_BYTES

# Error codes sent in {"type": "error", "code": ...}.
E_BAD_JSON = "bad_json"
E_NOT_OBJECT = "not_object"
E_TOO_LARGE = "too_large"
E_BINARY = "binary_not_accepted"
E_UNKNOWN_TYPE = "unknown_type"
E_MISSING_FIELD = "missing_field"
E_UNKNOWN_FIELD = "unknown_field"
E_BAD_FIELD = "bad_field"
E_NOT_STARTED = "not_started"
E_ALREADY_STARTED = "already_started"
E_SERVER_FULL = "server_full"
E_ENGINE = "engine_error"
E_RECORDING = "recording_error"


class ProtocolError(ValueError):
    """A client message the server rejects; ``code`` is one of the ``E_*`` constants."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ProtocolLimits:
    """Bounds on what a client may send; every field is checked by ``parse_control``."""

    max_message_bytes: int = 8192   # UTF-8 bytes of one control message
    max_prompt_chars: int = 1000    # characters of a prompt after JSON decoding
    max_credit: int = 256           # largest grant in one credit message, and outstanding total
    max_seed: int = 2**63 - 1
    # The guidance scales a client may ask for. `wan-distill serve` sets them to the student's
    # trained range, so a scale outside it is a refused field, not an engine failure that would
    # end the stream.
    min_guidance: float = 0.0
    max_guidance: float = 100.0

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_prompt_chars", "max_credit", "max_seed"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProtocolLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_guidance > 0:
            raise ValueError(f"ProtocolLimits.max_guidance must be > 0, got {self.max_guidance}")
        if not 0 <= self.min_guidance <= self.max_guidance:
            raise ValueError(f"ProtocolLimits.min_guidance={self.min_guidance} must lie in [0, "
                             f"max_guidance={self.max_guidance}]")


# ------------------------------------------------------------------------------------------------
# Binary frames


@dataclass(frozen=True)
class FrameHeader:
    """Decoded binary frame header (see the module docstring for the layout)."""

    frame_index: int
    prompt_version: int
    timestamp: float
    gen_ms: float
    chunk_frames: int
    chunk_pos: int
    flags: int = 0
    sent_unix_ms: float = 0.0
    kind: int = KIND_JPEG


def pack_frame(header: FrameHeader, payload: bytes) -> bytes:
    """Header + payload as one binary WebSocket message."""
    if not 0 <= header.chunk_pos < max(header.chunk_frames, 1) <= 0xFFFF:
        raise ValueError(f"chunk_pos {header.chunk_pos} must lie in [0, chunk_frames="
                         f"{header.chunk_frames}) and chunk_frames <= 65535")
    head = _HEADER.pack(MAGIC, PROTOCOL_VERSION, header.kind, HEADER_BYTES, header.flags,
                        header.frame_index & 0xFFFFFFFF, header.prompt_version & 0xFFFFFFFF,
                        header.timestamp, header.gen_ms, header.chunk_frames, header.chunk_pos,
                        header.sent_unix_ms)
    return head + payload


def unpack_frame(data: bytes) -> tuple[FrameHeader, bytes]:
    """Inverse of ``pack_frame``; raises ProtocolError on a short buffer, bad magic or version."""
    if len(data) < HEADER_BYTES:
        raise ProtocolError(E_BAD_FIELD, f"frame message has {len(data)} bytes, the header "
                                         f"alone needs {HEADER_BYTES}")
    (magic, version, kind, header_len, flags, frame_index, prompt_version, timestamp, gen_ms,
     chunk_frames, chunk_pos, sent_unix_ms) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(E_BAD_FIELD, f"frame magic is {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(E_BAD_FIELD, f"frame protocol version {version}, this code reads "
                                         f"{PROTOCOL_VERSION}")
    if header_len < HEADER_BYTES or header_len > len(data):
        raise ProtocolError(E_BAD_FIELD, f"header_len {header_len} outside [{HEADER_BYTES}, "
                                         f"{len(data)}]")
    header = FrameHeader(frame_index=frame_index, prompt_version=prompt_version,
                         timestamp=timestamp, gen_ms=gen_ms, chunk_frames=chunk_frames,
                         chunk_pos=chunk_pos, flags=flags, sent_unix_ms=sent_unix_ms, kind=kind)
    return header, bytes(data[header_len:])


# ------------------------------------------------------------------------------------------------
# JSON control messages (client -> server)


@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int = 0
    guidance: float | None = None
    record: bool = False


@dataclass(frozen=True)
class SetPrompt:
    prompt: str


@dataclass(frozen=True)
class SetSeed:
    seed: int


@dataclass(frozen=True)
class SetGuidance:
    guidance: float | None


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Credit:
    n: int


Control = Union[Start, SetPrompt, SetSeed, SetGuidance, Pause, Resume, Reset, Stop, Credit]

# type -> (class, required fields, optional fields)
_SCHEMA: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    "start": (Start, ("prompt",), ("seed", "guidance", "record")),
    "prompt": (SetPrompt, ("prompt",), ()),
    "seed": (SetSeed, ("seed",), ()),
    "guidance": (SetGuidance, ("guidance",), ()),
    "pause": (Pause, (), ()),
    "resume": (Resume, (), ()),
    "reset": (Reset, (), ()),
    "stop": (Stop, (), ()),
    "credit": (Credit, ("n",), ()),
}
CONTROL_TYPES = tuple(_SCHEMA)
CONTROL_NAME: dict[type, str] = {cls: name for name, (cls, _, _) in _SCHEMA.items()}


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity by default; they are not JSON and must not reach the
    # engine.
    raise ValueError(f"{name} is not valid JSON")


def _check_int(field: str, value: Any, lo: int, hi: int) -> int:
    # bool is a subclass of int in Python; `true` is not a seed.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(E_BAD_FIELD, f"'{field}' must be an integer, got "
                                         f"{type(value).__name__}")
    if not lo <= value <= hi:
        raise ProtocolError(E_BAD_FIELD, f"'{field}'={value} is outside [{lo}, {hi}]")
    return value


def _check_prompt(value: Any, limits: ProtocolLimits) -> str:
    if not isinstance(value, str):
        raise ProtocolError(E_BAD_FIELD, f"'prompt' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ProtocolError(E_BAD_FIELD, "'prompt' is empty; type what the video should show")
    if len(value) > limits.max_prompt_chars:
        raise ProtocolError(E_BAD_FIELD, f"'prompt' has {len(value)} characters, the limit is "
                                         f"{limits.max_prompt_chars}")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise ProtocolError(E_BAD_FIELD, "'prompt' contains control characters")
    return value


def _check_guidance(value: Any, limits: ProtocolLimits) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(E_BAD_FIELD, f"'guidance' must be a number or null, got "
                                         f"{type(value).__name__}")
    if not (math.isfinite(value) and limits.min_guidance <= value <= limits.max_guidance):
        raise ProtocolError(E_BAD_FIELD, f"'guidance'={value} is outside [{limits.min_guidance:g}, "
                                         f"{limits.max_guidance:g}]; send a value in it, or null "
                                         f"for the default")
    return float(value)


def parse_control(raw: str | bytes, limits: ProtocolLimits) -> Control:
    """Validate one client message -> a Control dataclass; raise ProtocolError otherwise.

    Args:
        raw: the WebSocket message as received (``bytes`` means a binary message, which the
            protocol does not accept from clients).
        limits: the bounds to enforce.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(E_BINARY, "binary messages are not accepted from clients; send JSON "
                                      "text control messages")
    # Length in UTF-8 bytes, the unit the network limit is about; surrogates cannot be encoded.
    n_bytes = len(raw.encode("utf-8", errors="replace"))
    if n_bytes > limits.max_message_bytes:
        raise ProtocolError(E_TOO_LARGE, f"message has {n_bytes} bytes, the limit is "
                                         f"{limits.max_message_bytes}")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        # RecursionError: deeply nested arrays fit in a few KB and overflow json's recursion.
        raise ProtocolError(E_BAD_JSON, f"not valid JSON ({type(exc).__name__}: "
                                        f"{str(exc)[:120]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(E_NOT_OBJECT, f"a control message is a JSON object, got "
                                          f"{type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _SCHEMA:
        shown = kind if isinstance(kind, str) else type(kind).__name__
        raise ProtocolError(E_UNKNOWN_TYPE, f"'type'={str(shown)[:40]!r} is not one of "
                                            f"{', '.join(CONTROL_TYPES)}")
    cls, required, optional = _SCHEMA[kind]
    fields = {k: v for k, v in obj.items() if k != "type"}
    unknown = sorted(set(fields) - set(required) - set(optional))
    if unknown:
        raise ProtocolError(E_UNKNOWN_FIELD, f"'{kind}' does not take field(s) "
                                             f"{', '.join(str(u)[:40] for u in unknown[:5])}")
    missing = [k for k in required if k not in fields]
    if missing:
        raise ProtocolError(E_MISSING_FIELD, f"'{kind}' needs field(s) {', '.join(missing)}")

    checked: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "prompt":
            checked[name] = _check_prompt(value, limits)
        elif name == "seed":
            checked[name] = _check_int("seed", value, 0, limits.max_seed)
        elif name == "guidance":
            checked[name] = _check_guidance(value, limits)
        elif name == "n":
            checked[name] = _check_int("n", value, 1, limits.max_credit)
        elif name == "record":
            if not isinstance(value, bool):
                raise ProtocolError(E_BAD_FIELD, f"'record' must be true or false, got "
                                                 f"{type(value).__name__}")
            checked[name] = value
    return cls(**checked)


# ------------------------------------------------------------------------------------------------
# JSON messages (server -> client)


def server_message(type_: str, **fields: Any) -> str:
    """A server text message ``{"type": type_, **fields}`` as compact JSON (no NaN allowed)."""
    return json.dumps({"type": type_, **fields}, separators=(",", ":"), allow_nan=False)


def error_message(code: str, message: str, *, fatal: bool = False) -> str:
    """The error reply for a rejected message; ``fatal`` means the server closes afterwards."""
    return server_message("error", code=code, message=message, fatal=fatal)
