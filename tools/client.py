"""Command-line client: POST an image to the served model, print the JSON, optionally draw it.

    python -m tools.client bus.jpg --save bus.annotated.jpg
    python -m tools.client photos/ --out results.jsonl                  # many images: tools/batch, docs/batch.md
    python -m tools.client bus.jpg --conf 0.5 --classes person --url http://127.0.0.1:8080/predictions/yolo
    python -m tools.client bus.jpg --top-k 3 --save bus.top3.jpg          # a classify model
    python -m tools.client --video clip.mp4 --tracker botsort --save clip.tracked.mp4   # one tracked stream
    python -m tools.client --video 0                                      # camera 0, until Ctrl-C

``--video`` reads a video file or a camera index with OpenCV and sends the frames as one stream
(``track=`` on the first frame, ``stream=<id>`` on the others, a frameless ``end`` at the end or on
Ctrl-C); it prints one JSON line per frame, and ``--save`` writes the video with each track's ID and a
short trail (docs/tracking.md).

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
import threading
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import requests

from tools import dense_drawing

DEFAULT_URL = "http://127.0.0.1:8080/predictions/yolo"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
# COCO-17 keypoint skeleton (0-based pairs), as Ultralytics draws it.
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
KEYPOINT_MIN_VISIBILITY = 0.5  # Ultralytics' default for drawing a keypoint
MASK_ALPHA = 0.5  # opacity of a drawn instance mask, as Ultralytics' plot


def decode_rle(rle: dict) -> np.ndarray:
    """A response's ``{"size": [H, W], "counts": "<COCO RLE string>"}`` -> ``uint8[H, W]`` 0/1
    (pycocotools' ``rleFrString`` + ``rleDecode``, so the client needs no pycocotools)."""
    h, w = rle["size"]
    counts: list[int] = []
    data, i = rle["counts"].encode("ascii"), 0
    while i < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[i] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i, k = i + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    values = np.zeros(len(counts), np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape(w, h).T  # column-major


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


class ClientError(RuntimeError):
    """Something the user can fix, said in one line (the CLI prints it without a traceback)."""


KEY_FILE_STALE = (
    "TorchServe rejects every key in {key_file}: the file is not the running server's any more. This happens when a "
    "second `torchserve --start` ran in the same directory (it rewrites key_file.json even when it then fails, e.g. on "
    "a busy port). Stop the running server (`torchserve --stop` with its TMPDIR, or `yolo-ts-serve --stop`) and start "
    "it again with `yolo-ts-serve`, which refuses busy ports before touching key_file.json; then retry"
)


class KeyRing:
    """The inference key of ``key_file``, shared by the threads of one client: read once, renewed once when
    TorchServe rejects it (see the module doc), however many threads saw the rejection."""

    def __init__(self, key_file: Path, management_url: str = DEFAULT_MANAGEMENT_URL, timeout: float = 120) -> None:
        self.key_file, self.management_url, self.timeout = key_file, management_url, timeout
        self._lock = threading.Lock()
        self._token = load_token(key_file)

    @property
    def token(self) -> str | None:
        return self._token

    def renewed(self, rejected: str | None) -> str | None:
        """A key to use instead of ``rejected``: another thread's renewal, the file's key if another client
        renewed it, or a new one from the management API."""
        with self._lock:
            if self._token != rejected:
                return self._token
            fresh = load_token(self.key_file)
            if fresh == rejected:
                try:
                    fresh = renew_token(self.key_file, self.management_url, timeout=self.timeout)
                except requests.HTTPError as e:  # the management API rejects the file's API key as well
                    raise ClientError(KEY_FILE_STALE.format(key_file=self.key_file)) from e
            self._token = fresh
            return fresh

    def predict(
        self, image: bytes | None, url: str = DEFAULT_URL, params: dict | None = None, timeout: float = 120,
        session: requests.Session | None = None,
    ) -> requests.Response:
        """:func:`predict` with this key; on a rejected key, renew it and retry once."""
        token = self._token
        r = predict(image, url, token, params, timeout, session)
        if not is_token_rejected(r) or not self.key_file.is_file():
            return r
        r = predict(image, url, self.renewed(token), params, timeout, session)
        if is_token_rejected(r):
            raise ClientError(KEY_FILE_STALE.format(key_file=self.key_file))
        return r


def predict_with_key_file(
    image: bytes, key_file: Path, url: str = DEFAULT_URL, management_url: str = DEFAULT_MANAGEMENT_URL,
    params: dict | None = None, timeout: float = 120, session: requests.Session | None = None,
) -> requests.Response:
    """:func:`predict` with the key from ``key_file``; on a rejected key, renew it (see the module doc) and retry once."""
    return KeyRing(key_file, management_url, timeout).predict(image, url, params, timeout, session)


def predict(
    image: bytes | None, url: str = DEFAULT_URL, token: str | None = None, params: dict | None = None, timeout: float = 120,
    session: requests.Session | None = None,
) -> requests.Response:
    """POST ``image`` (encoded file bytes) as multipart field ``image`` with ``params`` as form fields; without an
    image (the end of a stream), ``params`` as a JSON body. ``session``: keep the connection open between calls."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = {k: str(v) for k, v in (params or {}).items() if v is not None}
    post = (session or requests).post
    if image is None:
        return post(url, json={k: v for k, v in (params or {}).items() if v is not None}, headers=headers, timeout=timeout)
    return post(url, files={"image": ("image", image)}, data=data, headers=headers, timeout=timeout)


def _color(class_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(class_id)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


def _draw_top(out: np.ndarray, top: list[dict], thick: int) -> np.ndarray:
    """A classify response's ``top`` labels, one line each, in the image's top-left corner (drawn in place)."""
    scale, y = thick / 2.5, 0
    for entry in top:
        label = f"{entry['class_name']} {entry['score']:.3f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, thick - 1))
        cv2.rectangle(out, (0, y), (tw + 2 * thick, y + th + base + thick), _color(entry["class_id"]), -1)
        cv2.putText(out, label, (thick, y + th + thick // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(1, thick - 1), cv2.LINE_AA)
        y += th + base + thick
    return out


def label_origin(box: tuple[int, int, int, int], text_w: int, text_h: int, image_w: int) -> tuple[int, int]:
    """Top-left corner of a box's label (``text_h``: the label's full height): above the box, or, when
    there is no room above (a box touching the image's top edge), inside the box under its top edge, so
    that the labels of neighbouring boxes at the top never stack onto each other. Always inside the image."""
    x1, y1 = box[0], box[1]
    top = y1 - text_h if y1 - text_h >= 0 else max(y1, 0)
    left = max(min(x1, image_w - text_w), 0)
    return left, top


def draw(
    image: np.ndarray, result: dict, color: Callable[[dict], tuple[int, int, int]] | None = None,
    label: Callable[[dict], str] | None = None,
) -> np.ndarray:
    """Boxes (rotated ones for OBB models), labels, semi-transparent masks (segment models) and the COCO
    skeleton (pose models) on a copy of ``image: uint8[H, W, 3]`` BGR; for a classify response, its
    top-k labels and scores; for a semantic or depth response, ``tools/dense_drawing.py``'s pictures. ``color`` and ``label`` of a detection: by class and ``"class score"`` unless given."""
    color_of = color or (lambda det: _color(det["class_id"]))
    label_of = label or (lambda det: f"{det['class_name']} {det['score']:.2f}")
    out = image.copy()
    thick = max(1, round(sum(out.shape[:2]) / 600))
    if "top" in result:
        return _draw_top(out, result["top"], thick)
    if "semantic" in result:  # a semantic map: colour overlay and legend
        return dense_drawing.draw_semantic(image, result)
    if "depth" in result:  # a depth map: colour-mapped beside the photo, with a scale bar in metres
        return dense_drawing.draw_depth(image, result)
    for det in result["detections"]:  # masks first, so that boxes and labels stay readable
        if "mask" in det:
            mask = decode_rle(det["mask"]).astype(bool)
            out[mask] = (out[mask] * (1 - MASK_ALPHA) + np.array(color_of(det)) * MASK_ALPHA).astype(np.uint8)
    for det in result["detections"]:
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        color = color_of(det)
        if "corners" in det:
            cv2.polylines(out, [np.round(det["corners"]).astype(np.int32)], True, color, thick, cv2.LINE_AA)
        else:
            cv2.rectangle(out, (x1, y1), (x2, y2), color, thick, cv2.LINE_AA)
        label = label_of(det)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, thick / 3, max(1, thick - 1))
        left, top = label_origin((x1, y1, x2, y2), tw, th + base, out.shape[1])
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


TRAIL_FRAMES = 15  # frames of each track's trail in a saved video
FRAME_FORMATS = {"jpg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]), "png": (".png", [])}


def _track_color(det: dict) -> tuple[int, int, int]:
    """One color per track ID (gray for a detection shown without one)."""
    return (160, 160, 160) if det.get("track_id") is None else _color(1000 + det["track_id"])


def _track_label(det: dict) -> str:
    prefix = "" if det.get("track_id") is None else f"#{det['track_id']} "
    return f"{prefix}{det['class_name']} {det['score']:.2f}"


class Trails:
    """The last ``length`` centres of each track (original-image pixels), drawn as a fading polyline."""

    def __init__(self, length: int = TRAIL_FRAMES) -> None:
        self.length = length
        self.points: dict[int, deque] = {}

    def update(self, detections: list[dict]) -> None:
        seen = set()
        for det in detections:
            if det.get("track_id") is None:
                continue
            x1, y1, x2, y2 = det["box"]
            self.points.setdefault(det["track_id"], deque(maxlen=self.length)).append((int((x1 + x2) / 2), int((y1 + y2) / 2)))
            seen.add(det["track_id"])
        for tid in [t for t in self.points if t not in seen]:  # a track not shown this frame fades out
            if self.points[tid]:
                self.points[tid].popleft()
            if not self.points[tid]:
                del self.points[tid]

    def draw(self, image: np.ndarray) -> np.ndarray:
        """Each trail on ``image`` (in place): thin and old at its tail, thick at the newest point."""
        thick = max(1, round(sum(image.shape[:2]) / 600))
        for tid, pts in self.points.items():
            color = _color(1000 + tid)
            for k in range(1, len(pts)):
                cv2.line(image, pts[k - 1], pts[k], color, 1 + 2 * thick * k // len(pts), cv2.LINE_AA)
            if pts:
                cv2.circle(image, pts[-1], thick + 2, color, -1, cv2.LINE_AA)
        return image


def video_frames(source: str) -> tuple[Iterator[np.ndarray], float, int | None]:
    """The BGR frames of a video file or of a camera (``source`` all digits: its index), the frame rate,
    and the number of frames (None for a camera, or when the file does not say)."""
    cap = cv2.VideoCapture(int(source)) if source.isdigit() else cv2.VideoCapture(source)
    if not cap.isOpened():
        raise ClientError(f"OpenCV cannot open {'camera ' if source.isdigit() else ''}{source}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if not source.isdigit() else 0

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    return
                yield frame
        finally:
            cap.release()

    return frames(), fps if 0 < fps < 1000 else 10.0, count if count > 0 else None


def stream_video(args: argparse.Namespace) -> int:
    """``--video``: one stream over the frames, a JSON line per frame, ``--save`` the annotated video; a
    progress bar (tqdm) on stderr."""
    from tqdm import tqdm

    frames, fps, count = video_frames(args.video)
    ext, flags = FRAME_FORMATS[args.frame_format]
    session, stream_id, writer, trails, sent = requests.Session(), None, None, Trails(args.trail), 0
    keys = KeyRing(args.key_file, args.management_url, args.timeout)
    call = lambda image, params: keys.predict(image, args.url, params, args.timeout, session)  # noqa: E731
    total = min(count, args.max_frames) if count and args.max_frames else (count or args.max_frames or None)
    bar = tqdm(total=total, unit="frame", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    try:
        for frame in frames:
            if args.max_frames and sent >= args.max_frames:
                break
            params = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det, "classes": args.classes}
            params.update({"track": args.tracker} if stream_id is None else {"stream": stream_id})
            r = call(cv2.imencode(ext, frame, flags)[1].tobytes(), params)
            body = _json(r)
            bar.clear()
            print(json.dumps(body, separators=(",", ":")), flush=True)
            if r.status_code != 200:
                print(f"error: HTTP {r.status_code} on frame {sent + 1}: {body.get('error', {}).get('message', r.text)}", file=sys.stderr)
                return 1
            stream_id, sent = body["stream"]["id"], sent + 1
            bar.update()
            if args.save:
                if writer is None:
                    writer = cv2.VideoWriter(str(args.save), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frame.shape[1], frame.shape[0]))
                    if not writer.isOpened():
                        print(f"error: OpenCV cannot write {args.save}", file=sys.stderr)
                        return 1
                trails.update(body["detections"])
                writer.write(trails.draw(draw(frame, body, _track_color, _track_label)))
    except KeyboardInterrupt:
        print("interrupted; ending the stream", file=sys.stderr)
    finally:
        bar.close()
        if writer is not None:
            writer.release()
        if stream_id is not None:
            try:
                call(None, {"stream": stream_id, "end": True})
            except (requests.RequestException, ClientError):
                pass
    if sent == 0:
        print(f"error: no frame could be read from {args.video}", file=sys.stderr)
        return 1
    print(f"{sent} frames in stream {stream_id}" + (f"; saved {args.save}" if args.save else ""), file=sys.stderr)
    return 0


def _json(r: requests.Response) -> dict:
    try:
        return r.json()
    except ValueError:
        return {"error": {"type": "http", "message": r.text}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from tools.batch import cli as batch  # imported here: tools.batch imports this module

    p = argparse.ArgumentParser(prog="yolo-ts-client", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="an image file (JPEG, PNG, WebP, BMP, TIFF); or many: a folder, "
                   "a glob (quoted), a text file of paths, a dataset YAML, or several files (see the batch options); or give --video")
    p.add_argument("--video", help="a video file or a camera index (0, 1, ...): send its frames as one tracked stream")
    p.add_argument("--tracker", default="bytetrack", choices=["bytetrack", "botsort"], help="--video: the tracker (default bytetrack)")
    p.add_argument("--frame-format", default="jpg", choices=sorted(FRAME_FORMATS), help="--video: how frames are sent (default jpg, quality 95)")
    p.add_argument("--max-frames", type=int, default=0, help="--video: stop after this many frames (default: all)")
    p.add_argument("--trail", type=int, default=TRAIL_FRAMES, help=f"--video --save: trail length in frames (default {TRAIL_FRAMES})")
    p.add_argument("--url", default=DEFAULT_URL, help=f"prediction URL (default {DEFAULT_URL})")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe key_file.json (default ./key_file.json)")
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL, help=f"where an expired key is renewed (default {DEFAULT_MANAGEMENT_URL})")
    p.add_argument("--conf", type=float, help="score threshold for this request")
    p.add_argument("--iou", type=float, help="NMS IoU threshold for this request")
    p.add_argument("--max-det", type=int, help="detections to return at most")
    p.add_argument("--classes", help="comma-separated class ids or names, e.g. person,0")
    p.add_argument("--polygons", action="store_true", help="segment models: also return each mask's outline")
    p.add_argument("--top-k", type=int, help="classify models: how many classes to return (default 5)")
    p.add_argument("--save", type=Path, help="write the image with the detections (classify: the top-k labels) drawn on it; "
                   "with --video: the annotated video (.mp4) with track IDs and trails")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer (default 120)")
    batch.add_arguments(p)
    args = p.parse_args(argv)
    if bool(args.inputs) == (args.video is not None):
        p.error("give an image file (or many images) or --video (not both)")
    args.batch = bool(args.inputs) and (batch.is_batch_input(args.inputs) or batch.wants_batch(args))
    args.image = None if args.batch or not args.inputs else Path(args.inputs[0])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch:
        from tools.batch import cli as batch

        return batch.run(args)
    if args.video is not None:
        try:
            return stream_video(args)
        except ClientError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except requests.Timeout:
            print(f"error: no answer from {args.url} within {args.timeout:g} s (--timeout)", file=sys.stderr)
            return 1
        except requests.ConnectionError:
            print(f"error: nothing answers at {args.url}; is TorchServe running (yolo-ts-serve), and is the URL right (--url)?", file=sys.stderr)
            return 1
    try:
        data = args.image.read_bytes()
    except OSError as e:
        print(f"error: cannot read {args.image}: {e.strerror}", file=sys.stderr)
        return 2
    params = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det, "classes": args.classes, "top_k": args.top_k}
    if args.polygons:
        params["polygons"] = "true"
    try:
        r = predict_with_key_file(data, args.key_file, args.url, args.management_url, params, args.timeout)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except requests.Timeout:
        print(f"error: no answer from {args.url} within {args.timeout:g} s (--timeout); the model may have no live worker: "
              "check the management API (GET /models/NAME) and logs/model_log.log", file=sys.stderr)
        return 1
    except requests.ConnectionError:
        print(f"error: nothing answers at {args.url}; is TorchServe running (yolo-ts-serve), and is the URL right (--url)?", file=sys.stderr)
        return 1
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
