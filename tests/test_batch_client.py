"""``yolo-ts-client`` on many images (tools/batch), without a model: the sources, the output formats
against plain references, resuming, and the whole run against a fake TorchServe (tests/batch_fake_server.py):
retries on 503, dropped connections and timeouts, key renewal, per-image errors, a server that goes away,
bad inputs and exit codes. The real TorchServe and Ultralytics' own label files: tests/test_batch_served.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from batch_fake_server import FakeTorchServe, fake_answer
from handler.encoding.masks import encode_rle
from tools.batch import formats
from tools.batch.outputs import CocoOutput, JsonlOutput, OutputError, YoloOutput
from tools.batch.runner import backoff_s, saved_path
from tools.batch.sources import Dataset, SourceError, image_set, is_batch_input
from tools.client import main as client_main
from tools.server import REPO_ROOT



def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- sources


def test_folder_is_searched_recursively_and_other_files_are_skipped(tmp_path):
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "sub/deeper/d.tiff", "notes.txt", ".hidden.jpg", ".cache/e.jpg"):
        touch(tmp_path / name)
    s = image_set([str(tmp_path)])
    assert [s.name(p) for p in s.paths] == ["a.PNG", "b.jpg", "sub/c.webp", "sub/deeper/d.tiff"]
    assert [p.name for p in s.skipped] == ["notes.txt"] and s.root == tmp_path.resolve() and s.dataset is None
    # the run's own output folders are never inputs
    touch(tmp_path / "pictures" / "b.jpg")
    assert "pictures/b.jpg" not in [s.name(p) for p in image_set([str(tmp_path)], exclude=(tmp_path / "pictures",)).paths]


def test_glob_list_file_and_several_files(tmp_path, monkeypatch):
    for name in ("x/1.jpg", "x/2.jpg", "x/y/3.jpg", "x/n.txt"):
        touch(tmp_path / name)
    s = image_set([str(tmp_path / "x" / "**" / "*.jpg")])
    assert [s.name(p) for p in s.paths] == ["1.jpg", "2.jpg", "y/3.jpg"]
    # a list file: ./ is relative to the file, other relative paths to the working directory (Ultralytics' rules)
    monkeypatch.chdir(tmp_path)
    lst = touch(tmp_path / "x" / "list.txt", b"# val images\n./1.jpg\n\nx/y/3.jpg\n./missing.jpg\n")
    s = image_set([str(lst)])
    assert [s.name(p) for p in s.paths] == ["1.jpg", "missing.jpg", "y/3.jpg"]  # a missing file fails when it is read
    s = image_set([str(tmp_path / "x" / "2.jpg"), str(tmp_path / "x" / "y" / "3.jpg")])
    assert [s.name(p) for p in s.paths] == ["2.jpg", "y/3.jpg"]


def test_dataset_yaml_split_names_and_label_paths(tmp_path):
    for name in ("ds/images/val/a.jpg", "ds/images/val/b.jpg", "ds/images/test/c.jpg"):
        touch(tmp_path / name)
    touch(tmp_path / "ds" / "test.txt", b"./images/test/c.jpg\n")
    yaml = touch(tmp_path / "ds" / "data.yaml", b"path: .\ntrain: images/train\nval: images/val\ntest: test.txt\nnames:\n  0: person\n  1: car\n")
    s = image_set([str(yaml)])
    assert [s.name(p) for p in s.paths] == ["images/val/a.jpg", "images/val/b.jpg"]
    assert s.dataset == Dataset(yaml.resolve(), ["person", "car"], "val")
    assert Dataset.label_path(s.paths[0]) == tmp_path.resolve() / "ds" / "labels" / "val" / "a.txt"
    assert [s.name(p) for p in image_set([str(yaml)], split="test").paths] == ["images/test/c.jpg"]
    with pytest.raises(SourceError, match=r"has no 'minival' split \(it has train, val, test\); choose one with --split"):
        image_set([str(yaml)], split="minival")


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: str(d / "nothing-here"), "does not exist"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no images in"),
        (lambda d: touch(d / "docs" / "a.txt") and str(d / "docs"), r"found only 1 other file\(s\): a.txt"),
        (lambda d: str(d / "*.jpg"), "no file matches"),
        (lambda d: str(touch(d / "d.yaml", b"val: [unclosed")), "cannot read .* as YAML"),
        (lambda d: str(touch(d / "d.yaml", b"- a\n- b\n")), "is not a dataset YAML"),
        (lambda d: str(touch(d / "d.yaml", b"val: images/val\n")), "neither a folder nor a text file"),
        (lambda d: str(touch(d / "l.txt", b"# nothing\n")), "lists no image path"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, make, words):
    with pytest.raises(SourceError, match=words) as e:
        image_set([make(tmp_path)])
    assert "\n" not in str(e.value)


def test_which_inputs_are_a_batch(tmp_path):
    touch(tmp_path / "a.jpg")
    assert not is_batch_input([str(tmp_path / "a.jpg")]) and not is_batch_input([str(tmp_path / "missing.jpg")])
    for spec in ([str(tmp_path)], [str(tmp_path / "*.jpg")], ["list.txt"], ["data.yaml"], ["a.jpg", "b.jpg"]):
        assert is_batch_input(spec), spec


# ---------------------------------------------------------------- formats (plain references)


def pose_answer() -> dict:
    kpts = [[[100.25, 50.5, 0.9], [0.0, 0.0, 0.2]], [[300.125, 200.75, 0.7], [310.0, 210.5, 0.6]]]
    return {"task": "pose", "image": {"width": 640, "height": 427}, "detections": [
        {"box": [10.123456, 20.5, 210.98765, 400.0], "score": 0.87654321, "class_id": 0, "class_name": "person", "keypoints": kpts[0]},
        {"box": [300.0, 100.0, 639.0, 426.99], "score": 0.3, "class_id": 0, "class_name": "person", "keypoints": kpts[1]},
    ]}


def reference_line(values: list[float]) -> str:
    return ("%g " * len(values)).rstrip() % tuple(values)


def f32(v: float) -> np.float32:
    return np.float32(v)


def test_yolo_pose_label_is_ultralytics_arithmetic_and_formatting(tmp_path):
    """The label of a pose answer equals a plain reference: float32 xywhn as Ultralytics computes it from
    float32 tensors, keypoints / image size, visibility, confidence last, ``%g`` each."""
    answer = pose_answer()
    w, h = f32(640), f32(427)
    lines = []
    for d in answer["detections"]:
        x1, y1, x2, y2 = (f32(v) for v in d["box"])
        values = [d["class_id"], float((x1 + x2) / f32(2) / w), float((y1 + y2) / f32(2) / h), float((x2 - x1) / w), float((y2 - y1) / h)]
        for x, y, v in d["keypoints"]:
            values += [float(f32(x) / w), float(f32(y) / h), float(f32(v))]
        lines.append(reference_line([*values, float(f32(d["score"]))]))
    label = tmp_path / "x.txt"
    assert formats.write_yolo_label(answer, label)
    assert label.read_text() == "".join(line + "\n" for line in lines)
    label.write_text("an older run's label\n")  # a second write replaces it (save_txt alone would append)
    formats.write_yolo_label(answer, label)
    assert label.read_text() == "".join(line + "\n" for line in lines)


def test_yolo_obb_classify_segment_and_empty_labels(tmp_path):
    obb = {"task": "obb", "image": {"width": 200, "height": 100}, "detections": [
        {"box": [0, 0, 0, 0], "score": 0.5, "class_id": 2, "class_name": "ship", "obb": {"cx": 50.0, "cy": 40.0, "w": 20.0, "h": 10.0, "angle": 0.0},
         "corners": []}]}
    formats.write_yolo_label(obb, tmp_path / "obb.txt")  # corners from xywhr, as Ultralytics: (60,45) (60,35) (40,35) (40,45)
    assert (tmp_path / "obb.txt").read_text() == "2 0.3 0.45 0.3 0.35 0.2 0.35 0.2 0.45 0.5\n"
    top = {"task": "classify", "image": {"width": 9, "height": 9}, "top": [
        {"class_id": 7, "class_name": "dog", "score": 0.61}, {"class_id": 2, "class_name": "cat", "score": 0.2},
        {"class_id": 0, "class_name": "fox", "score": 0.1}, {"class_id": 3, "class_name": "owl", "score": 0.05},
        {"class_id": 9, "class_name": "elk", "score": 0.014}, {"class_id": 1, "class_name": "ant", "score": 0.001}]}
    formats.write_yolo_label(top, tmp_path / "cls.txt")
    assert (tmp_path / "cls.txt").read_text() == "0.61 dog\n0.20 cat\n0.10 fox\n0.05 owl\n0.01 elk\n"  # Ultralytics' top 5, :.2f
    mask = np.zeros((100, 200), np.uint8)
    mask[20:60, 50:150] = 1
    seg = {"task": "segment", "image": {"width": 200, "height": 100}, "detections": [
        {"box": [50, 20, 149, 59], "score": 0.75, "class_id": 1, "class_name": "b", "mask": encode_rle(mask)}]}
    formats.write_yolo_label(seg, tmp_path / "seg.txt")  # the outline of the mask (OpenCV's contour, corners only)
    assert (tmp_path / "seg.txt").read_text() == "1 0.25 0.2 0.25 0.59 0.745 0.59 0.745 0.2 0.75\n"
    label = touch(tmp_path / "none.txt", b"old\n")
    assert not formats.write_yolo_label({"task": "detect", "image": {"width": 9, "height": 9}, "detections": []}, label)
    assert not label.exists()  # as Ultralytics: no file when nothing is detected
    with pytest.raises(formats.FormatError, match="semantic model"):
        formats.write_yolo_label({"task": "semantic", "image": {"width": 9, "height": 9}, "semantic": {}}, tmp_path / "s.txt")


def test_coco_annotations_of_each_kind():
    pose = formats.coco_annotations(pose_answer(), 7, lambda c, n: c + 1)
    assert pose[0] == {"image_id": 7, "category_id": 1, "bbox": [10.123456, 20.5, 210.98765 - 10.123456, 379.5], "score": 0.87654321,
                       "keypoints": [100.25, 50.5, 0.9, 0.0, 0.0, 0.2]}
    rle = encode_rle(np.ones((4, 5), np.uint8))
    seg = {"detections": [{"box": [1, 2, 4, 4], "score": 0.5, "class_id": 3, "class_name": "c", "mask": rle}]}
    assert formats.coco_annotations(seg, 1, lambda c, n: c)[0]["segmentation"] == rle
    obb = {"detections": [{"box": [1, 2, 4, 4], "score": 0.5, "class_id": 3, "class_name": "c",
                           "obb": {"cx": 2.5, "cy": 3, "w": 3, "h": 2, "angle": 0.1}, "corners": [[1, 2], [4, 2], [4, 4], [1, 4]]}]}
    (ann,) = formats.coco_annotations(obb, 1, lambda c, n: c)
    assert ann["rbox"] == [2.5, 3, 3, 2, 0.1] and ann["poly"] == [1, 2, 4, 2, 4, 4, 1, 4] and ann["bbox"] == [1, 2, 3, 2]
    with pytest.raises(formats.FormatError, match="classify model, whose answers hold no detections; use --format jsonl or yolo"):
        formats.coco_annotations({"task": "classify", "top": []}, 1, lambda c, n: c)
    pycocotools = pytest.importorskip("pycocotools.coco")
    gt = pycocotools.COCO()
    gt.dataset = {"images": [{"id": 7, "width": 640, "height": 427}], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    gt.createIndex()
    assert len(gt.loadRes(pose).anns) == 2  # pycocotools reads them


def test_jsonl_line_is_the_answer_with_its_path():
    answer = fake_answer(b"abc")
    assert json.loads(formats.jsonl_line("sub/a.jpg", answer)) == {"path": "sub/a.jpg", **answer}
    assert list(json.loads(formats.jsonl_line("a.jpg", answer)))[0] == "path"


# ---------------------------------------------------------------- outputs and resuming


def test_jsonl_output_resumes_and_drops_a_cut_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(formats.jsonl_line("a.jpg", {"x": 1}) + "\n" + '{"path":"b.jp')  # killed while writing b
    o = JsonlOutput(out)
    assert o.answered == {"a.jpg"}
    o.add("b.jpg", {"x": 2})
    o.close()
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == ["a.jpg", "b.jpg"]
    foreign = touch(tmp_path / "mine.jsonl", b'{"no": "path"}\n')
    with pytest.raises(OutputError, match="line 1 is not an answer of this client"):
        JsonlOutput(foreign)
    assert foreign.read_bytes() == b'{"no": "path"}\n'  # never changed


def test_coco_and_yolo_outputs_keep_a_record_and_refuse_foreign_files(tmp_path):
    out = tmp_path / "r.json"
    o = CocoOutput(out, lambda c, n: c, lambda name: None)
    o.add("a.jpg", fake_answer(b"a"))
    o.add("b.jpg", {**fake_answer(b"b"), "detections": []})
    o.close()
    record = json.loads((tmp_path / "r.images.json").read_text())
    assert [(im["id"], im["file_name"]) for im in record["images"]] == [(1, "a.jpg"), (2, "b.jpg")]
    again = CocoOutput(out, lambda c, n: c, lambda name: None)
    assert again.answered == {"a.jpg", "b.jpg"} and len(again.results) == 1
    again.add("c.jpg", fake_answer(b"c"))
    again.close()
    assert [r["image_id"] for r in json.loads(out.read_text())] == [1, 3]
    theirs = touch(tmp_path / "theirs.json", b"[]")
    with pytest.raises(OutputError, match="was not written by this client"):
        CocoOutput(theirs, lambda c, n: c, lambda name: None)
    labels = touch(tmp_path / "dataset" / "labels" / "a.txt", b"0 0.5 0.5 0.1 0.1\n").parent
    with pytest.raises(OutputError, match="was not written by this client"):
        YoloOutput(labels)
    assert (labels / "a.txt").read_text() == "0 0.5 0.5 0.1 0.1\n"


def test_backoff_and_saved_picture_names(tmp_path):
    waits = [backoff_s(a) for a in range(6)]
    assert 0.25 <= waits[0] <= 0.5 and 4 <= waits[5] <= 8
    assert saved_path(tmp_path, "sub/a.jpg") == tmp_path / "sub" / "a.jpg"
    assert saved_path(tmp_path, "a.mpo") == tmp_path / "a.mpo.jpg"


# ---------------------------------------------------------------- the whole run against a fake server


@pytest.fixture
def fake(tmp_path):
    servers = []

    def start(**kwargs) -> FakeTorchServe:
        s = FakeTorchServe(tmp_path / f"key_file{len(servers)}.json", **kwargs)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def images(folder: Path, contents: dict[str, bytes]) -> Path:
    for name, data in contents.items():
        touch(folder / name, data)
    return folder


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = client_main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_folder_to_stdout_with_progress_and_retries(fake, tmp_path, capsys):
    server = fake()
    folder = images(tmp_path / "in", {"a.jpg": b"plain a", "b/c.png": b"503x2 busy", "d.jpg": b"drop once", "e.jpg": b"slow once"})
    rc, out, err = run([str(folder), "--workers", "3", "--timeout", "1", *server.args()], capsys)
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted(line["path"] for line in lines) == ["a.jpg", "b/c.png", "d.jpg", "e.jpg"]
    for line in lines:
        data = (folder / line.pop("path")).read_bytes()
        assert line == fake_answer(data)  # the answer as the server sent it
    assert server.sent(b"503x2 busy") == 3 and server.sent(b"drop once") == 2 and server.sent(b"slow once") == 2
    assert "4/4" in err and "img/s" in err  # tqdm's bar
    assert "4 of 4 image(s) answered, 0 failed" in err and "images/s" in err
    from bench.batch_client import SUMMARY  # the throughput benchmark reads this summary

    assert SUMMARY.search(err).group(1, 2, 3) == ("4", "4", "0")


def test_expired_key_is_renewed_once_for_all_threads(fake, tmp_path, capsys):
    server = fake()
    server.expire_key()
    folder = images(tmp_path / "in", {f"{i}.jpg": f"img {i}".encode() for i in range(12)})
    rc, out, err = run([str(folder), "--workers", "6", *server.args()], capsys)
    assert rc == 0, err
    assert len(out.splitlines()) == 12 and server.renewals == 1


def test_per_image_errors_are_recorded_and_counted_and_resume_retries_them(fake, tmp_path, capsys):
    server = fake()
    folder = images(tmp_path / "in", {"a.jpg": b"plain a", "bad.jpg": b"bad bytes", "c.jpg": b"plain c", "notes.md": b"#"})
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # unreadable
    out = tmp_path / "r.jsonl"
    rc, _, err = run([str(folder), "--out", str(out), *server.args()], capsys)
    assert rc == 1
    assert "2 of 4 image(s) answered, 2 failed" in err and "1 file(s) are not images by their suffix and are skipped: notes.md" in err
    assert "error: bad.jpg: HTTP 400: not an image" in err and "error: gone.jpg: cannot read" in err
    errors = [json.loads(line) for line in (tmp_path / "r.errors.jsonl").read_text().splitlines()]
    assert sorted((e["path"], e["status"], e["error"]["type"]) for e in errors) == [
        ("bad.jpg", 400, "invalid_image"), ("gone.jpg", None, "unreadable_file")]
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == ["a.jpg", "c.jpg"]
    # the second run sends only what is not in --out yet
    (folder / "bad.jpg").write_bytes(b"plain fixed")
    (folder / "gone.jpg").unlink()
    touch(folder / "new.jpg", b"plain new")
    rc, _, err = run([str(folder), "--out", str(out), *server.args()], capsys)
    assert rc == 0, err
    assert "2 of 2 image(s) answered, 0 failed, 2 skipped (already in" in err
    assert server.sent(b"plain a") == 1 and server.sent(b"plain fixed") == 1
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == ["a.jpg", "bad.jpg", "c.jpg", "new.jpg"]
    assert not (tmp_path / "r.errors.jsonl").exists()  # this run had none


def test_server_that_goes_away_stops_the_run_and_keeps_the_answers(fake, tmp_path, capsys):
    server = fake()
    folder = images(tmp_path / "in", {f"{i:02d}.jpg": f"img {i}".encode() for i in range(6)})
    out = tmp_path / "r.jsonl"
    rc, _, _ = run([str(folder), "--out", str(out), *server.args()], capsys)
    assert rc == 0
    port = server.httpd.server_address[1]
    server.stop()
    for i in range(6, 10):
        touch(folder / f"{i:02d}.jpg", f"img {i}".encode())
    rc, _, err = run([str(folder), "--out", str(out), "--retries", "1", "--workers", "2", *server.args()], capsys)
    assert rc == 1
    assert "error: the server at" in err and "stopped answering: connection failed" in err and "run the same command again" in err
    assert len(out.read_text().splitlines()) == 6  # kept
    back = fake(port=port)  # the server is back on the same address
    rc, _, err = run([str(folder), "--out", str(out), "--key-file", str(back.key_file), "--url", f"{back.url}/predictions/yolo",
                      "--management-url", back.url], capsys)
    assert rc == 0 and "4 of 4 image(s) answered" in err and len(out.read_text().splitlines()) == 10


def test_a_server_that_stays_busy_stops_the_run(fake, tmp_path, capsys):
    server = fake()
    folder = images(tmp_path / "in", {"a.jpg": b"503 forever", "b.jpg": b"plain b"})
    rc, _, err = run([str(folder), "--retries", "2", "--workers", "1", *server.args()], capsys)
    assert rc == 1 and server.sent(b"503 forever") == 3
    assert "HTTP 503: Model yolo has no worker, also after 2 retries" in err


def test_refused_options_stop_at_the_first_answer(fake, tmp_path, capsys):
    server = fake()
    folder = images(tmp_path / "in", {f"{i}.jpg": f"img {i}".encode() for i in range(20)})
    rc, _, err = run([str(folder), "--conf", "7", "--workers", "2", *server.args()], capsys)
    assert rc == 1 and "the server refuses the request options: conf must be between 0 and 1" in err
    assert sum(server.counts.values()) <= 4  # not 20


def test_coco_and_yolo_formats_with_a_fake_server(fake, tmp_path, capsys):
    server = fake()
    folder = images(tmp_path / "in", {"a.jpg": b"plain a", "s/b.jpg": b"plain bb"})
    rc, _, err = run([str(folder), "--format", "coco", "--out", str(tmp_path / "r.json"), *server.args()], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "r.json").read_text())
    ids = {im["file_name"]: im["id"] for im in json.loads((tmp_path / "r.images.json").read_text())["images"]}
    assert sorted(ids) == ["a.jpg", "s/b.jpg"] and "full_precision" not in server.fields
    assert sorted((r["image_id"], r["bbox"][0]) for r in results) == sorted((ids[n], float(len(d) % 17)) for n, d in (("a.jpg", b"plain a"), ("s/b.jpg", b"plain bb")))
    rc, _, err = run([str(folder), "--format", "yolo", "--out", str(tmp_path / "labels"), *server.args()], capsys)
    assert rc == 0, err
    assert server.fields.get("full_precision") == "true"  # the label files need the unrounded numbers
    assert sorted(p.relative_to(tmp_path / "labels").as_posix() for p in (tmp_path / "labels").rglob("*.txt")) == ["a.txt", "s/b.txt"]
    assert (tmp_path / "labels.images.json").is_file()
    # a GT file gives the ids; a class it does not have stops the run
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 42, "file_name": "a.jpg"}, {"id": 43, "file_name": "b.jpg"}], "annotations": [],
                              "categories": [{"id": 1, "name": "person"}]}))
    rc, _, err = run([str(folder), "--format", "coco", "--coco-gt", str(gt), "--out", str(tmp_path / "g.json"), *server.args()], capsys)
    assert rc == 0, err
    assert sorted((r["image_id"], r["category_id"]) for r in json.loads((tmp_path / "g.json").read_text())) == [(42, 1), (43, 1)]


def test_a_classify_model_cannot_write_coco(fake, tmp_path, capsys):
    server = fake(task="classify")
    folder = images(tmp_path / "in", {"a.jpg": b"plain a"})
    rc, _, err = run([str(folder), "--format", "coco", "--out", str(tmp_path / "r.json"), *server.args()], capsys)
    assert rc == 1 and "--format coco: the model is a classify model" in err


def test_save_dir_draws_each_image(fake, tmp_path, capsys):
    server = fake()
    png = cv2.imencode(".png", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()
    folder = images(tmp_path / "in", {"a.png": png, "s/b.png": png + b"\0"})
    rc, _, err = run([str(folder), "--save-dir", str(tmp_path / "pics"), *server.args()], capsys)
    assert rc == 0, err
    for name in ("a.png", "s/b.png"):
        picture = cv2.imread(str(tmp_path / "pics" / name))
        assert picture.shape == (48, 64, 3) and (picture != 90).any()  # the box is drawn
    rc, _, err = run([str(folder), "--save-dir", str(folder), *server.args()], capsys)
    assert rc == 2 and "is the input folder" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["{d}", "--format", "yolo"], r"--format yolo needs --out \(a folder\)"),
        (["{d}", "--eval"], "--eval and --coco-gt go with --format coco"),
        (["{d}", "--save", "x.jpg"], "for many images use --save-dir DIR"),
        (["{d}", "--format", "yolo", "--out", "{t}/l", "--top-k", "3"], "--top-k must be 5 or more"),
        (["{d}", "--format", "coco", "--out", "{t}/r.json", "--eval"], "--eval needs ground truth"),
        (["{t}/missing/*.jpg"], "no file matches"),
        (["{d}", "--out", "{t}/data.yaml/r.jsonl"], "error: cannot write"),
        (["{t}/missing.txt"], "does not exist"),
        (["{t}/empty"], "no images in"),
        (["{t}/data.yaml"], "has no 'val' split"),
        (["{d}", "--format", "coco", "--out", "{t}/r.json", "--coco-gt", "{t}/gt.json"], r"1 image\(s\) are not in"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_sends_nothing(fake, tmp_path, capsys, argv, words):
    server = fake()
    folder = images(tmp_path / "in", {"a.jpg": b"plain a"})
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "data.yaml", b"train: images\nnames: [a]\n")
    touch(tmp_path / "gt.json", json.dumps({"images": [], "annotations": [], "categories": []}).encode())
    rc, _, err = run([a.format(d=folder, t=tmp_path) for a in argv] + server.args(), capsys)
    assert rc == 2 and re.search(words, err), err
    assert len(err.strip().splitlines()) == 1 and server.counts == {}


def test_console_script_runs_a_batch_without_a_traceback(fake, tmp_path):
    """``python -m tools.client`` as a user runs it, no server at the URL: one line, exit 1."""
    folder = images(tmp_path / "in", {"a.jpg": b"plain a"})
    proc = subprocess.run([sys.executable, "-m", "tools.client", str(folder), "--retries", "0", "--url", "http://127.0.0.1:9/predictions/yolo",
                           "--key-file", str(tmp_path / "none.json")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "stopped answering: connection failed" in proc.stderr


def test_the_full_precision_option_of_the_service_is_unrounded():
    """The response option the yolo format asks for: numbers written unrounded, everything else as before."""
    from handler.response import ModelInfo
    from handler.tasks import task_for
    from handler.tasks.detect import Detections, Thresholds

    task, info = task_for("pose"), ModelInfo("m", "pose", ["person"], 1)
    row = torch.tensor([[10.123456, 20.5, 210.98765, 400.0, 0.87654321, 0, 100.3333, 50.6666, 0.912345]], dtype=torch.float32)
    _, rounded = task.options({}, Thresholds(), ["person"])
    _, full = task.options({"full_precision": "true"}, Thresholds(), ["person"])
    (r,), (f,) = task.to_json(Detections(row), info, rounded), task.to_json(Detections(row), info, full)
    assert r["box"] == [10.12, 20.5, 210.99, 400.0] and r["score"] == 0.8765
    assert [np.float32(v) for v in f["box"]] == list(row[0, :4].numpy()) and np.float32(f["score"]) == row[0, 4].numpy()
    assert np.float32(f["keypoints"][0][0]) == row[0, 6].numpy() and f["keypoints"][0][2] == float(row[0, 8])
    cls = task_for("classify")
    from handler.tasks.classify import TopClasses, TopK

    _, full = cls.options({"full_precision": "1"}, TopK(), ["a", "b"])
    (top,) = cls.to_json(TopClasses(torch.tensor([[1.0, 0.123456789]])), ModelInfo("m", "classify", ["a", "b"], 0), full)
    assert np.float32(top["score"]) == np.float32(0.123456789) and top["score"] != 0.1235
    from handler.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="full_precision must be true or false"):
        task.options({"full_precision": "maybe"}, Thresholds(), ["person"])
