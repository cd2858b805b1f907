"""Tracked video streams in the service (handler/video.py) without a server.

Fast: the request options and their errors, the ``tracking:`` settings and the archive's section, the
status of each stream error, one worker's streams on a fake clock (expiry, limit, end, a model that does
not track), and what a tracked frame shows (``with_tracks``) for detect, OBB and segment rows.
Slow (an exported model): the service's tracked answers equal our tracker fed the pipeline's detections
(handler/tracking is proven equal to Ultralytics' trackers in tests/test_tracking.py); two frames of one
stream in one batch; a frame that does not decode; the TorchServe adapter's X-Stream-Id header and its
maxWorkers warning; segment and OBB models end to end; a classify model refuses ``track``.
"""

from __future__ import annotations

import base64
import json
import logging

import cv2
import numpy as np
import pytest
import torch
import yaml

from handler.config import HandlerConfig, TrackingConfig
from handler.errors import InvalidImage, InvalidParameter, StreamUnavailable, UnsupportedMediaType
from handler.request import parse_request
from handler.tasks import task_for
from handler.tasks.detect import Detections, Thresholds, rbox_corners
from handler.tracking import BotSortParams, ByteTrackParams, FrameTracks, create_tracker, tracker_params
from handler.tracking import FrameDetections
from handler.video import StreamOptions, VideoStreams, stream_options

NAMES = ["person", "bicycle", "car"]
JPEG = b"\xff\xd8\xff\xe0fake"


def b(text: str) -> bytearray:
    return bytearray(text.encode())


# ---------------------------------------------------------------- request options (no model)


@pytest.mark.parametrize(
    "params, header, expected",
    [
        ({}, None, None),
        ({"conf": "0.5"}, None, None),
        ({"track": "botsort", "track_buffer": "60"}, None, StreamOptions("botsort", {"track_buffer": "60"})),
        ({"track": True}, None, StreamOptions(True)),
        ({"stream": "trk-a-1"}, None, StreamOptions(stream_id="trk-a-1")),
        ({}, " trk-a-1 ", StreamOptions(stream_id="trk-a-1")),
        ({"stream": "trk-a-1"}, "trk-a-1", StreamOptions(stream_id="trk-a-1")),
        ({"stream": "trk-a-1", "end": "true"}, None, StreamOptions(stream_id="trk-a-1", end=True)),
        ({"stream": "trk-a-1", "end": False}, None, StreamOptions(stream_id="trk-a-1")),
    ],
)
def test_stream_options(params, header, expected):
    assert stream_options(params, header) == expected


@pytest.mark.parametrize(
    "params, header, words",
    [
        ({"track": "bytetrack", "stream": "x"}, None, "send one of them"),
        ({"track": "bytetrack"}, "x", "send one of them"),
        ({"stream": "x"}, "y", "differ"),
        ({"track_buffer": "60"}, None, "set when a stream starts"),
        ({"stream": "x", "match_thresh": "0.5"}, None, "set when a stream starts"),
        ({"end": "true"}, None, "give its id as stream=<id>"),
        ({"track": "bytetrack", "end": "true"}, None, "not with track"),
        ({"stream": "x", "end": "maybe"}, None, "end must be true or false"),
        ({"stream": ""}, None, "1 to 200 characters"),
        ({"stream": 17}, None, "1 to 200 characters"),
        ({"stream": "x" * 201}, None, "1 to 200 characters"),
    ],
)
def test_contradictory_stream_options_are_400(params, header, words):
    with pytest.raises(InvalidParameter, match=words):
        stream_options(params, header)


def parse(row, header=None, task="pose"):
    return parse_request(row, task_for(task), Thresholds(), NAMES, tracked_defaults=Thresholds(conf=0.1), stream_header=header)


def test_stream_options_arrive_in_every_form():
    form = parse({"image": bytearray(JPEG), "track": b("botsort"), "track_buffer": b("60"), "conf": b("0.3")})
    assert form.stream == StreamOptions("botsort", {"track_buffer": "60"}) and form.options == Thresholds(conf=0.3)
    body = {"image": base64.b64encode(JPEG).decode(), "stream": "trk-a-1", "end": True}
    js = parse({"body": body})
    assert js.image == JPEG and js.stream == StreamOptions(stream_id="trk-a-1", end=True)
    raw = parse({"body": bytearray(JPEG)}, header="trk-a-1")
    assert raw.stream == StreamOptions(stream_id="trk-a-1")
    with pytest.raises(InvalidParameter, match="both in the query string and in the JSON body"):
        parse({"body": {"image": "aW1n", "track": "bytetrack"}, "track": b("botsort")})


