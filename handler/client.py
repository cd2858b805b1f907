"""Command-line client: POST an image to the served model, print the JSON, optionally draw it.

    python -m handler.client bus.jpg --save bus.annotated.jpg
    python -m handler.client bus.jpg --conf 0.5 --classes person --url http://127.0.0.1:8080/predictions/yolo

The inference token comes from TorchServe's ``key_file.json`` (written in the directory TorchServe
was started from). Parameters travel as multipart form fields next to the image, which TorchServe
passes to the handler on ``/predictions/NAME`` (it drops the query string there).

Keys expire (``token_expiration_min`` in config.properties, 60 minutes by default); TorchServe then
answers 400 ``InvalidKeyException``. The client recovers by itself: it re-reads ``key_file.json``
(another client may have renewed the key already) and, if the key there is the one that failed, asks
the management API for a new one with the file's ``API`` key (``POST /token?type=inference``, which
rewrites ``key_file.json``), then retries once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import requests

DEFAULT_URL = "http://127.0.0.1:8080/predictions/yolo"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
# COCO-17 keypoint skeleton (0-based pairs), as Ultralytics draws it.
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
KEYPOINT_MIN_VISIBILITY = 0.5  # Ultralytics' default for drawing a keypoint


def load_token(key_file: Path, api: str = "inference") -> str | None:
    """The ``inference`` (or ``management``) key from TorchServe's key_file.json, or None if absent."""
    if not key_file.is_file():
        return None
    return json.loads(key_file.read_text())[api]["key"]


def is_token_rejected(response: requests.Response) -> bool:
    """TorchServe 0.12 answers a missing, wrong or expired key with 400 ``InvalidKeyException``."""
    return response.status_code in (400, 401, 403) and "InvalidKeyException" in response.text


def renew_token(key_file: Path, management_url: str = DEFAULT_MANAGEMENT_URL, api: str = "inference", timeout: float = 10) -> str:
    """A fresh ``api`` key: ``POST /token?type=API`` with the key file's ``API`` key; TorchServe rewrites the file."""
    api_key = json.loads(key_file.read_text())["API"]["key"]
    r = requests.post(f"{management_url}/token", params={"type": api}, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
    r.raise_for_status()
    return load_token(key_file, api)


def predict_with_key_file(
    image: bytes, key_file: Path, url: str = DEFAULT_URL, management_url: str = DEFAULT_MANAGEMENT_URL,
    params: dict | None = None, timeout: float = 120,
) -> requests.Response:
    """:func:`predict` with the key from ``key_file``; on a rejected key, renew it (see the module doc) and retry once."""
    token = load_token(key_file)
    r = predict(image, url, token, params, timeout)
    if not is_token_rejected(r) or not key_file.is_file():
        return r
    fresh = load_token(key_file)
    if fresh == token:
        fresh = renew_token(key_file, management_url, timeout=timeout)
    return predict(image, url, fresh, params, timeout)


def predict(
    image: bytes, url: str = DEFAULT_URL, token: str | None = None, params: dict | None = None, timeout: float = 120
) -> requests.Response:
    """POST ``image`` (encoded file bytes) as multipart field ``image`` with ``params`` as form fields."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = {k: str(v) for k, v in (params or {}).items() if v is not None}
    return requests.post(url, files={"image": ("image", image)}, data=data, headers=headers, timeout=timeout)


def _color(class_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(class_id)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


def draw(image: np.ndarray, result: dict) -> np.ndarray:
    """Boxes, labels and (pose models) the COCO skeleton on a copy of ``image: uint8[H, W, 3]`` BGR."""
    out = image.copy()
    thick = max(1, round(sum(out.shape[:2]) / 600))
    for det in result["detections"]:
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        color = _color(det["class_id"])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick, cv2.LINE_AA)
        label = f"{det['class_name']} {det['score']:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, thick / 3, max(1, thick - 1))
        top, left = max(y1 - th - base, 0), max(min(x1, out.shape[1] - tw), 0)  # keep the label inside the image
        cv2.rectangle(out, (left, top), (left + tw, top + th + base), color, -1)
        cv2.putText(out, label, (left, top + th), cv2.FONT_HERSHEY_SIMPLEX, thick / 3, (0, 0, 0), max(1, thick - 1), cv2.LINE_AA)
        kpts = det.get("keypoints")
        if not kpts:
            continue
        pts = [(int(round(x)), int(round(y)), v) for x, y, v in kpts]
        if len(pts) == 17:
            for a, b in COCO_SKELETON:
                if pts[a][2] >= KEYPOINT_MIN_VISIBILITY and pts[b][2] >= KEYPOINT_MIN_VISIBILITY:
                    cv2.line(out, pts[a][:2], pts[b][:2], (255, 128, 0), thick, cv2.LINE_AA)
        for x, y, v in pts:
            if v >= KEYPOINT_MIN_VISIBILITY:
                cv2.circle(out, (x, y), thick + 2, (0, 0, 255), -1, cv2.LINE_AA)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m handler.client", description=__doc__.splitlines()[0])
    p.add_argument("image", type=Path, help="image file (JPEG, PNG, WebP, BMP, TIFF)")
    p.add_argument("--url", default=DEFAULT_URL, help=f"prediction URL (default {DEFAULT_URL})")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe key_file.json (default ./key_file.json)")
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL, help=f"where an expired key is renewed (default {DEFAULT_MANAGEMENT_URL})")
    p.add_argument("--conf", type=float, help="score threshold for this request")
    p.add_argument("--iou", type=float, help="NMS IoU threshold for this request")
    p.add_argument("--max-det", type=int, help="detections to return at most")
    p.add_argument("--classes", help="comma-separated class ids or names, e.g. person,0")
    p.add_argument("--save", type=Path, help="write the image with the detections drawn on it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.image.read_bytes()
    params = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det, "classes": args.classes}
    r = predict_with_key_file(data, args.key_file, args.url, args.management_url, params)
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"type": "http", "message": r.text}}
    print(json.dumps(body, indent=2))
    if r.status_code != 200:
        print(f"error: HTTP {r.status_code}", file=sys.stderr)
        return 1
    if args.save:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if not cv2.imwrite(str(args.save), draw(image, body)):
            print(f"error: could not write {args.save}", file=sys.stderr)
            return 1
        print(f"saved {args.save}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
