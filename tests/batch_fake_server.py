"""A fake TorchServe for the batch client's fast tests: stdlib ``http.server`` in a thread.

It answers ``POST /predictions/yolo`` like our handler (a detect answer) after checking the Bearer key,
and ``POST /token?type=inference`` like TorchServe's management API (a new key, written to the key
file). What it does with an image depends on the image's bytes, so that a test chooses per file:

* ``b"503x2 ..."``: HTTP 503 twice, then the answer; ``b"503 ..."`` (no count): 503 forever;
* ``b"drop ..."``: close the connection without answering, once; ``b"slow ..."``: answer after 1.5 s, once;
* ``b"bad ..."``: 400 ``invalid_image`` (a per-image error);
* anything else: 200 with one detection whose box depends on the bytes (an image's answer is its own).

Every request is counted by its bytes, and the form fields of the last request are kept.
"""

from __future__ import annotations

import json
import threading
import time
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


def fake_answer(image: bytes, task: str = "detect") -> dict:
    """The answer the fake server gives to ``image`` (tests compare outputs with it)."""
    x = float(len(image) % 17)
    if task == "classify":
        return {"model": "yolo", "model_version": "1.0", "task": "classify", "image": {"width": 64, "height": 48},
                "top": [{"class_id": 3, "class_name": "cat", "score": 0.9}], "speed_ms": {"preprocess": 1.0, "inference": 1.0, "postprocess": 1.0}}
    return {"model": "yolo", "model_version": "1.0", "task": "detect", "image": {"width": 64, "height": 48},
            "detections": [{"box": [x, 2.0, x + 20.5, 30.25], "score": 0.875, "class_id": 0, "class_name": "person"}],
            "speed_ms": {"preprocess": 1.0, "inference": 1.0, "postprocess": 1.0}}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that timed out leaves a broken pipe: expected here
        pass


class FakeTorchServe:
    def __init__(self, key_file: Path, task: str = "detect", port: int = 0) -> None:
        self.key_file, self.task = key_file, task
        self.lock = threading.Lock()
        self.counts: dict[bytes, int] = {}
        self.fields: dict[str, str] = {}
        self.renewals = 0
        self.inference_key, self.api_key = "inf-1", "api-1"
        self._write_keys()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                url = urlsplit(self.path)
                auth = self.headers.get("Authorization", "")
                if url.path == "/token":
                    if auth != f"Bearer {server.api_key}" or parse_qs(url.query).get("type") != ["inference"]:
                        return self._send(400, {"code": 400, "type": "InvalidKeyException", "message": "bad API key"})
                    server.renew()
                    return self._send(200, {"message": "ok"})
                if auth != f"Bearer {server.inference_key}":
                    return self._send(400, {"code": 400, "type": "InvalidKeyException",
                                            "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"})
                fields = server.parse_form(self.headers.get("Content-Type", ""), body)
                image = fields.pop("image", b"")
                with server.lock:
                    n = server.counts[image] = server.counts.get(image, 0) + 1
                    server.fields = {k: v.decode() for k, v in fields.items()}
                if image.startswith(b"503x2") and n <= 2 or image.startswith(b"503 "):
                    return self._send(503, {"code": 503, "type": "ServiceUnavailableException", "message": "Model yolo has no worker"})
                if image.startswith(b"drop") and n == 1:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if image.startswith(b"slow") and n == 1:
                    time.sleep(1.5)
                if image.startswith(b"bad"):
                    return self._send(400, {"error": {"type": "invalid_image", "message": "not an image"}})
                if float(server.fields.get("conf", 0)) > 1:
                    return self._send(400, {"error": {"type": "invalid_parameter", "message": "conf must be between 0 and 1, got 7.0"}})
                return self._send(200, fake_answer(image, server.task))

        self.httpd = _QuietServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def args(self) -> list[str]:
        """The client options that point at this server."""
        return ["--url", f"{self.url}/predictions/yolo", "--management-url", self.url, "--key-file", str(self.key_file)]

    def _write_keys(self) -> None:
        self.key_file.write_text(json.dumps({"management": {"key": "m-1"}, "inference": {"key": self.inference_key}, "API": {"key": self.api_key}}))

    def renew(self) -> None:
        with self.lock:
            self.renewals += 1
            self.inference_key = f"inf-{self.renewals + 1}"
            self._write_keys()

    def expire_key(self) -> None:
        """The key in the file stops working (as after ``token_expiration_min``); the file is not rewritten."""
        with self.lock:
            self.inference_key = "inf-expired-" + self.inference_key

    @staticmethod
    def parse_form(content_type: str, body: bytes) -> dict[str, bytes]:
        if not content_type.startswith("multipart/form-data"):
            return {"image": body}
        msg = BytesParser(policy=email_policy).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in msg.iter_parts()}

    def sent(self, image: bytes) -> int:
        return self.counts.get(image, 0)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