def test_tracked_requests_default_to_conf_0_1_and_stateless_ones_do_not():
    assert parse({"body": bytearray(JPEG), "track": b("bytetrack")}).options == Thresholds(conf=0.1)
    assert parse({"body": bytearray(JPEG), "stream": b("s")}).options == Thresholds(conf=0.1)
    assert parse({"body": bytearray(JPEG)}).options == Thresholds()
    assert parse({"body": bytearray(JPEG), "stream": b("s"), "conf": b("0.4")}).options == Thresholds(conf=0.4)


def test_only_the_end_of_a_stream_may_come_without_a_frame():
    assert parse({"stream": b("trk-a-1"), "end": b("true")}).image is None
    assert parse({"body": {"stream": "trk-a-1", "end": True}}).image is None
    with pytest.raises(InvalidImage, match="the request has no image"):
        parse({"stream": b("trk-a-1")})
    with pytest.raises(InvalidImage, match='the JSON body has no "image" field'):  # unchanged for stateless requests
        parse({"body": {"conf": 0.5}})
    with pytest.raises(InvalidImage, match='the JSON body has no "image" field'):
        parse({"body": {"track": "bytetrack"}})
    with pytest.raises(UnsupportedMediaType, match="no image found"):
        parse({"garbage=1": bytearray(b"")})


# ---------------------------------------------------------------- settings (no model)


def test_tracking_settings_defaults_and_overrides():
    assert TrackingConfig.from_dict(None) == TrackingConfig()
    assert TrackingConfig().params("bytetrack") == ByteTrackParams() and TrackingConfig().conf == 0.1
    c = TrackingConfig.from_dict({"max_streams": 3, "idle_seconds": 2.5, "tracker": "botsort.yaml",
                                  "botsort": {"track_buffer": 60, "gmc_method": "none"}})
    assert (c.max_streams, c.idle_seconds, c.tracker) == (3, 2.5, "botsort")
    assert c.params("botsort") == BotSortParams(track_buffer=60, gmc_method="none")


@pytest.mark.parametrize(
    "section, words",
    [
        ({"max_stream": 3}, "unknown key(s) ['max_stream']"),
        ({"max_streams": 0}, "tracking.max_streams must be an integer from 1"),
        ({"idle_seconds": 0}, "tracking.idle_seconds must be a number of seconds above 0"),
        ({"idle_seconds": "60"}, "tracking.idle_seconds"),
        ({"enabled": "yes"}, "tracking.enabled must be true or false"),
        ({"conf": 1.5}, "tracking.conf must be a number from 0.0 to 1.0"),
        ({"tracker": "deepsort"}, "tracking.tracker: tracker must be one of bytetrack, botsort"),
        ({"bytetrack": {"track_buffer": -1}}, "tracking.bytetrack: tracker parameter track_buffer must be an integer"),
        ({"bytetrack": {"gmc_method": "orb"}}, "tracking.bytetrack: unknown bytetrack parameter 'gmc_method'"),
        ({"botsort": {"with_reid": True}}, "tracking.botsort: tracker parameter with_reid must be false"),
        ({"botsort": [1]}, "tracking.botsort must be a mapping"),
        ([1], "`tracking:` must be a mapping"),
    ],
)
def test_bad_tracking_settings_fail_at_load_naming_the_key(section, words):
    with pytest.raises(ValueError) as err:
        TrackingConfig.from_dict(section)
    assert words in str(err.value)


def test_worker_warning_when_tracking_is_on_with_several_workers():
    assert TrackingConfig().worker_warning({"minWorkers": 1, "maxWorkers": 1}) is None
    assert TrackingConfig().worker_warning(None) is None
    warning = TrackingConfig().worker_warning({"minWorkers": 2, "maxWorkers": 4})
    assert "minWorkers 2, maxWorkers 4" in warning and "maxWorkers: 1" in warning
    assert TrackingConfig(enabled=False).worker_warning({"maxWorkers": 4}) is None


