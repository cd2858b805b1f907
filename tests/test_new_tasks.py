"""Semantic segmentation, depth and RT-DETR: the transforms, the scripted postprocessors and the
encodings against Ultralytics 8.4.190, and the P2 / P6 exports.

Fast tests feed random tensors to our postprocessors and to the Ultralytics predictors' own ``postprocess``
(and random images to our stretch and to Ultralytics' ``LetterBox(scale_fill=True)``). Slow tests build the
seeded YAML models ``yolo26n-sem.yaml``, ``yolo26n-depth.yaml`` and ``rtdetr-l.yaml``, widen their random
output layers (seeded, see :func:`_widen_outputs`) so that the maps have many classes, a range of depths and
distinct scores (a fresh random head is nearly constant, which would make every comparison trivially equal),
save them as ``.pt`` checkpoints, and check trace, transform, decode and ``model.predict`` parity through
``export/verify_tasks.py``, each on the served pipeline of the exported pair. The figures are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from export.depth import DepthPostprocess, median
from export.rtdetr import RTDETRPostprocess
from export.semantic import SemanticPostprocess, class_map_dtype
from handler.contract import SEMANTIC_IGNORE as IGNORE
from handler.encoding.dense import (
    DenseTooLarge,
    b64,
    decode_class_map_png,
    decode_depth_png16,
    decode_float32,
    depth_step,
    encode_class_map_png,
    encode_depth_png16,
    encode_float32,
)
from handler.image.letterbox import letterbox
from handler.image.stretch import stretch, stretch_params
from tiers import slow_fixture


def _script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        return torch.jit.script(module)


def _predictor(cls, names: dict, imgsz, path: str = "image.jpg", **overrides):
    p = cls(overrides={"verbose": False, "save": False, **overrides})
    p.model = SimpleNamespace(names=names, stride=32, format="pt", fp16=False)
    p.imgsz = imgsz
    p.batch = ([path], None, None)
    return p


# ---------------------------------------------------------------- stretch transform (fast)

STRETCH_SIZES = [(1080, 810), (720, 1280), (640, 640), (1, 3000), (3000, 1), (479, 641), (17, 23)]


@pytest.mark.parametrize("orig_hw", STRETCH_SIZES)
@pytest.mark.parametrize("imgsz", [640, [480, 640]])
def test_stretch_is_ultralytics_scale_fill(orig_hw, imgsz):
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(orig_hw[0] * 7 + orig_hw[1])
    image = rng.integers(0, 256, (*orig_hw, 3), dtype=np.uint8)
    ours, params = stretch(image, imgsz)
    th, tw = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    ref = LetterBox((th, tw), auto=False, scale_fill=True, stride=32)(image=image.copy())
    assert ours.shape == ref.shape == (th, tw, 3)
    assert np.array_equal(ours, ref)
    assert (params.pad_left, params.pad_top, params.input_h, params.input_w) == (0, 0, th, tw)
    assert params.as_row() == [0.0, 0.0, tw / orig_hw[1], th / orig_hw[0], float(orig_hw[1]), float(orig_hw[0])]


def test_stretch_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        stretch(np.zeros((4, 4), np.uint8), 640)
    with pytest.raises(ValueError, match="at least 1x1"):
        stretch_params((0, 5), 640)


# ---------------------------------------------------------------- semantic postprocessor (fast)

# original sizes and letterbox modes: photos, thin images, odd paddings, an image already at input size, and
# 100x399 and 100x1972, where the predictor's scale_masks, re-deriving the crop from the shapes, cuts 1 and 4
# columns more than the letterbox padded (export/semantic.py follows Ultralytics there)
SEMANTIC_CASES = [((1080, 810), "rect"), ((720, 1280), "rect"), ((640, 480), "rect"), ((999, 1000), "rect"),
                  ((37, 1500), "rect"), ((720, 1280), "square"), ((333, 517), "square"), ((100, 399), "rect"),
                  ((100, 1972), "rect")]


def _semantic_reference(logits: torch.Tensor, x_hw, orig_hw, nc: int, classes=None) -> np.ndarray:
    from ultralytics.models.yolo.semantic import SemanticSegmentationPredictor

    p = _predictor(SemanticSegmentationPredictor, {i: str(i) for i in range(nc)}, list(x_hw), classes=classes)
    img = torch.zeros(1, 3, *x_hw)
    return p.postprocess(logits, img, [np.zeros((*orig_hw, 3), np.uint8)])[0].semantic_mask.data.numpy()


def _semantic_inputs(orig_hw, mode, nc, seed):
    params = letterbox_params_of(orig_hw, mode)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, nc, params.input_h // 8, params.input_w // 8, generator=g) * 3
    return params, logits


def letterbox_params_of(orig_hw, mode):
    return letterbox(np.zeros((*orig_hw, 3), np.uint8), 640, 32, mode)[1]


@pytest.mark.parametrize("orig_hw,mode", SEMANTIC_CASES)
def test_semantic_postprocess_equals_predictor(orig_hw, mode):
    nc = 19
    params, logits = _semantic_inputs(orig_hw, mode, nc, orig_hw[0] + orig_hw[1])
    post = _script(SemanticPostprocess(nc, chunk=4))  # chunks of 4 channels: the running max is exercised
    maps, sizes, pixels = post([logits], torch.tensor([params.as_row()]), None)
    ref = _semantic_reference(logits, (params.input_h, params.input_w), orig_hw, nc)
    ours = maps[0, : orig_hw[0], : orig_hw[1]].numpy()
    assert sizes.tolist() == [list(orig_hw)]
    assert maps.dtype == torch.uint8 and ref.dtype == np.uint8
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{(ours != ref).mean():.4%} of pixels differ"
    assert pixels[0].tolist() == np.bincount(ref.ravel(), minlength=nc).tolist()


@pytest.mark.parametrize("orig_hw", [(100, 399), (100, 1972)])
def test_semantic_edge_cases_are_real(orig_hw):
    """The two edge cases of SEMANTIC_CASES do exercise a crop other than the letterbox's own placement."""
    from export.semantic import content_window

    p = letterbox_params_of(orig_hw, "rect")
    placed = [p.pad_top, p.pad_top + p.resized_h, p.pad_left, p.pad_left + p.resized_w]
    assert content_window([p.input_h, p.input_w], list(orig_hw)) != placed


