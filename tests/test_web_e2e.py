"""End to end: the real page in headless Debian Chromium, driven by Playwright, against the real
server on 127.0.0.1 with the test-only FakeEngine.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright
install``: the browser is Debian's, launched through ``executable_path``). Skips otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from student.server import serve
from student.server.protocol import ProtocolLimits
from tests.stream_fakes import FakeEngine, decode_barcode

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = "/tmp/wan_distill_stream_page.png"

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} not found; install it with `apt-get install -y chromium`",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed; `pip install playwright`")


class ServerThread:
    """The asyncio server on its own thread, so the sync Playwright API can drive the page."""

    def __init__(self, engine_factory, **config):
        self._factory, self._config = engine_factory, config
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.server = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            async with serve(self._factory, "127.0.0.1", 0, **self._config) as server:
                self.server = server
                self._ready.set()
                await self._stop.wait()
        try:
            asyncio.run(main())
        except BaseException as exc:   # noqa: BLE001 - surfaced to the test below
            self.error = exc
            self._ready.set()

    def metrics(self) -> dict:
        return asyncio.run_coroutine_threadsafe(self._async_metrics(), self._loop).result(5)

    async def _async_metrics(self) -> dict:
        return self.server.metrics()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(20), "server did not start within 20 s"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        assert not self._thread.is_alive(), "server thread did not stop within 20 s"


def canvas_pixels(page) -> np.ndarray:
    url = page.evaluate("document.getElementById('screen').toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_page_streams_switches_prompt_and_shows_metrics():
    t0 = time.perf_counter()
    # 4-frame chunks every ~50 ms: faster than the 16 fps playback, so credits pace the server.
    limits = ProtocolLimits(min_guidance=1.0, max_guidance=3.0)  # what `serve` sets from the student
    with ServerThread(lambda: FakeEngine(chunk_frames=4, delay_s=0.05), limits=limits) as srv, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(srv.server.url)
            page.wait_for_function("window.__metrics.state === 'ready'", timeout=10_000)
            # The guidance field takes the server's range from its hello.
            assert page.eval_on_selector("#guidance", "g => [g.min, g.max]") == ["1", "3"]
            page.fill("#prompt", "a red circle moving left")
            page.fill("#seed", "42")
            page.click("#start")
            page.wait_for_function("window.__metrics.framesPainted >= 12", timeout=15_000)
            m = page.evaluate("window.__metrics")
            assert m["errors"] == [] and m["state"] == "streaming"
            assert 0 < m["firstPaintMs"] < 5000
            # The canvas shows engine frames of this session (barcode: seed 42, version 0) and
            # it updates: two reads some frames apart show different engine frame indices.
            first = decode_barcode(canvas_pixels(page))
            assert first[1:] == (42, 0)
            page.wait_for_function(f"window.__metrics.framesPainted >= {m['framesPainted'] + 6}",
                                   timeout=10_000)
            second = decode_barcode(canvas_pixels(page))
            assert second[0] > first[0]

            page.fill("#prompt", "a blue square moving up")
            page.click("#switch")
            page.wait_for_function("window.__metrics.promptVersionOnScreen >= 1", timeout=10_000)
            assert decode_barcode(canvas_pixels(page))[1:] == (42, 1)
            assert page.inner_text("#m-version") == "1"
            page.wait_for_function("window.__metrics.switchLatencyMs !== null", timeout=5_000)

            # Let the FPS window fill, then read the HUD as a user would.
            page.wait_for_function("window.__metrics.fps > 8", timeout=10_000)
            page.wait_for_timeout(300)
            page.screenshot(path=SCREENSHOT)
            m = page.evaluate("window.__metrics")
            hud_fps = float(page.inner_text("#m-fps"))
            hud_ttff = page.inner_text("#m-ttff")
            assert 10 < hud_fps < 22                    # paced at the 16 fps video rate
            assert hud_ttff.endswith(" ms")
            assert float(hud_ttff.split()[0]) == round(m["firstPaintMs"])
            assert m["errors"] == []
            server = srv.metrics()
            session = server["per_session"][0]
            assert server["sessions"] == 1 and session["frames_sent"] >= m["framesPainted"]
            assert session["prompt_version"] == 1 and session["ttff_s"] > 0

            # A scale outside the range is refused with a reason and the stream goes on.
            painted = page.evaluate("window.__metrics.framesPainted")
            page.fill("#guidance", "4")
            page.dispatch_event("#guidance", "change")
            page.wait_for_function("window.__metrics.errors.length > 0", timeout=5_000)
            refused = page.evaluate("window.__metrics.errors")
            assert len(refused) == 1 and refused[0].startswith("bad_field: 'guidance'=4")
            page.wait_for_function(f"window.__metrics.framesPainted >= {painted + 6}",
                                   timeout=10_000)
            assert page.evaluate("window.__metrics.state") == "streaming"

            page.click("#stop")
            page.wait_for_function("window.__metrics.state === 'stopped'", timeout=5_000)
        finally:
            browser.close()
    print(f"\ne2e: ttff {m['firstPaintMs']:.0f} ms, painted fps {hud_fps:.1f}, prompt switch "
          f"{m['switchLatencyMs']:.0f} ms, {m['framesPainted']} frames painted, "
          f"test {time.perf_counter() - t0:.1f} s; screenshot {SCREENSHOT}")
