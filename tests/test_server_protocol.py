"""Unit tests of the streaming wire protocol, the engine interface and the server config."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from student.server import protocol as P
from student.server.config import ServerConfig
from student.stream_types import FrameChunk, StreamEngine, frame_timestamps
from tests.stream_fakes import FakeEngine, decode_barcode

LIMITS = P.ProtocolLimits()


# ------------------------------------------------------------------------------ binary header


def _header(**kw) -> P.FrameHeader:
    base = dict(frame_index=123456, prompt_version=7, timestamp=12.3125, gen_ms=41.5,
                chunk_frames=12, chunk_pos=11, flags=P.FLAG_DROPPED_BEFORE | P.FLAG_STREAM_START,
                sent_unix_ms=1.7e12 + 0.25)
    base.update(kw)
    return P.FrameHeader(**base)


def test_header_round_trip_and_documented_offsets():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 65535))
        h = _header(frame_index=int(rng.integers(0, 2**32)),
                    prompt_version=int(rng.integers(0, 2**32)),
                    timestamp=float(rng.random() * 1e5),
                    gen_ms=float(np.float32(rng.random() * 1e3)),   # exactly representable in f32
                    chunk_frames=n, chunk_pos=int(rng.integers(0, n)),
                    flags=int(rng.integers(0, 4)), sent_unix_ms=float(rng.random() * 2e12))
        payload = rng.bytes(int(rng.integers(0, 64)))
        data = P.pack_frame(h, payload)
        assert len(data) == P.HEADER_BYTES + len(payload) == 40 + len(payload)
        back, body = P.unpack_frame(data)
        assert back == h and body == payload
        # Read the fields at the offsets the docstring (and the page's parseHeader) document,
        # without the module's struct format, so a layout change cannot pass silently.
        le = lambda a, b: int.from_bytes(data[a:b], "little")  # noqa: E731
        assert data[0:2] == b"WD" and data[2] == 1 and data[3] == P.KIND_JPEG
        assert le(4, 6) == 40 and le(6, 8) == h.flags
        assert le(8, 12) == h.frame_index and le(12, 16) == h.prompt_version
        assert struct.unpack("<d", data[16:24])[0] == h.timestamp
        assert struct.unpack("<f", data[24:28])[0] == h.gen_ms
        assert le(28, 30) == h.chunk_frames and le(30, 32) == h.chunk_pos
        assert struct.unpack("<d", data[32:40])[0] == h.sent_unix_ms


def test_header_rejects_bad_buffers_and_values():
    good = P.pack_frame(_header(), b"jpeg")
    with pytest.raises(P.ProtocolError, match="header alone needs 40"):
        P.unpack_frame(good[:39])
    with pytest.raises(P.ProtocolError, match="magic"):
        P.unpack_frame(b"XX" + good[2:])
    with pytest.raises(P.ProtocolError, match="version 9"):
        P.unpack_frame(good[:2] + b"\x09" + good[3:])
    with pytest.raises(P.ProtocolError, match="header_len"):
        P.unpack_frame(good[:4] + (500).to_bytes(2, "little") + good[6:])
    with pytest.raises(ValueError, match="chunk_pos"):
        P.pack_frame(_header(chunk_frames=4, chunk_pos=4), b"")


def test_header_reader_skips_a_longer_header_of_the_same_version():
    # header_len lets a later revision append fields; an old reader must still find the payload.
    data = bytearray(P.pack_frame(_header(), b""))
    data[4:6] = (48).to_bytes(2, "little")
    header, payload = P.unpack_frame(bytes(data) + b"EXTRAEXTpayload")
    assert payload == b"payload" and header.frame_index == 123456


# ---------------------------------------------------------------------------- control messages


@pytest.mark.parametrize("raw,expected", [
    ({"type": "start", "prompt": "a red circle moving left"},
     P.Start("a red circle moving left", 0, None, False)),
    ({"type": "start", "prompt": "一个红色的圆向左移动", "seed": 5, "guidance": 3, "record": True},
     P.Start("一个红色的圆向左移动", 5, 3.0, True)),
    ({"type": "start", "prompt": "x", "guidance": None}, P.Start("x", 0, None, False)),
    ({"type": "prompt", "prompt": "a blue square"}, P.SetPrompt("a blue square")),
    ({"type": "seed", "seed": 2**63 - 1}, P.SetSeed(2**63 - 1)),
    ({"type": "guidance", "guidance": 4.5}, P.SetGuidance(4.5)),
    ({"type": "guidance", "guidance": None}, P.SetGuidance(None)),
    ({"type": "pause"}, P.Pause()), ({"type": "resume"}, P.Resume()),
    ({"type": "reset"}, P.Reset()), ({"type": "stop"}, P.Stop()),
    ({"type": "credit", "n": 256}, P.Credit(256)),
])
def test_valid_controls_parse(raw, expected):
    parsed = P.parse_control(json.dumps(raw, ensure_ascii=False), LIMITS)
    assert parsed == expected and type(parsed) is type(expected)
    if isinstance(parsed, P.SetGuidance) and parsed.guidance is not None:
        assert isinstance(parsed.guidance, float)


MALFORMED = [
    (b"\x00\x01binary", P.E_BINARY),
    ("{\"type\": \"start\", " + "\"prompt\": \"" + "a" * 9000 + "\"}", P.E_TOO_LARGE),
    ("{not json", P.E_BAD_JSON),
    ("", P.E_BAD_JSON),
    ('{"type": "guidance", "guidance": NaN}', P.E_BAD_JSON),
    ('{"type": "guidance", "guidance": Infinity}', P.E_BAD_JSON),
    ("[" * 3000 + "]" * 3000, P.E_BAD_JSON),         # nesting bomb under the size limit
    ('{"type": "seed", "seed": ' + "9" * 5000 + "}", P.E_BAD_JSON),   # int digit limit
    ("[1, 2]", P.E_NOT_OBJECT), ('"start"', P.E_NOT_OBJECT), ("null", P.E_NOT_OBJECT),
    ("3.5", P.E_NOT_OBJECT),
    ("{}", P.E_UNKNOWN_TYPE), ('{"type": "explode"}', P.E_UNKNOWN_TYPE),
    ('{"type": 1}', P.E_UNKNOWN_TYPE), ('{"type": ["start"]}', P.E_UNKNOWN_TYPE),
    ('{"type": "start"}', P.E_MISSING_FIELD), ('{"type": "credit"}', P.E_MISSING_FIELD),
    ('{"type": "prompt"}', P.E_MISSING_FIELD), ('{"type": "seed"}', P.E_MISSING_FIELD),
    ('{"type": "pause", "now": true}', P.E_UNKNOWN_FIELD),
    ('{"type": "start", "prompt": "x", "steps": 4}', P.E_UNKNOWN_FIELD),
    ('{"type": "start", "prompt": 5}', P.E_BAD_FIELD),
    ('{"type": "start", "prompt": "   "}', P.E_BAD_FIELD),
    ('{"type": "prompt", "prompt": "bell\\u0007"}', P.E_BAD_FIELD),
    ('{"type": "prompt", "prompt": null}', P.E_BAD_FIELD),
    ('{"type": "start", "prompt": "x", "seed": "1"}', P.E_BAD_FIELD),
    ('{"type": "start", "prompt": "x", "seed": true}', P.E_BAD_FIELD),
    ('{"type": "seed", "seed": 1.0}', P.E_BAD_FIELD),
    ('{"type": "seed", "seed": -1}', P.E_BAD_FIELD),
    ('{"type": "seed", "seed": 9223372036854775808}', P.E_BAD_FIELD),
    ('{"type": "guidance", "guidance": "high"}', P.E_BAD_FIELD),
    ('{"type": "guidance", "guidance": false}', P.E_BAD_FIELD),
    ('{"type": "guidance", "guidance": -0.5}', P.E_BAD_FIELD),
    ('{"type": "guidance", "guidance": 100.5}', P.E_BAD_FIELD),
    ('{"type": "guidance", "guidance": 1e999}', P.E_BAD_FIELD),       # parses to inf
    ('{"type": "start", "prompt": "x", "record": "yes"}', P.E_BAD_FIELD),
    ('{"type": "credit", "n": 0}', P.E_BAD_FIELD), ('{"type": "credit", "n": -3}', P.E_BAD_FIELD),
    ('{"type": "credit", "n": 257}', P.E_BAD_FIELD),
    ('{"type": "credit", "n": "4"}', P.E_BAD_FIELD),
    ('{"type": "credit", "n": 2.0}', P.E_BAD_FIELD),
]


@pytest.mark.parametrize("raw,code", MALFORMED)
def test_every_malformed_class_gets_its_error_code(raw, code):
    with pytest.raises(P.ProtocolError) as info:
        P.parse_control(raw, LIMITS)
    assert info.value.code == code
    # The reply the server sends is valid JSON naming the code.
    reply = json.loads(P.error_message(info.value.code, info.value.message))
    assert reply == {"type": "error", "code": code, "message": info.value.message, "fatal": False}


def test_limits_are_enforced_exactly_at_the_boundary():
    limits = P.ProtocolLimits(max_message_bytes=200, max_prompt_chars=20, max_credit=8,
                              max_seed=1000, max_guidance=10.0)
    at_max = json.dumps({"type": "prompt", "prompt": "p" * 20})
    assert P.parse_control(at_max, limits) == P.SetPrompt("p" * 20)
    with pytest.raises(P.ProtocolError, match="21 characters, the limit is 20"):
        P.parse_control(json.dumps({"type": "prompt", "prompt": "p" * 21}), limits)
    # Message size is counted in UTF-8 bytes: 10 CJK characters are 30 bytes.
    msg = json.dumps({"type": "prompt", "prompt": "圆" * 10}, ensure_ascii=False)
    pad = 200 - len(msg.encode())
    at_limit = msg[:-1] + " " * pad + "}"
    assert len(at_limit.encode()) == 200
    assert P.parse_control(at_limit, limits) == P.SetPrompt("圆" * 10)
    with pytest.raises(P.ProtocolError) as info:
        P.parse_control(at_limit[:-1] + " }", limits)
    assert info.value.code == P.E_TOO_LARGE
    assert P.parse_control('{"type": "credit", "n": 8}', limits) == P.Credit(8)
    for bad in ('{"type": "credit", "n": 9}', '{"type": "seed", "seed": 1001}',
                '{"type": "guidance", "guidance": 10.01}'):
        with pytest.raises(P.ProtocolError):
            P.parse_control(bad, limits)
    # A lower bound (the student's trained range starts at 1) holds exactly at its edge too.
    floor = P.ProtocolLimits(min_guidance=1.0, max_guidance=3.0)
    assert P.parse_control('{"type": "guidance", "guidance": 1}', floor) == P.SetGuidance(1.0)
    assert P.parse_control('{"type": "guidance", "guidance": 3}', floor) == P.SetGuidance(3.0)
    assert P.parse_control('{"type": "guidance", "guidance": null}', floor) == P.SetGuidance(None)
    for bad in ('{"type": "guidance", "guidance": 0.99}', '{"type": "guidance", "guidance": 3.01}'):
        with pytest.raises(P.ProtocolError, match="is outside \\[1, 3\\]"):
            P.parse_control(bad, floor)


def test_limits_and_config_validate_their_values(tmp_path):
    with pytest.raises(ValueError, match="max_prompt_chars"):
        P.ProtocolLimits(max_prompt_chars=0)
    with pytest.raises(ValueError, match=r"min_guidance=4 must lie in \[0, max_guidance=3"):
        P.ProtocolLimits(min_guidance=4, max_guidance=3.0)
    with pytest.raises(ValueError, match="record_all=True needs record_dir"):
        ServerConfig(record_all=True)
    with pytest.raises(ValueError, match="ws_max_size"):
        ServerConfig(ws_max_size=100)
    with pytest.raises(ValueError, match="jpeg_quality"):
        ServerConfig(jpeg_quality=0)
    assert ServerConfig(record_dir=str(tmp_path)).record_dir == tmp_path


def test_server_messages_are_strict_json():
    assert json.loads(P.server_message("ok", of="prompt")) == {"type": "ok", "of": "prompt"}
    with pytest.raises(ValueError):
        P.server_message("stats", fps=math.nan)


# ----------------------------------------------------------------------- the engine interface


def test_frame_chunk_validates_its_fields():
    frames = np.zeros((3, 8, 10, 3), np.uint8)
    chunk = FrameChunk(frames, 6, frame_timestamps(6, 3, 16.0), 2, 0.01)
    np.testing.assert_array_equal(chunk.timestamps, np.array([6, 7, 8]) / 16.0)
    assert chunk.n_frames == 3
    with pytest.raises(ValueError, match="uint8"):
        FrameChunk(frames.astype(np.float32), 0, frame_timestamps(0, 3, 16), 0, 0.0)
    with pytest.raises(ValueError, match=r"\[n,H,W,3\]"):
        FrameChunk(frames[..., :2], 0, frame_timestamps(0, 3, 16), 0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        FrameChunk(frames[:0], 0, frame_timestamps(0, 0, 16), 0, 0.0)
    with pytest.raises(ValueError, match="timestamps"):
        FrameChunk(frames, 0, frame_timestamps(0, 2, 16), 0, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        FrameChunk(frames, -1, frame_timestamps(0, 3, 16), 0, 0.0)
    with pytest.raises(ValueError, match="fps"):
        frame_timestamps(0, 3, 0)


def test_fake_engine_follows_the_protocol_boundary_rules():
    engine = FakeEngine(chunk_frames=4, first_chunk_frames=1)
    assert isinstance(engine, StreamEngine)
    with pytest.raises(RuntimeError, match="before start"):
        engine.next_chunk()
    engine.start("a red circle", seed=3)
    c0 = engine.next_chunk()
    assert (c0.n_frames, c0.first_frame_index, c0.prompt_version) == (1, 0, 0)
    engine.set_prompt("a blue square")       # applies at the next boundary, not retroactively
    engine.set_prompt("a green square")
    c1 = engine.next_chunk()
    assert (c1.first_frame_index, c1.n_frames, c1.prompt_version) == (1, 4, 2)
    assert [decode_barcode(f) for f in c1.frames] == [(i, 3, 2) for i in range(1, 5)]
    engine.pause()
    assert engine.next_chunk() is None
    engine.resume()
    assert engine.next_chunk().first_frame_index == 5
    engine.reset()
    c = engine.next_chunk()
    assert (c.first_frame_index, c.n_frames, c.prompt_version) == (0, 1, 2)