def test_semantic_class_filter_marks_others_ignore():
    nc, orig_hw = 19, (720, 1280)
    params, logits = _semantic_inputs(orig_hw, "rect", nc, 5)
    ours_all = _script(SemanticPostprocess(nc))([logits], torch.tensor([params.as_row()]), None)[0][0]
    present = np.unique(ours_all.numpy())
    keep = [int(present[0]), int(present[len(present) // 2])]  # two classes that occur, the others dropped
    mask = torch.zeros(1, nc, dtype=torch.bool)
    mask[0, keep] = True
    maps, _, pixels = _script(SemanticPostprocess(nc))([logits], torch.tensor([params.as_row()]), mask)
    ref = _semantic_reference(logits, (params.input_h, params.input_w), orig_hw, nc, classes=keep)
    assert np.array_equal(maps[0].numpy(), ref)
    assert set(np.unique(ref)) == {*keep, IGNORE}
    assert pixels[0].tolist() == [int((ref == c).sum()) for c in range(nc)]


def test_semantic_binary_and_wide_class_maps():
    params, logits = _semantic_inputs((480, 640), "rect", 1, 1)
    maps, _, pixels = _script(SemanticPostprocess(1))([logits], torch.tensor([params.as_row()]), None)
    ref = _semantic_reference(logits, (params.input_h, params.input_w), (480, 640), 1)
    assert np.array_equal(maps[0].numpy(), ref) and set(np.unique(ref)) == {0, 1}
    assert pixels[0].tolist() == [int((ref == 0).sum()), int((ref == 1).sum())]
    nc = 300  # more classes than uint8 holds: Ultralytics' int16 map
    params, logits = _semantic_inputs((120, 200), "rect", nc, 2)
    maps, _, _ = _script(SemanticPostprocess(nc, chunk=64))([logits], torch.tensor([params.as_row()]), None)
    ref = _semantic_reference(logits, (params.input_h, params.input_w), (120, 200), nc)
    assert maps.dtype == torch.int16 == class_map_dtype(nc) and ref.dtype == np.int16
    assert np.array_equal(maps[0].numpy(), ref)
    assert ref.max() > 255  # the wide dtype is needed here


def test_semantic_batch_pads_with_ignore():
    nc = 5
    rows = [letterbox_params_of((400, 640), "square").as_row(), letterbox_params_of((640, 300), "square").as_row()]
    logits = torch.randn(2, nc, 80, 80, generator=torch.Generator().manual_seed(0))
    maps, sizes, _ = _script(SemanticPostprocess(nc))([logits], torch.tensor(rows), None)
    assert maps.shape == (2, 640, 640) and sizes.tolist() == [[400, 640], [640, 300]]
    assert bool((maps[0, 400:] == IGNORE).all()) and bool((maps[1, :, 300:] == IGNORE).all())
    alone = _script(SemanticPostprocess(nc))([logits[1:]], torch.tensor(rows[1:]), None)[0]
    assert torch.equal(alone[0], maps[1, :640, :300])  # a result does not depend on its batch


# ---------------------------------------------------------------- depth postprocessor (fast)


def _depth_reference(maps: torch.Tensor, x_hw, orig_sizes) -> list[np.ndarray]:
    from ultralytics.models.yolo.depth import DepthPredictor

    p = _predictor(DepthPredictor, {0: "depth"}, list(x_hw))
    p.batch = ([f"{i}.jpg" for i in range(len(orig_sizes))], None, None)
    img = torch.zeros(len(orig_sizes), 3, *x_hw)
    results = p.postprocess(maps, img, [np.zeros((*hw, 3), np.uint8) for hw in orig_sizes])
    return [r.depth.data.numpy() for r in results]


@pytest.mark.parametrize("x_hw", [(640, 640), (480, 640)])
def test_depth_postprocess_equals_predictor(x_hw):
    orig = [(1080, 810), (720, 1280), (17, 3000)]
    g = torch.Generator().manual_seed(x_hw[0])
    maps = torch.exp(torch.randn(len(orig), 1, x_hw[0] // 4, x_hw[1] // 4, generator=g))  # metres, > 0
    rows = [stretch_params(hw, list(x_hw)).as_row() for hw in orig]
    depth, sizes, stats = _script(DepthPostprocess())([maps], torch.tensor(rows))
    assert depth.dtype == torch.float32 and depth.shape == (3, 1080, 3000)
    assert sizes.tolist() == [list(hw) for hw in orig]
    for b, (ref, hw) in enumerate(zip(_depth_reference(maps, x_hw, orig), orig)):
        ours = depth[b, : hw[0], : hw[1]].numpy()
        rel = np.abs(ours.astype(np.float64) - ref) / ref
        assert np.percentile(rel, 99) <= 1e-6, f"p99 relative error {np.percentile(rel, 99):.2e}"
        assert float(depth[b, hw[0]:].abs().sum() + depth[b, :, hw[1]:].abs().sum()) == 0.0  # zero padding
        np.testing.assert_allclose(stats[b].numpy(), [ref.min(), ref.max(), ref.mean(), np.median(ref)], rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_depth_median_is_numpy_median(n):
    v = torch.rand(n, generator=torch.Generator().manual_seed(n))
    assert float(_script_median()(v)) == pytest.approx(float(np.median(v.numpy())), abs=1e-7)


def _script_median():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        return torch.jit.script(median)


# ---------------------------------------------------------------- RT-DETR postprocessor (fast)


def _rtdetr_reference(queries: torch.Tensor, orig_sizes, nc: int, conf: float, max_det: int, classes=None) -> list[np.ndarray]:
    """RTDETRDecoder.postprocess (eval) then RTDETRPredictor.postprocess, Ultralytics' own code."""
    from ultralytics.models.rtdetr import RTDETRPredictor
    from ultralytics.nn.modules.head import RTDETRDecoder

    head = SimpleNamespace(num_queries=queries.shape[1], nc=nc, export=False, dynamic=False, max_det=300, format=None)
    preds = RTDETRDecoder.postprocess(head, queries[..., :4], queries[..., 4:])
    p = _predictor(RTDETRPredictor, {i: str(i) for i in range(nc)}, [640, 640], conf=conf, max_det=max_det, classes=classes)
    p.batch = ([f"{i}.jpg" for i in range(len(orig_sizes))], None, None)
    results = p.postprocess(preds, torch.zeros(len(orig_sizes), 3, 640, 640), [np.zeros((*hw, 3), np.uint8) for hw in orig_sizes])
    return [torch.cat((r.boxes.xyxy, r.boxes.conf[:, None], r.boxes.cls[:, None]), 1).numpy() for r in results]


@pytest.mark.parametrize("conf,max_det,classes", [(0.25, 300, None), (0.5, 7, None), (0.1, 300, [0, 3]), (0.99, 300, None)])
def test_rtdetr_postprocess_equals_predictor(conf, max_det, classes):
    nc, orig = 5, [(1080, 810), (720, 1280)]
    g = torch.Generator().manual_seed(int(conf * 100) + max_det)
    queries = torch.cat((torch.rand(2, 300, 4, generator=g), torch.rand(2, 300, nc, generator=g)), -1)
    rows = [stretch_params(hw, 640).as_row() for hw in orig]
    class_mask = None
    if classes is not None:
        class_mask = torch.zeros(2, nc, dtype=torch.bool)
        class_mask[:, classes] = True
    post = _script(RTDETRPostprocess(nc, 300))
    dets, counts, masks = post([queries], torch.tensor(rows), torch.full((2,), conf), torch.full((2,), 0.7),
                               torch.full((2,), max_det), class_mask, False)
    assert masks.shape == (2, 0, 0, 0) and dets.shape == (2, max_det, 6)
    for b, ref in enumerate(_rtdetr_reference(queries, orig, nc, conf, max_det, classes)):
        n = int(counts[b])
        assert n == len(ref)
        assert np.array_equal(dets[b, :n].numpy(), ref)  # same rows, same order, bit for bit
        assert float(dets[b, n:].abs().sum()) == 0.0


# ---------------------------------------------------------------- encodings (fast)


def test_depth_png16_round_trip_through_pil():
    import io

    from PIL import Image

    depth = np.exp(np.random.default_rng(0).normal(size=(37, 53))).astype(np.float32)
    png, lo, hi = encode_depth_png16(depth)
    pil = np.array(Image.open(io.BytesIO(png)))
    assert pil.dtype == np.uint16 and pil.shape == depth.shape and pil.min() == 0 and pil.max() == 65535
    decoded = lo + (hi - lo) * pil.astype(np.float64) / 65535  # the formula the response documents
    assert np.abs(decoded - depth).max() <= depth_step(lo, hi) / 2 + 1e-6
    assert np.array_equal(decode_depth_png16(png, lo, hi), decoded.astype(np.float32))
    flat, lo2, hi2 = encode_depth_png16(np.full((3, 4), 2.5, np.float32))
    assert (lo2, hi2) == (2.5, 2.5) and np.array_equal(decode_depth_png16(flat, lo2, hi2), np.full((3, 4), 2.5, np.float32))


def test_float32_round_trip_and_limit():
    import base64

    depth = np.random.default_rng(1).random((5, 7)).astype(np.float32)
    raw = encode_float32(depth)
    assert raw == depth.astype("<f4").tobytes() and len(raw) == 4 * 35
    assert np.array_equal(decode_float32(base64.b64decode(b64(raw)), 5, 7), depth)
    assert len(b64(raw)) == 188
    with pytest.raises(DenseTooLarge, match="use encoding=png16"):
        encode_float32(depth, max_b64_chars=187)


@pytest.mark.parametrize("dtype,high", [(np.uint8, 19), (np.int16, 300)])
def test_class_map_png_round_trip_through_pil(dtype, high):
    import io

    from PIL import Image

    cmap = np.random.default_rng(2).integers(0, high, (41, 29)).astype(dtype)
    cmap[0, 0] = IGNORE
    png = encode_class_map_png(cmap)
    pil = np.array(Image.open(io.BytesIO(png)))
    assert pil.dtype == (np.uint8 if dtype == np.uint8 else np.uint16)
    assert np.array_equal(pil.astype(np.int64), cmap.astype(np.int64))
    assert np.array_equal(decode_class_map_png(png).astype(np.int64), cmap.astype(np.int64))


def test_class_rle_round_trips_through_pycocotools():
    from pycocotools import mask as coco

    from handler.encoding.masks import encode_rle

    cmap = np.random.default_rng(3).integers(0, 4, (23, 31)).astype(np.uint8)
    for c in range(4):
        rle = encode_rle(cmap == c)
        assert np.array_equal(coco.decode({"size": rle["size"], "counts": rle["counts"].encode()}), (cmap == c).astype(np.uint8))


def test_new_postprocessors_script_and_run_on_an_empty_batch():
    geometry = torch.zeros(0, 6)
    assert _script(SemanticPostprocess(3))([torch.zeros(0, 3, 8, 8)], geometry, None)[0].shape == (0, 0, 0)
    assert _script(DepthPostprocess())([torch.zeros(0, 1, 16, 16)], geometry)[0].shape == (0, 0, 0)
    out = _script(RTDETRPostprocess(3, 300))([torch.zeros(0, 300, 7)], geometry, torch.zeros(0), torch.zeros(0),
                                             torch.zeros(0, dtype=torch.long), None, False)
    assert out[0].shape == (0, 1, 6) and out[1].shape == (0,)


# ---------------------------------------------------------------- model builds (slow)

FAMILIES = {"semantic": "yolo26n-sem.yaml", "depth": "yolo26n-depth.yaml", "rtdetr": "rtdetr-l.yaml"}
SEED = 0


def _widen_outputs(yolo, task: str, sample: np.ndarray, seed: int = SEED) -> None:
    """Re-draw the output layers of a fresh seeded model so that its outputs vary like a trained model's:
    semantic logits and depth log-values with a standard deviation of about 1.5 and 0.7 on ``sample``
    (the layer is rescaled to that; depth centred on 3 m), RT-DETR score and box layers with std 0.05 weights."""
    from handler.image.letterbox_torch import to_network_input

    head = yolo.model.model[-1]
    g = torch.Generator().manual_seed(seed)
    if task == "rtdetr":
        with torch.no_grad():
            for layer in [head.enc_score_head, *head.dec_score_head]:
                layer.weight.normal_(0, 0.05, generator=g)
            for mlp in [head.enc_bbox_head, *head.dec_bbox_head]:
                mlp.layers[-1].weight.normal_(0, 0.05, generator=g)
        return
    conv, target = (head.classifier[-1], 1.5) if task == "semantic" else (head.head[-1], 0.7)
    seen = {}
    hook = conv.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    yolo.model.eval()
    x = to_network_input(torch.from_numpy(letterbox(sample, 640, 32, "rect")[0])[None])
    with torch.no_grad():
        conv.weight.normal_(0, 1.0, generator=g)
        yolo.model(x)
        raw = seen["out"] - conv.bias.view(1, -1, 1, 1)  # [1, c, h, w] without the bias
        conv.weight.mul_(target / float(raw.std()))
        if task == "depth":  # log-depth around log(3 m), inside the head's clamp to [-4, 5]
            conv.bias.fill_(1.1 - float(raw.mean()) * target / float(raw.std()))
    hook.remove()


def _save_fp32(yolo, path: Path) -> None:
    """``yolo.save(path)`` without its cast to fp16 (which would overflow the widened layers): the same
    checkpoint dict, which Ultralytics loads back with ``YOLO(path)`` / ``RTDETR(path)``."""
    from copy import deepcopy

    import ultralytics

    torch.save({**yolo.ckpt, "ema": None, "model": deepcopy(yolo.model).float(), "version": ultralytics.__version__}, str(path))


@slow_fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, tmp_path_factory, sample_images):
    """(LoadedModel, the served pipeline of its traced backbone and scripted postprocessor) of a widened seeded
    model saved as a .pt."""
    from export.backbone import trace_backbone
    from export.checkpoint import _resolve_source, build_yolo
    from export.metadata import build_metadata
    from export.tasks import export_task, load_model, raw_network
    from handler.image.decode import decode_image
    from handler.pipeline import YoloPipeline

    task, yaml = request.param, FAMILIES[request.param]
    yolo = build_yolo(yaml, _resolve_source(yaml), SEED)
    _widen_outputs(yolo, task, decode_image(sample_images[0].read_bytes()))
    pt = tmp_path_factory.mktemp(task) / f"{Path(yaml).stem}-widened.pt"
    _save_fp32(yolo, pt)
    loaded = load_model(str(pt))
    assert loaded.task == task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_backbone(raw_network(loaded), (640, 640))
    post = _script(export_task(loaded).postprocessor(loaded))
    return loaded, YoloPipeline(traced, post, build_metadata(loaded, "yolo", [640, 640], "rect"))


@pytest.mark.slow
def test_rtdetr_yaml_loads_as_rtdetr():
    from ultralytics import RTDETR

    from export.checkpoint import _resolve_source, build_yolo
    from export.tasks import load_model

    loaded = load_model("rtdetr-l.yaml")
    assert (loaded.task, loaded.head_type, loaded.num_queries, loaded.nc) == ("rtdetr", "RTDETRDecoder", 300, 80)
    assert isinstance(build_yolo("rtdetr-l.yaml", _resolve_source("rtdetr-l.yaml"), 0), RTDETR)
    for yaml, task, head in [("yolo26n-sem.yaml", "semantic", "SemanticSegment"), ("yolo26n-depth.yaml", "depth", "Depth")]:
        m = load_model(yaml)
        assert (m.task, m.head_type, m.max_stride) == (task, head, 32)


@pytest.mark.slow
def test_rtdetr_checkpoint_loads_with_its_own_predictor(family):
    from ultralytics import RTDETR

    from export.checkpoint import build_yolo

    loaded = family[0]
    if loaded.task != "rtdetr":
        pytest.skip("RT-DETR only")
    assert isinstance(build_yolo(loaded.source, loaded.path, loaded.seed), RTDETR)  # a .pt, not only a YAML


@pytest.mark.slow
def test_trace_runs_at_other_input_sizes(family):
    """Traced at 640x640; run at 480x640, 640x480 and a batch of 2 at 320x320: equal to the eager network.
    For RT-DETR this holds only because RTDETRQueries clears the head's anchor cache (see the next test)."""
    from export import verify

    from export.tasks import raw_network

    loaded, pipeline = family
    diff = verify.check_trace(raw_network(loaded), pipeline.backbone, [(1, 640, 640), (1, 480, 640), (1, 640, 480), (2, 320, 320)])
    print(f"\n{loaded.task}: trace at 640x640 vs eager at 640x640, 480x640, 640x480, 2x320x320: max abs diff {diff:.2e}")


@pytest.mark.slow
def test_rtdetr_trace_with_a_warm_anchor_cache_still_generalises(family):
    """The head caches anchors per feature size; eager calls at the trace size before tracing must not bake
    them into the trace."""
    from export import verify
    from export.backbone import trace_backbone
    from export.tasks import raw_network

    loaded = family[0]
    if loaded.task != "rtdetr":
        pytest.skip("RT-DETR only")
    with torch.no_grad():
        raw_network(loaded)(torch.rand(1, 3, 640, 640))  # warms head.shapes / head.anchors at 640x640
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_backbone(raw_network(loaded), (640, 640))
    verify.check_trace(raw_network(loaded), traced, [(1, 480, 640)])  # raises above TRACE_TOL


def _checks(loaded):
    from export.tasks import export_task

    return export_task(loaded).checks


@pytest.mark.slow
def test_transform_equals_predictor_pre_transform(family, sample_images):
    from handler.image.decode import decode_image

    loaded, pipeline = family
    for path in sample_images:
        hw = _checks(loaded).transform(loaded, pipeline, decode_image(path.read_bytes()))
        assert hw == pipeline.transform(decode_image(path.read_bytes()))[0].shape[:2]
        print(f"\n{loaded.task} {path.name}: transform pixel-equal to Ultralytics' pre_transform at {hw}")


def _meets_tolerance(task: str, figure: float) -> bool:
    """A decode or predict figure within its tolerance, and not empty (RT-DETR: detections were compared)."""
    from export.verify_tasks import DEPTH_P99_REL, SEMANTIC_SHARE

    return {"semantic": figure >= SEMANTIC_SHARE, "depth": 0 <= figure <= DEPTH_P99_REL, "rtdetr": figure > 0}[task]


@pytest.mark.slow
def test_decode_equals_predictor_postprocess(family, sample_images):
    loaded, pipeline = family
    for path in sample_images:
        figure = _checks(loaded).decode(loaded, pipeline, path)
        print(f"\n{loaded.task} decode {path.name}: {_checks(loaded).figure(figure)}")
        assert _meets_tolerance(loaded.task, figure), figure


def _wrong(pipeline, task: str):
    """The pipeline with a postprocessor that is wrong: semantic maps with every class id one off, depth 1 % deeper,
    RT-DETR boxes 3 px to the right."""
    from copy import copy

    post, wrong = pipeline.postprocess, copy(pipeline)

    def postprocess(feats, geometry, *options):
        a, b, c = post(feats, geometry, *options)
        if task == "semantic":
            return torch.where(a == IGNORE, a, (a.long() + 1) % pipeline.nc).to(a.dtype), b, c
        if task == "depth":
            return a * 1.01, b, c
        a = a.clone()
        a[..., [0, 2]] += 3
        return a, b, c

    wrong.postprocess = postprocess
    return wrong


@pytest.mark.slow
def test_the_checks_see_a_wrong_postprocessor(family, sample_images):
    """What the decode and predict checks are for: a wrong postprocessor fails both."""
    from export.verify import VerificationError

    loaded, pipeline = family
    wrong = _wrong(pipeline, loaded.task)
    for check in (_checks(loaded).decode, _checks(loaded).predict):
        with pytest.raises(VerificationError):
            if loaded.task == "rtdetr" and check is _checks(loaded).predict:
                check(loaded, wrong, sample_images[0], conf=_rtdetr_conf(pipeline, sample_images[0]))
            else:
                check(loaded, wrong, sample_images[0])


def _rtdetr_conf(pipeline, path) -> float:
    """A threshold that lets about 100 of the widened model's (query, class) pairs through (its random scores
    stay below 0.1, under predict's default 0.25)."""
    from export.verify_tasks import low_query_threshold, served_input

    _, _, x = served_input(pipeline, path)
    with torch.no_grad():
        return low_query_threshold(pipeline.backbone(x)[0], pipeline.nc)


@pytest.mark.slow
def test_decode_with_a_class_filter(family, sample_images):
    from export.verify_tasks import low_query_threshold, served_input

    loaded, pipeline = family
    if loaded.task == "depth":
        pytest.skip("depth models have no classes")
    path = sample_images[1]
    _, item, x = served_input(pipeline, path)
    geometry = torch.tensor([item.params.as_row()])
    with torch.no_grad():
        feats = list(pipeline.backbone(x))
        if loaded.task == "semantic":
            present = np.unique(pipeline.postprocess(feats, geometry, None)[0].numpy())
        else:
            conf = low_query_threshold(feats[0], loaded.nc)
            dets, counts, _ = pipeline.postprocess(feats, geometry, torch.tensor([conf]), torch.tensor([0.7]),
                                                   torch.tensor([300]), None, False)
            present = np.unique(dets[0, : int(counts[0]), 5].numpy().astype(int))
    assert len(present) >= 2, f"the widened model predicts only {present}"
    classes = [int(present[0]), int(present[-1])]
    figure = _checks(loaded).decode(loaded, pipeline, path, classes=classes)
    print(f"\n{loaded.task} decode {path.name} classes={classes}: {_checks(loaded).figure(figure)}")
    assert _meets_tolerance(loaded.task, figure), figure


@pytest.mark.slow
def test_pipeline_equals_model_predict(family, sample_images):
    loaded, pipeline = family
    for path in sample_images:
        if loaded.task == "rtdetr":
            figure = _checks(loaded).predict(loaded, pipeline, path, conf=_rtdetr_conf(pipeline, path))
        else:
            figure = _checks(loaded).predict(loaded, pipeline, path)
        print(f"\n{loaded.task} predict {path.name}: {_checks(loaded).figure(figure)}")
        assert _meets_tolerance(loaded.task, figure), f"{figure}: nothing compared, or out of tolerance"


@pytest.mark.slow
def test_depth_png16_within_one_step_of_the_float_map(family, sample_images):
    from export.verify_tasks import served_input

    loaded, pipeline = family
    if loaded.task != "depth":
        pytest.skip("depth only")
    _, item, x = served_input(pipeline, sample_images[0])
    with torch.no_grad():
        depth, sizes, stats = pipeline.postprocess(list(pipeline.backbone(x)), torch.tensor([item.params.as_row()]))
    d = depth[0, : int(sizes[0, 0]), : int(sizes[0, 1])].numpy()
    png, lo, hi = encode_depth_png16(d)
    err = np.abs(decode_depth_png16(png, lo, hi) - d).max()
    assert (lo, hi) == (float(stats[0, 0]), float(stats[0, 1]))
    assert err <= depth_step(lo, hi)
    print(f"\ndepth png16: {len(png)} bytes for {d.shape[1]}x{d.shape[0]}, range {lo:.3f}-{hi:.3f} m, "
          f"max error {err:.2e} m (step {depth_step(lo, hi):.2e})")


# ---------------------------------------------------------------- P2 / P6 exports (slow)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["yolo26n-p6.yaml", "yolo26n-p2.yaml"])
def test_p2_p6_export_passes_the_checks(weights, tmp_path):
    from export.exporter import export_model

    # check=True: trace, decode and predict checks against Ultralytics; raises VerificationError on a mismatch
    result = export_model(weights, tmp_path, None, log=lambda _: None)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    strides = [int(s) for s in result.loaded.strides]
    if weights == "yolo26n-p6.yaml":
        assert max(strides) == 64 and meta["max_stride"] == 64 and meta["imgsz"][0] % 64 == 0
    else:
        assert min(strides) == 4
    assert meta["stride"] == result.loaded.strides
