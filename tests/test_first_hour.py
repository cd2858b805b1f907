"""A new user's first hour: a client that explains instead of printing a traceback, labels
that stay readable, packaging that installs only our code, and a launcher that fails fast."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tools.client import KEY_FILE_STALE, draw, label_origin
from tools.client import main as client_main
from tools.server import REPO_ROOT



# ---------------------------------------------------------------- labels


def test_labels_of_boxes_at_the_top_edge_go_inside_their_boxes():
    # two boxes touching the image's top edge, side by side: above them there is no room
    left = label_origin((10, 0, 200, 300), 120, 20, 640)
    right = label_origin((205, 0, 400, 300), 120, 20, 640)
    assert left == (10, 0) and right == (205, 0)  # inside, under the top edge: they cannot stack
    assert left[0] + 120 <= right[0]  # side by side, no overlap
    # with room above, the label sits on top of the box, as before
    assert label_origin((50, 100, 200, 300), 120, 20, 640) == (50, 80)
    # a box near the top with less room than the label: inside too
    assert label_origin((50, 12, 200, 300), 120, 20, 640) == (50, 12)
    # never past the right edge
    assert label_origin((600, 100, 639, 300), 120, 20, 640) == (520, 80)


def test_drawn_labels_at_the_top_edge_do_not_overlap():
    image = np.zeros((400, 640, 3), np.uint8)
    dets = [
        {"box": [10, 0, 200, 300], "score": 0.42, "class_id": 0, "class_name": "Fall"},
        {"box": [10, 0, 200, 250], "score": 0.50, "class_id": 1, "class_name": "Fall"},  # the case of the report
        {"box": [300, 120, 500, 300], "score": 0.9, "class_id": 2, "class_name": "person"},
    ]
    out = draw(image, {"detections": dets})
    changed = (out != image).any(2)
    assert changed[:30, 10:200].any()  # the labels of the top boxes are inside them, at the top
    assert changed[90:120, 300:420].any()  # the third box's label is above it
    assert not changed[:120, 520:].any()  # nothing drawn where no box is


# ---------------------------------------------------------------- the client explains (items 2, 1)


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers every request like a TorchServe whose keys are not the ones in key_file.json."""

    mode = "reject"

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "hang":
            time.sleep(5)
        body = json.dumps({"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def stub_server():
    servers = []

    def start(mode: str) -> str:
        handler = type("Stub", (_Stub,), {"mode": mode})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _key_file(tmp_path: Path) -> Path:
    keys = {"management": {"key": "m1"}, "inference": {"key": "i1"}, "API": {"key": "a1"}}
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps(keys))
    return path


def test_client_explains_a_key_file_rewritten_by_a_second_start(stub_server, tmp_path, capsys):
    url = stub_server("reject")
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0")
    rc = client_main([str(image), "--url", f"{url}/predictions/yolo", "--management-url", url, "--key-file", str(_key_file(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 1
    assert "second `torchserve --start`" in err and "yolo-ts-serve" in err and "Traceback" not in err
    assert err.strip() == "error: " + KEY_FILE_STALE.format(key_file=tmp_path / "key_file.json")


def test_client_timeout_and_no_server_are_one_line_errors(stub_server, tmp_path, capsys):
    url = stub_server("hang")
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0")
    t0 = time.monotonic()
    rc = client_main([str(image), "--url", f"{url}/predictions/yolo", "--timeout", "1", "--key-file", str(tmp_path / "none.json")])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1 and elapsed < 4, elapsed  # bounded by --timeout, not by the server
    assert "no answer" in err and "within 1 s" in err and "Traceback" not in err
    rc = client_main([str(image), "--url", "http://127.0.0.1:9/predictions/yolo", "--key-file", str(tmp_path / "none.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "nothing answers" in err and "Traceback" not in err
    assert client_main([str(tmp_path / "missing.jpg")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------- packaging (items 10, 11)


@pytest.mark.slow
def test_a_wheel_built_after_an_export_holds_only_our_packages(tmp_path):
    """A copy of the checkout with export output in exports/ (a staged handler copy included), built
    into a wheel: only export, handler (with its subpackages), bench and tools are inside, and the
    console scripts point at them."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO_ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO_ROOT / f).read_bytes())
    staged = src / "exports" / "yolo" / "code" / "handler"
    staged.mkdir(parents=True)
    (staged / "__init__.py").write_text("")
    (staged / "pipeline.py").write_text("# a staged copy, as python -m export --archive leaves it\n")
    (src / "exports" / "__init__.py").write_text("")
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"export", "handler", "bench", "tools"}, tops
    assert not any(n.startswith("exports/") for n in names)
    assert "handler/tasks/__init__.py" in names and "handler/yolo_handler.py" in names and "tools/batch/cli.py" in names
    assert "bench/gpu_check/__main__.py" in names and "bench/experiments/breakdown.py" in names  # bench's subpackages too
    for script in ("yolo-ts-export = export.__main__:main", "yolo-ts-serve = tools.serve:main", "yolo-ts-client = tools.client:main", "yolo-ts-demo = tools.demo:main"):
        assert script in entry_points


def test_console_scripts_are_installed():
    bindir = Path(sys.executable).parent
    for name in ("yolo-ts-export", "yolo-ts-serve", "yolo-ts-client", "yolo-ts-demo"):
        assert (bindir / name).is_file(), f"{name} not in {bindir}: reinstall with pip install -e ."
    out = subprocess.run([str(bindir / "yolo-ts-client"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--timeout" in out.stdout