def test_archive_writes_a_tracking_section_the_worker_reads_back():
    from export.archive import model_config_yaml

    default = yaml.safe_load(model_config_yaml())
    assert default["maxWorkers"] == 1 and default["minWorkers"] == 1
    assert TrackingConfig.from_dict(default["tracking"]) == TrackingConfig()
    settings = {"max_streams": 4, "idle_seconds": 7.5, "botsort": {"gmc_method": "none", "track_buffer": 90}}
    text = model_config_yaml(tracking_settings=settings)
    assert TrackingConfig.from_dict(yaml.safe_load(text)["tracking"]) == TrackingConfig.from_dict(settings)
    assert "# WARNING: tracking is on with maxWorkers 2" in model_config_yaml(torchserve={"maxWorkers": 2})
    with pytest.raises(ValueError, match="tracking.botsort"):
        model_config_yaml(tracking_settings={"botsort": {"match_thresh": 2}})


@pytest.mark.parametrize("kind, status, type_", [("unknown", 404, "unknown_stream"), ("restarted", 410, "stream_restarted"),
                                                 ("expired", 410, "stream_expired"), ("ended", 410, "stream_ended"),
                                                 ("too_many", 429, "too_many_streams"), ("exists", 409, "stream_exists")])
def test_stream_errors_map_to_their_status(kind, status, type_):
    e = StreamUnavailable(kind, "why")
    assert (e.status, e.type, e.body()) == (status, type_, {"error": {"type": type_, "message": "why"}})


# ---------------------------------------------------------------- one worker's streams (no model)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def empty_detections() -> FrameDetections:
    return FrameDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))


def test_streams_start_continue_end_expire_and_limit():
    clock = FakeClock()
    streams = VideoStreams(TrackingConfig(max_streams=2, idle_seconds=5, tracker="botsort"), True, "pose", clock)
    start = streams.check(StreamOptions(True, {"track_buffer": "7"}))
    assert start.params == BotSortParams(track_buffer=7)
    a = streams.open(start, None)
    assert a.stream.id.startswith("trk-") and a.describe() == {"id": a.stream.id, "frame": 0, "tracker": "botsort", "ended": False}
    streams.track(a, empty_detections())
    assert a.describe()["frame"] == 1
    b_ = streams.open(streams.check(StreamOptions("bytetrack")), None)
    plan = streams.check(StreamOptions("bytetrack"))  # the check passes; the start itself is refused
    with pytest.raises(StreamUnavailable) as err:
        streams.open(plan, None)
    assert err.value.status == 429 and "max_streams 2" in err.value.message
    assert streams.check(StreamOptions(stream_id=a.stream.id)).stream is a.stream
    ended = streams.open(streams.check(StreamOptions(stream_id=b_.stream.id, end=True)), None)
    assert ended.ended and ended.describe()["ended"]
    with pytest.raises(StreamUnavailable) as err:
        streams.check(StreamOptions(stream_id=b_.stream.id))
    assert (err.value.status, err.value.type) == (410, "stream_ended")
    clock.t += 5.5
    assert streams.expire_idle() == [a.stream.id]
    with pytest.raises(StreamUnavailable) as err:
        streams.check(StreamOptions(stream_id=a.stream.id))
    assert (err.value.status, err.value.type) == (410, "stream_expired")
    with pytest.raises(StreamUnavailable) as err:
        streams.check(StreamOptions(stream_id="made-up"))
    assert (err.value.status, err.value.type) == (404, "unknown_stream")
    other = VideoStreams(TrackingConfig(), True, "pose")  # a restarted worker process
    with pytest.raises(StreamUnavailable) as err:
        other.check(StreamOptions(stream_id=a.stream.id))
    assert (err.value.status, err.value.type) == (410, "stream_restarted")


@pytest.mark.parametrize(
    "options, words",
    [
        (StreamOptions("deepsort"), "tracker must be one of bytetrack, botsort, got 'deepsort'"),
        (StreamOptions("bytetrack", {"track_high_thresh": "1.5"}), "track_high_thresh must be a number from 0 to 1"),
        (StreamOptions("bytetrack", {"gmc_method": "orb"}), "unknown bytetrack parameter 'gmc_method'"),
        (StreamOptions("botsort", {"with_reid": "true"}), "with_reid must be false"),
        (StreamOptions("false"), "tracker must be one of"),
    ],
)
def test_unknown_tracker_and_parameters_out_of_range_are_400(options, words):
    with pytest.raises(InvalidParameter, match=words):
        VideoStreams(TrackingConfig(), True, "pose").check(options)


