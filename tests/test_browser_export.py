"""The browser example (`examples/browser/`) in headless Chromium: it loads an export with transformers.js and its
mask for a click and for a box equals onnxruntime's (`load_onnx_predictor`) within the export's tolerance (logits
within 1e-3). Chromium is driven over the DevTools protocol on a pipe (no extra Python package)."""

from __future__ import annotations

import base64
import functools
import json
import os
import select
import shutil
import subprocess
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")

from sam2_peft.export import ExportOptions, load_onnx_predictor
from sam2_peft.export.onnx_export import SAMPLE_IMAGE, export_source

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,  # an export, then Chromium compiling onnxruntime-web: 15-30 s
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install -y chromium"),
    pytest.mark.skipif(
        not (EXAMPLE / "node_modules" / "@huggingface" / "transformers").is_dir(),
        reason="the example's node_modules are not installed: cd examples/browser && npm ci",
    ),
]
WAIT_FOR_RESULT = """new Promise((resolve) => {
  const result = document.querySelector('#result');
  const check = () => document.body?.dataset.ready || result?.dataset.error
    ? resolve({ ...result.dataset, status: document.querySelector('#status').textContent })
    : setTimeout(check, 100);
  check();
})"""


class DevTools:
    """Chromium's DevTools protocol over `--remote-debugging-pipe` (it reads fd 3, writes fd 4; NUL-ended JSON)."""

    def __init__(self) -> None:
        ours_read, theirs_write = os.pipe()
        theirs_read, ours_write = os.pipe()

        def as_fds_3_and_4() -> None:  # via high numbers, so that neither pipe end is overwritten on the way
            os.dup2(os.dup2(theirs_read, 100), 3)
            os.dup2(os.dup2(theirs_write, 101), 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=as_fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(theirs_read)
        os.close(theirs_write)
        self.write, self.read = ours_write, ours_read
        self.pending = b""
        self.next_id = 0
        self.errors: list[str] = []

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {
            "id": self.next_id,
            "method": method,
            "params": params,
            **({"sessionId": session} if session else {}),
        }
        os.write(self.write, json.dumps(message).encode() + b"\0")
        reply = self.receive(lambda reply: reply.get("id") == self.next_id)
        assert "error" not in reply, (method, reply["error"], self.errors)
        return reply["result"]

    def receive(self, wanted, timeout_s: float = 120) -> dict:
        """Read messages up to the first that `wanted` accepts (keeping the page's uncaught exceptions)."""
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" not in self.pending:
                ready, _, _ = select.select([self.read], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, f"no answer from the page in {timeout_s} s; its uncaught errors: {self.errors}"
                chunk = os.read(self.read, 1 << 16)
                assert chunk, f"chromium exited (code {self.process.poll()})"
                self.pending += chunk
            raw, self.pending = self.pending.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("method") == "Runtime.exceptionThrown":
                self.errors.append(reply["params"]["exceptionDetails"]["exception"]["description"])
            if wanted(reply):
                return reply

    def open(self, url: str) -> dict:
        """Load `url` in a new tab and return the page's result (`#result`'s data attributes and the status)."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session)
        self.call("Page.enable", session)
        self.call("Page.navigate", session, url=url)
        self.receive(lambda reply: reply.get("method") == "Page.domContentEventFired")
        reply = self.call(
            "Runtime.evaluate", session, expression=WAIT_FOR_RESULT, awaitPromise=True, returnByValue=True
        )
        assert "value" in reply["result"], (reply, self.errors)
        return reply["result"]["value"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.write)
        os.close(self.read)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The example page, its node_modules, an export of compact-synthetic (as `model/`) and the sample image, on a
    loopback HTTP server; yields (base URL, export folder)."""
    root = tmp_path_factory.mktemp("browser")
    exported = export_source(root / "model", ExportOptions(), model="compact-synthetic")
    assert exported["graphs"]["fp32"]
    for name in ("index.html", "app.js", "node_modules"):
        (root / name).symlink_to(EXAMPLE / name)
    shutil.copy(SAMPLE_IMAGE, root / "sample.png")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root / "model"
    server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def browser():
    devtools = DevTools()
    yield devtools
    devtools.close()


@pytest.mark.parametrize(
    ("query", "prompt"),
    [("click=120,130", {"points": [[[120, 130]]]}), ("box=40,50,200,180", {"boxes": [[40, 50, 200, 180]]})],
)
def test_browser_page_mask_equals_onnxruntime(query, prompt, served, browser):
    url, folder = served
    page = browser.open(f"{url}index.html?image=sample.png&{query}")
    assert "error" not in page, page["error"]
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    got = np.frombuffer(base64.b64decode(page["logits"]), np.float32).reshape(image.shape[:2])
    want = load_onnx_predictor(folder).predict(image, return_logits=True, **prompt)
    assert np.abs(got - want.logits[0]).max() < 1e-3
    assert np.array_equal(got > 0, want.masks[0]) and want.masks[0].any()
    assert abs(float(page["score"]) - float(want.scores[0])) < 1e-3