def test_a_model_that_does_not_track_and_tracking_off_are_400():
    with pytest.raises(InvalidParameter, match="a classify model does not track objects"):
        VideoStreams(TrackingConfig(), False, "classify").check(StreamOptions("bytetrack"))
    with pytest.raises(InvalidParameter, match="tracking is off for this model"):
        VideoStreams(TrackingConfig(enabled=False), True, "pose").check(StreamOptions(stream_id="x"))
    assert not task_for("classify").trackable and all(task_for(t).trackable for t in ("detect", "pose", "segment", "obb"))


# ---------------------------------------------------------------- what a tracked frame shows (no model)


def rows_tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_with_tracks_takes_the_trackers_boxes_order_and_clip():
    task = task_for("pose")
    # two detections with 1 keypoint column triple each: x1 y1 x2 y2 score cls kx ky kv
    out = Detections(rows_tensor([[10, 10, 50, 90, 0.9, 0, 30, 20, 0.8], [60, 5, 99, 70, 0.6, 0, 80, 9, 0.7]]))
    tracks = FrameTracks(np.array([[58, -3, 101, 71, 7, 0.6, 0, 1], [11, 9, 49, 91, 3, 0.9, 0, 0]], np.float32), pending=False)
    shown = task.with_tracks(out, tracks, height=100, width=100)
    assert shown.track_ids == [7, 3]
    assert torch.equal(shown.rows[:, :4], rows_tensor([[58, 0, 100, 71], [11, 9, 49, 91]]))  # clipped, tracker order
    assert torch.equal(shown.rows[:, 4:], out.rows[[1, 0], 4:])  # score, class, keypoints of the detection taken
    from handler.response import ModelInfo

    info = ModelInfo("m", "pose", ["person"], nkpt=1)
    dets = task.to_json(shown, info, None)
    assert [d["track_id"] for d in dets] == [7, 3] and list(dets[0])[0] == "track_id"
    assert dets[0]["keypoints"] == [[80.0, 9.0, 0.7]]
    pending = task.with_tracks(out, FrameTracks(np.zeros((0, 8), np.float32), pending=True), 100, 100)
    assert pending.rows.shape == (0, 9) and pending.track_ids == []
    untracked = task.with_tracks(out, FrameTracks(np.zeros((0, 8), np.float32), pending=False), 100, 100)
    assert torch.equal(untracked.rows, out.rows) and untracked.track_ids == [None, None]
    assert [d["track_id"] for d in task.to_json(untracked, info, None)] == [None, None]
    assert "track_id" not in task.to_json(out, info, None)[0]  # stateless: unchanged


def test_with_tracks_obb_recomputes_corners_and_hull_from_the_trackers_xywhr():
    task = task_for("obb")
    xywhr = torch.tensor([[50.0, 40.0, 30.0, 10.0, 0.3]])
    corners = rbox_corners(xywhr)
    row = torch.cat((corners.amin(1), corners.amax(1), torch.tensor([[0.8, 2.0]]), xywhr, corners.reshape(1, 8)), 1)
    out = Detections(row)
    moved = np.array([[52, 41, 31, 11, 0.35, 4, 0.8, 2, 0]], np.float32)  # cx cy w h angle id score cls idx
    shown = task.with_tracks(out, FrameTracks(moved, pending=False), 100, 100)
    want = rbox_corners(torch.from_numpy(moved[:, :5]))
    assert torch.equal(shown.rows[:, 6:11], torch.from_numpy(moved[:, :5]))
    assert torch.equal(shown.rows[:, 11:19], want.reshape(1, 8))
    assert torch.equal(shown.rows[:, :4], torch.cat((want.amin(1), want.amax(1)), 1)) and shown.track_ids == [4]
    # the tracker's input is the rotated box
    d = task.tracker_detections(out)
    assert d.is_obb and np.array_equal(d.boxes, xywhr.numpy()) and d.scores.tolist() == [pytest.approx(0.8)]


def test_with_tracks_segment_masks_follow_the_detection():
    task = task_for("segment")
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[0, :2] = 1
    masks[1, 5:] = 1
    out = Detections(rows_tensor([[0, 0, 8, 2, 0.9, 0], [0, 5, 8, 8, 0.8, 1]]), masks)
    shown = task.with_tracks(out, FrameTracks(np.array([[0, 5, 8, 8, 2, 0.8, 1, 1]], np.float32), False), 8, 8)
    assert torch.equal(shown.masks, masks[[1]]) and shown.track_ids == [2]
    from handler.response import ModelInfo

    dets = task.to_json(shown, ModelInfo("m", "segment", NAMES, 0), None)
    assert dets[0]["track_id"] == 2 and dets[0]["class_id"] == 1 and dets[0]["mask"]["size"] == [8, 8]


# ---------------------------------------------------------------- the service with an exported model (slow)


def png(frame: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", frame)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def clip():
    from tools.make_clip import make_clip

    return make_clip()


@pytest.fixture(scope="module")
def service(pose_export):
    from handler.service import YoloService

    return YoloService.from_dir(pose_export.out_dir)


def core_tracker_rows(service, frames, name: str) -> list[np.ndarray]:
    """Our tracker fed the pipeline's detections at conf 0.1, as ``YOLO.track`` shows them (clipped)."""
    tracker = create_tracker(tracker_params(name))
    out = []
    for frame in frames:
        with torch.inference_mode():
            dets = service.pipeline.infer([service.pipeline.prepare(frame, Thresholds(conf=0.1))])[0][0]
        t = tracker.update(service.task.tracker_detections(dets), frame)
        out.append(t.clipped(*frame.shape[:2]) if len(t.rows) else (None if t.shows_untracked_detections else t.rows))
    return out


def tracked(answer) -> tuple[list, np.ndarray]:
    dets = answer.body["detections"]
    return [d["track_id"] for d in dets], np.array([d["box"] for d in dets], np.float64).reshape(-1, 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bytetrack", "botsort"])
def test_service_tracks_as_the_tracker_core(service, clip, name):
    frames = clip[:16]
    want = core_tracker_rows(service, frames, name)
    first = service.predict(png(frames[0]), track=name)
    sid = first.body["stream"]["id"]
    assert first.status == 200 and first.headers == {"X-Stream-Id": sid}
    assert list(first.body) == ["model", "model_version", "task", "image", "stream", "detections", "speed_ms"]
    assert set(first.body["speed_ms"]) == {"preprocess", "inference", "postprocess", "tracking"}
    answers = [first] + [service.predict(png(f), stream=sid) for f in frames[1:]]
    for i, (answer, rows) in enumerate(zip(answers, want)):
        assert answer.body["stream"] == {"id": sid, "frame": i + 1, "tracker": name, "ended": False}
        ids, boxes = tracked(answer)
        if rows is None:  # untracked detections shown as they are
            assert all(t is None for t in ids)
            continue
        assert ids == rows[:, 4].astype(int).tolist(), f"frame {i}"
        assert np.abs(boxes - rows[:, :4]).max() <= 0.01, f"frame {i}"
    assert len({t for a in answers for t in tracked(a)[0]}) >= 3
    end = service.handle([{"stream": b(sid), "end": b("true")}]).answers[0]
    assert end.status == 200 and end.body["stream"] == {"id": sid, "frame": 16, "tracker": name, "ended": True}
    assert "detections" not in end.body


@pytest.mark.slow
def test_two_frames_of_one_stream_in_one_batch_are_tracked_in_order(service, clip):
    sid_a = service.predict(png(clip[0]), track="botsort").body["stream"]["id"]
    sid_b = service.predict(png(clip[0]), track="botsort").body["stream"]["id"]
    for k in range(1, 9, 2):  # stream a: two frames per batch; stream b: one frame per batch
        batch = service.handle([{"body": bytearray(png(clip[k])), "stream": b(sid_a)},
                                {"body": bytearray(png(clip[k + 1])), "stream": b(sid_a)}]).answers
        alone = [service.predict(png(clip[k]), stream=sid_b), service.predict(png(clip[k + 1]), stream=sid_b)]
        assert [a.body["stream"]["frame"] for a in batch] == [k + 1, k + 2]
        for x, y in zip(batch, alone):
            assert tracked(x)[0] == tracked(y)[0]
            assert np.abs(tracked(x)[1] - tracked(y)[1]).max() <= 0.05


@pytest.mark.slow
def test_a_frame_that_does_not_decode_leaves_the_stream_as_it_was(service, clip):
    sid = service.predict(png(clip[0]), track="bytetrack").body["stream"]["id"]
    ref = service.predict(png(clip[0]), track="bytetrack").body["stream"]["id"]
    for k in (1, 2):
        service.predict(png(clip[k]), stream=sid)
        service.predict(png(clip[k]), stream=ref)
    bad = service.handle([{"body": bytearray(png(clip[3])[:2000]), "stream": b(sid)},  # truncated PNG
                          {"body": bytearray(png(clip[3])), "stream": b(ref)}]).answers
    assert bad[0].status == 400 and bad[0].body["error"]["type"] == "invalid_image" and bad[1].status == 200
    assert service.predict(b"not an image", stream=sid).status == 415
    nxt = service.predict(png(clip[3]), stream=sid)
    assert nxt.status == 200 and nxt.body["stream"]["frame"] == 4
    assert tracked(nxt)[0] == tracked(bad[1])[0]


@pytest.mark.slow
def test_a_tracker_failure_fails_that_frame_alone(service, clip, monkeypatch):
    sid = service.predict(png(clip[0]), track="bytetrack").body["stream"]["id"]
    real = service.streams.track

    def track(tracked, detections):
        if tracked.stream.id == sid:
            raise RuntimeError("a bug in the tracker")
        return real(tracked, detections)

    monkeypatch.setattr(service.streams, "track", track)
    frame = bytearray(png(clip[1]))
    answers = service.handle([{"body": frame, "stream": b(sid)}, {"body": frame, "track": b("botsort")}, {"body": frame}]).answers
    assert [a.status for a in answers] == [500, 200, 200]
    assert answers[0].body["error"]["type"] == "internal_error" and answers[1].body["stream"]["frame"] == 1


@pytest.mark.slow
def test_stateless_answers_are_unchanged_beside_streams(service, pose_export, sample_images):
    from handler.service import YoloService

    fresh = YoloService.from_dir(pose_export.out_dir, tracking=TrackingConfig(enabled=False))
    data = sample_images[0].read_bytes()
    service.predict(data, track="botsort")
    a, b_ = service.predict(data), fresh.predict(data)
    a.body.pop("speed_ms"), b_.body.pop("speed_ms")
    assert a.status == 200 and a.body == b_.body and a.headers == {} and "track_id" not in json.dumps(a.body)
    assert fresh.predict(data, track="bytetrack").status == 400
    assert service.describe()["tracking"]["max_streams"] == 16 and fresh.describe()["tracking"] is None


@pytest.mark.slow
def test_handler_sets_the_stream_header_and_warns_about_workers(pose_export, clip, caplog):
    from serving_support import make_context, run_batch

    from handler.yolo_handler import YoloHandler

    ctx = make_context(pose_export.out_dir)
    ctx.model_yaml_config = {"maxWorkers": 2, "handler": {"warmup": 0}, "tracking": {"max_streams": 1}}
    h = YoloHandler()
    with caplog.at_level(logging.WARNING, logger="handler.yolo_handler"):
        h.initialize(ctx)
    assert "tracking is on with maxWorkers 2" in caplog.text
    rows = [{"body": bytearray(png(clip[0])), "track": b("bytetrack")}, {"body": bytearray(png(clip[0])), "track": b("bytetrack")}]
    out, statuses = run_batch(h, ctx, rows, ["image/png"] * 2)
    assert statuses == [200, 429] and out[1]["error"]["type"] == "too_many_streams"
    assert ctx.request_processor[0].get_response_headers()["X-Stream-Id"] == out[0]["stream"]["id"]
    assert "X-Stream-Id" not in ctx.request_processor[1].get_response_headers()
    ctx.model_yaml_config = {"tracking": {"max_streams": -1}}
    refused = YoloHandler()
    refused.initialize(ctx)  # the worker stays up and answers the setting's error (503)
    out, statuses = run_batch(refused, ctx, rows[:1], ["image/png"])
    assert statuses == [503] and "tracking.max_streams" in out[0]["error"]["message"], out


def export_small(tmp_path_factory, yaml_name: str):
    from export.exporter import export_model

    return export_model(yaml_name, tmp_path_factory.mktemp(yaml_name.split(".")[0]), [320, 320], check=False, log=lambda _: None)


@pytest.mark.slow
@pytest.mark.parametrize("yaml_name", ["yolo11n-obb.yaml", "yolov8n-seg.yaml"])
def test_segment_and_obb_models_track(tmp_path_factory, clip, yaml_name):
    """Random-weight models (scores ~1e-3): thresholds low enough that their boxes are tracked. The answer
    of each frame equals our tracker fed the same detections; masks and rotated boxes follow the track."""
    from handler.service import YoloService

    service = YoloService.from_dir(export_small(tmp_path_factory, yaml_name).out_dir)
    frames = [cv2.resize(f, (320, 180)) for f in clip[:6]]
    with torch.inference_mode():
        first = service.pipeline.infer([service.pipeline.prepare(frames[0], Thresholds(conf=0.0, max_det=20))])[0][0]
    scores = np.sort(first.rows[:, 4].numpy())[::-1]
    conf = float(scores[min(9, len(scores) - 1)])  # about 10 detections per frame
    overrides = {"track_high_thresh": conf, "track_low_thresh": conf / 2, "new_track_thresh": conf, "match_thresh": 0.99,
                 "fuse_score": False}
    core = create_tracker(tracker_params("bytetrack", overrides))
    sid, tracked_frames, seen = None, 0, []
    for i, frame in enumerate(frames):
        params = {"conf": str(conf / 2), "max_det": "20"}
        params.update({"track": "bytetrack", **{k: str(v) for k, v in overrides.items()}} if sid is None else {"stream": sid})
        answer = service.predict(png(frame), **params)
        assert answer.status == 200, answer.body
        sid = answer.body["stream"]["id"]
        with torch.inference_mode():
            dets = service.pipeline.infer([service.pipeline.prepare(frame, Thresholds(conf=conf / 2, max_det=20))])[0][0]
        want = core.update(service.task.tracker_detections(dets), frame)
        got = answer.body["detections"]
        if want.shows_untracked_detections:
            assert all(d["track_id"] is None for d in got)
            continue
        rows = want.clipped(*frame.shape[:2])
        assert [d["track_id"] for d in got] == rows[:, -4].astype(int).tolist(), f"frame {i}"
        seen += [d["track_id"] for d in got]
        for d, r in zip(got, rows):
            src = dets.rows[int(r[-1])].numpy()
            assert d["score"] == pytest.approx(float(src[4]), abs=1e-4) and d["class_id"] == int(src[5])
            if "obb" in d:
                assert [d["obb"][k] for k in ("cx", "cy", "w", "h")] == pytest.approx(r[:4].tolist(), abs=0.01)
                corners = np.array(d["corners"])
                assert np.allclose(d["box"], [*corners.min(0), *corners.max(0)], atol=0.02)
            else:
                from tools.client import decode_rle

                assert d["box"] == pytest.approx(r[:4].tolist(), abs=0.01)
                mask = decode_rle(d["mask"])
                assert np.array_equal(mask, dets.masks[int(r[-1])].numpy()), "the mask of the detection the track took"
        tracked_frames += 1
    assert tracked_frames >= 3 and max(seen.count(t) for t in seen) >= 3, seen  # tracks kept over frames


@pytest.mark.slow
def test_a_classify_model_refuses_track(tmp_path_factory, sample_images):
    from export.exporter import export_model
    from handler.service import YoloService

    out = export_model("yolo11n-cls.yaml", tmp_path_factory.mktemp("cls"), [224, 224], check=False, log=lambda _: None)
    service = YoloService.from_dir(out.out_dir)
    answer = service.predict(sample_images[0].read_bytes(), track="bytetrack")
    assert answer.status == 400 and "a classify model does not track objects" in answer.body["error"]["message"]
    assert service.predict(sample_images[0].read_bytes()).status == 200
    assert service.describe()["tracking"] is None and HandlerConfig() == service.config


# ---------------------------------------------------------------- the client's video mode (no server)


def test_client_trails_follow_tracks_and_fade():
    from tools.client import Trails, parse_args

    trails = Trails(length=3)
    for x in (10, 20, 30, 40):
        trails.update([{"track_id": 1, "box": [x, 0, x + 10, 10]}, {"track_id": None, "box": [0, 0, 5, 5]}])
    assert list(trails.points[1]) == [(25, 5), (35, 5), (45, 5)] and None not in trails.points
    image = trails.draw(np.zeros((60, 80, 3), np.uint8))
    assert image[5, 30:45].any()  # the trail is drawn between the centres
    for _ in range(3):
        trails.update([])
    assert trails.points == {}  # a track no longer shown fades out
    assert parse_args(["--video", "clip.mp4"]).video == "clip.mp4"
    for argv in ([], ["bus.jpg", "--video", "clip.mp4"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
