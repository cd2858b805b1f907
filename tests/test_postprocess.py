"""The scripted postprocessor's math against plain references and against Ultralytics' own code."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from export import postprocess as pp

PUBLIC_FUNCTIONS = [
    pp.make_anchors,
    pp.gather_levels,
    pp.dfl_distances,
    pp.decode_boxes,
    pp.decode_keypoints,
    pp.box_iou_one,
    pp.nms,
    pp.nms_candidates,
    pp.select_nms,
    pp.select_topk,
    pp.unletterbox_points,
    pp.decode_rboxes,
    pp.rbox_covariance,
    pp.batch_probiou,
    pp.nms_rotated,
    pp.nms_rotated_classes,
    pp.select_nms_rotated,
    pp.rbox_corners,
    pp.unletterbox_rboxes,
    pp.crop_to_boxes,
    pp.input_masks,
    pp.unletterbox_masks,
]


def _script(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(fn)


@pytest.mark.parametrize("fn", PUBLIC_FUNCTIONS, ids=lambda f: f.__name__)
def test_every_public_function_scripts(fn):
    assert isinstance(_script(fn), torch.jit.ScriptFunction)


def reference_nms(boxes, scores, classes, thr, agnostic=False):
    """Slow, readable greedy NMS: visit boxes by descending score, keep one unless it overlaps a kept
    box of the same class by IoU > thr."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            if not agnostic and int(classes[i]) != int(classes[j]):
                continue
            if float(pp.box_iou_one(boxes[j], boxes[i : i + 1])[0]) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def _random_boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    scores = torch.rand(n, generator=g)
    classes = torch.randint(0, 3, (n,), generator=g)
    return torch.cat((xy, xy + wh), 1), scores, classes


@pytest.mark.parametrize("seed,thr,agnostic", list(itertools.product([0, 1, 2], [0.3, 0.5, 0.7], [False, True])))
def test_nms_matches_slow_reference(seed, thr, agnostic):
    boxes, scores, classes = _random_boxes(200, seed)
    nms = _script(pp.nms)
    keep = nms(boxes, scores, classes, thr, 10_000, agnostic).tolist()
    assert keep == reference_nms(boxes, scores, classes, thr, agnostic)
    assert len(keep) > 1


def test_nms_matches_torchvision_batched_nms():
    torchvision = pytest.importorskip("torchvision")
    for seed in range(5):
        boxes, scores, classes = _random_boxes(500, seed)
        ours = pp.nms(boxes, scores, classes, 0.45, 10_000, False)
        theirs = torchvision.ops.batched_nms(boxes, scores, classes, 0.45)
        assert ours.tolist() == theirs.tolist()


def test_nms_iou_exactly_at_threshold_is_kept():
    # two 10x10 boxes overlapping by 5x10: IoU = 50 / 150 = 1/3 exactly representable? use 0.5 instead:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 5.0]])  # inside a: IoU = 50 / 100 = 0.5 exactly
    boxes = torch.cat((a, b))
    scores = torch.tensor([0.9, 0.8])
    classes = torch.zeros(2, dtype=torch.long)
    assert float(pp.box_iou_one(boxes[0], boxes[1:])[0]) == 0.5
    assert pp.nms(boxes, scores, classes, 0.5, 100, False).tolist() == [0, 1]  # not > 0.5: both kept
    assert pp.nms(boxes, scores, classes, 0.4999, 100, False).tolist() == [0]  # > threshold: suppressed
    assert reference_nms(boxes, scores, classes, 0.5) == [0, 1]


def test_nms_other_class_is_not_suppressed_unless_agnostic():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8])
    classes = torch.tensor([0, 1])
    assert pp.nms(boxes, scores, classes, 0.7, 100, False).tolist() == [0, 1]
    assert pp.nms(boxes, scores, classes, 0.7, 100, True).tolist() == [0]


def test_nms_empty_and_max_keep():
    empty = pp.nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5, 10, False)
    assert empty.dtype == torch.long and empty.numel() == 0
    boxes, scores, classes = _random_boxes(100, 3)
    full = pp.nms(boxes, scores, classes, 0.5, 10_000, False)
    assert pp.nms(boxes, scores, classes, 0.5, 3, False).tolist() == full[:3].tolist()


def test_nms_fp16_boxes_match_reference():
    boxes, scores, classes = _random_boxes(100, 4)
    boxes, scores = boxes.half().float(), scores.half().float()  # fp16 head output, decoded in fp32
    assert pp.nms(boxes, scores, classes, 0.5, 1000, False).tolist() == reference_nms(boxes, scores, classes, 0.5)


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("max_det", [5, 300, 400])
def test_topk_matches_ultralytics_head(agnostic, max_det):
    from ultralytics.nn.modules.head import Detect

    g = torch.Generator().manual_seed(max_det)
    scores = torch.rand(1, 2000, 80, generator=g)
    head = Detect(nc=80, ch=(16,))
    head.agnostic_nms = agnostic
    k = min(max(max_det, 300), 2000)
    ref_scores, ref_cls, ref_idx = head.get_topk_index(scores, k)
    index, score, cls = pp.select_topk(scores[0], 0.0, k, None, agnostic)
    assert index.tolist() == ref_idx[0].tolist()
    assert torch.equal(score, ref_scores[0, :, 0])
    assert cls.tolist() == ref_cls[0, :, 0].long().tolist()
    # conf, class filter and max_det apply after the top-k, in order
    mask = torch.zeros(80, dtype=torch.bool)
    mask[[1, 5]] = True
    i2, s2, c2 = pp.select_topk(scores[0], 0.5, max_det, mask, agnostic)
    want = [(i, c) for i, s, c in zip(index.tolist(), score.tolist(), cls.tolist()) if s > 0.5 and c in (1, 5)]
    assert list(zip(i2.tolist(), c2.tolist())) == want[:max_det]


def test_dfl_and_box_decode_match_ultralytics():
    from ultralytics.nn.modules.block import DFL
    from ultralytics.utils.tal import dist2bbox, make_anchors

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 64, 8, 12, generator=g), torch.randn(2, 64, 4, 6, generator=g)]
    anchors, stride = pp.make_anchors(feats, [8.0, 16.0])
    ref_anchors, ref_stride = make_anchors(feats, torch.tensor([8.0, 16.0]), 0.5)
    assert torch.equal(anchors, ref_anchors) and torch.equal(stride, ref_stride)
    raw = torch.cat([f.flatten(2) for f in feats], 2)  # [2, 64, A]
    ours = pp.decode_boxes(pp.dfl_distances(raw, 16), anchors, stride)
    ref = dist2bbox(DFL(16)(raw), ref_anchors.transpose(0, 1).unsqueeze(0), xywh=False, dim=1) * ref_stride.T
    assert torch.allclose(ours, ref.permute(0, 2, 1), atol=1e-4)


@pytest.mark.parametrize("pose26", [False, True])
def test_keypoint_decode_matches_ultralytics_heads(pose26):
    from ultralytics.nn.modules.head import Pose, Pose26

    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, 8, 6, 4, generator=g), torch.randn(1, 8, 3, 2, generator=g)]
    anchors, stride = pp.make_anchors(feats, [8.0, 16.0])
    head = (Pose26 if pose26 else Pose)(nc=1, kpt_shape=(17, 3), ch=(16, 16))
    head.anchors, head.strides = anchors.T, stride.T
    raw = torch.randn(1, 51, anchors.shape[0], generator=g)
    ref = head.kpts_decode(raw.clone())  # [1, 51, A]
    ours = pp.decode_keypoints(raw, anchors, stride, 3, pose26)  # [1, A, 17, 3]
    assert torch.allclose(ours.reshape(1, -1, 51).permute(0, 2, 1), ref, atol=1e-5)


def _module(end2end=False, kpt=(0, 0), decode=pp.KPT_DECODE_NONE, nc=3, reg_max=16):
    return _script(pp.YoloPostprocess(nc, reg_max, [8.0, 16.0, 32.0], end2end, kpt, decode))


def _feats(b, h, w, no, fill=None):
    out = [torch.randn(b, no, h // s, w // s) for s in (8, 16, 32)]
    if fill is not None:
        for o in out:
            o.fill_(fill)
    return out


@pytest.mark.parametrize("end2end", [False, True])
def test_no_detections_gives_zero_padding_and_zero_counts(end2end):
    m = _module(end2end)
    feats = _feats(2, 64, 96, 64 + 3, fill=-20.0)  # every class logit -20: sigmoid ~2e-9
    geometry = torch.tensor([[0.0, 0.0, 1.0, 1.0, 96.0, 64.0]] * 2)
    dets, counts, _ = m(feats, geometry, torch.tensor([0.25, 0.25]), torch.tensor([0.7, 0.7]), torch.tensor([7, 3]))
    assert dets.shape == (2, 7, 6) and dets.dtype == torch.float32
    assert counts.tolist() == [0, 0]
    assert not dets.any()


def test_output_shape_counts_and_inverse_letterbox():
    m = _module(kpt=(17, 3), decode=pp.KPT_DECODE_POSE, nc=1)
    torch.manual_seed(0)
    feats = _feats(2, 64, 96, 64 + 1 + 51)
    # image 0: 192x128 original, scaled by 0.5, padded 0; image 1: 96x64 with 10/6 px padding
    geometry = torch.tensor([[0.0, 0.0, 0.5, 0.5, 192.0, 128.0], [10.0, 6.0, 1.0, 1.0, 76.0, 52.0]])
    dets, counts, _ = m(feats, geometry, torch.tensor([0.0, 0.0]), torch.tensor([0.7, 0.7]), torch.tensor([50, 4]))
    assert dets.shape == (2, 50, 6 + 51)
    assert counts[1] == 4 and counts[0] > 4
    for b, (w, h) in enumerate([(192, 128), (76, 52)]):
        d = dets[b, : counts[b]]
        assert (d[:, [0, 2]] >= 0).all() and (d[:, [0, 2]] <= w).all()
        assert (d[:, [1, 3]] >= 0).all() and (d[:, [1, 3]] <= h).all()
        k = d[:, 6:].view(-1, 17, 3)
        assert (k[..., 0] <= w).all() and (k[..., 1] <= h).all() and ((k[..., 2] >= 0) & (k[..., 2] <= 1)).all()
        assert (d[1:, 4] <= d[:-1, 4]).all(), "sorted by score"
        assert not dets[b, counts[b] :].any(), "zero padding after the count"


def test_per_image_thresholds_and_class_mask_are_independent():
    m = _module(nc=3)
    torch.manual_seed(1)
    one = _feats(1, 64, 64, 64 + 3)
    two = [torch.cat((f, f)) for f in one]
    geometry = torch.tensor([[0.0, 0.0, 1.0, 1.0, 64.0, 64.0]] * 2)
    mask = torch.tensor([[True, True, True], [False, True, False]])
    dets, counts, _ = m(two, geometry, torch.tensor([0.1, 0.3]), torch.tensor([0.7, 0.5]), torch.tensor([300, 300]), mask)
    alone, n, _ = m(one, geometry[:1], torch.tensor([0.1]), torch.tensor([0.7]), torch.tensor([300]))
    assert torch.equal(dets[0, : counts[0]], alone[0, : n[0]])
    rest = dets[1, : counts[1]]
    assert counts[1] > 0 and (rest[:, 5] == 1).all() and (rest[:, 4] > 0.3).all()


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('ultralytics', 'torchvision'):
                raise ImportError('blocked for this test: ' + name)
    sys.meta_path.insert(0, Block())
    """
)


def test_postprocess_pt_loads_without_ultralytics_or_torchvision(tmp_path):
    path = tmp_path / "post.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(_module(kpt=(17, 3), decode=pp.KPT_DECODE_POSE26), str(path))
    code = BLOCKER + textwrap.dedent(
        f"""
        try:
            import ultralytics
        except ImportError:
            pass
        else:
            raise SystemExit('blocker inactive')
        import torch, warnings
        warnings.simplefilter('ignore', FutureWarning)
        m = torch.jit.load({str(path)!r})
        feats = [torch.randn(1, 64 + 3 + 51, 64 // s, 64 // s) for s in (8, 16, 32)]
        d, n, _ = m(feats, torch.tensor([[0., 0., 1., 1., 64., 64.]]), torch.tensor([0.0]), torch.tensor([0.7]),
                 torch.tensor([10]))
        assert d.shape == (1, 10, 57) and int(n[0]) == 10, (d.shape, n)
        assert 'torchvision' not in sys.modules and 'ultralytics' not in sys.modules
        print('ok')
        """
    )
    done = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ---- oriented boxes -------------------------------------------------------------------------------


def _random_rboxes(n, seed, spread=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * spread
    wh = torch.rand(n, 2, generator=g) * 40 + 2
    angle = (torch.rand(n, 1, generator=g) - 0.25) * torch.pi
    return torch.cat((xy, wh, angle), 1), torch.rand(n, generator=g)


def test_probiou_matches_ultralytics():
    from ultralytics.utils.metrics import batch_probiou

    a, _ = _random_rboxes(40, 0)
    b, _ = _random_rboxes(30, 1)
    assert torch.allclose(_script(pp.batch_probiou)(a, b), batch_probiou(a, b), atol=1e-6)


def reference_fast_nms(rboxes, scores, thr):
    """Slow, readable Fast-NMS: visit boxes by descending score; drop one whose probabilistic IoU with
    any earlier box (kept or not) is > thr."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for pos, i in enumerate(order):
        earlier = order[:pos]
        if not any(float(pp.batch_probiou(rboxes[j : j + 1], rboxes[i : i + 1])[0, 0]) > thr for j in earlier):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed,thr", list(itertools.product([0, 1, 2], [0.1, 0.5, 0.7])))
def test_nms_rotated_matches_slow_reference(seed, thr):
    rboxes, scores = _random_rboxes(60, seed)
    keep = _script(pp.nms_rotated)(rboxes, scores, thr, 1000, 7)  # block of 7 rows: the blocking is exercised
    assert keep.tolist() == reference_fast_nms(rboxes, scores, thr)


def test_nms_rotated_matches_ultralytics_fast_nms():
    from ultralytics.utils.metrics import batch_probiou
    from ultralytics.utils.nms import TorchNMS

    rboxes, scores = _random_rboxes(300, 3, spread=300.0)
    ref = TorchNMS.fast_nms(rboxes, scores, 0.5, iou_func=batch_probiou)
    assert _script(pp.nms_rotated)(rboxes, scores, 0.5, 1000).tolist() == ref.tolist()
    assert _script(pp.nms_rotated)(rboxes[:0], scores[:0], 0.5, 10).shape == (0,)
    assert _script(pp.nms_rotated)(rboxes, scores, 0.5, 3).tolist() == ref[:3].tolist()


@pytest.mark.parametrize("obb26", [False, True])
def test_rotated_box_decode_matches_ultralytics_heads(obb26):
    from ultralytics.nn.modules.head import OBB, OBB26

    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(1, 8, 6, 4, generator=g), torch.randn(1, 8, 3, 2, generator=g)]
    head = (OBB26 if obb26 else OBB)(nc=2, ne=1, reg_max=16, ch=(8, 8)).eval()
    head.stride = torch.tensor([8.0, 16.0])
    with torch.no_grad():
        raw = head.forward_head(feats, **head.one2many)  # boxes, scores, angle (decoded by the head)
        ref = head._inference(raw)  # [1, 4 + nc + 1, A]: cx, cy, w, h, scores, angle
        angle_logits = torch.cat([head.cv4[i](feats[i]).flatten(2) for i in range(2)], 2)  # [1, 1, A]
    anchors, stride = pp.make_anchors(feats, [8.0, 16.0])
    angle = angle_logits[:, 0] if obb26 else (angle_logits[:, 0].sigmoid() - 0.25) * torch.pi
    ours = pp.decode_rboxes(pp.dfl_distances(raw["boxes"], 16), angle, anchors, stride)  # [1, A, 4]
    assert torch.allclose(angle, ref[:, -1], atol=1e-6)
    assert torch.allclose(ours.permute(0, 2, 1), ref[:, :4], atol=1e-3)


def test_rbox_corners_and_unletterbox_match_ultralytics():
    from ultralytics.utils import ops

    rboxes, _ = _random_rboxes(20, 4)
    assert torch.allclose(pp.rbox_corners(rboxes), ops.xywhr2xyxyxyxy(rboxes), atol=1e-5)
    geometry = torch.tensor([3.0, 7.0, 0.5, 0.48, 400.0, 300.0])  # pad_left, pad_top, gain_x, gain_y, w, h
    ref = rboxes.clone()
    ref[:, :4] = ops.scale_boxes((0, 0), ref[:, :4], (300, 400), ratio_pad=((0.48, 0.5), (3.0, 7.0)), xywh=True)
    assert torch.allclose(pp.unletterbox_rboxes(rboxes, geometry), ref, atol=1e-4)


# ---- instance masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_masks_match_ultralytics_process_and_scale_masks(seed):
    from ultralytics.utils import ops

    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(32, 40, 56, generator=g)  # input 160 x 224
    coeffs = torch.randn(6, 32, generator=g)
    xy = torch.rand(6, 2, generator=g) * torch.tensor([150.0, 110.0])
    boxes = torch.cat((xy, xy + torch.rand(6, 2, generator=g) * 60 + 5), 1)  # xyxy input pixels
    ours = _script(pp.input_masks)(protos, coeffs, boxes, [160, 224], 4)
    ref = ops.process_mask(protos, coeffs, boxes.clone(), (160, 224), upsample=True)
    assert torch.equal(ours, ref.bool())
    # the original image 420 x 300 was resized by 0.5 to 210 x 150 and padded 7 left, 5 top
    geometry = torch.tensor([7.0, 5.0, 0.5, 0.5, 420.0, 300.0])
    orig = _script(pp.unletterbox_masks)(ours, geometry, 4)
    want = ops.scale_masks(ref[None].float(), (300, 420), ratio_pad=((0.5, 0.5), (7.0, 5.0)))[0] > 0.5
    assert orig.dtype == torch.uint8 and torch.equal(orig.bool(), want)


def _seg_module(end2end=False, nc=3, nm=4):
    return _script(pp.YoloPostprocess(nc, 16, [8.0, 16.0, 32.0], end2end, nm=nm))


def test_segment_output_masks_belong_to_their_rows():
    m = _seg_module()
    torch.manual_seed(0)
    feats = _feats(2, 64, 96, 64 + 3 + 4) + [torch.randn(2, 4, 16, 24)]
    # image 0: 192x128 original scaled by 0.5; image 1: 96x64, no scaling
    geometry = torch.tensor([[0.0, 0.0, 0.5, 0.5, 192.0, 128.0], [0.0, 0.0, 1.0, 1.0, 96.0, 64.0]])
    dets, counts, masks = m(feats, geometry, torch.tensor([0.3, 0.3]), torch.tensor([0.5, 0.5]), torch.tensor([20, 5]))
    assert dets.shape == (2, 20, 6) and masks.dtype == torch.uint8
    assert masks.shape == (2, int(counts.max()), 128, 192)
    assert int(counts[1]) <= 5
    for b in range(2):
        n = int(counts[b])
        assert n > 0
        assert not masks[b, n:].any(), "rows after the count carry no mask"
        oh, ow = int(geometry[b, 5]), int(geometry[b, 4])
        assert not masks[b, :, oh:].any() and not masks[b, :, :, ow:].any(), "nothing outside the image"
        for i in range(n):
            ys, xs = torch.nonzero(masks[b, i], as_tuple=True)
            assert len(ys) > 0, "an empty mask is dropped with its detection"
            x1, y1, x2, y2 = dets[b, i, :4].tolist()
            # a mask lies within its box (up to the bilinear resize's one-pixel spill)
            assert xs.min() >= x1 - 2 and xs.max() <= x2 + 1 and ys.min() >= y1 - 2 and ys.max() <= y2 + 1


def test_non_segment_models_return_an_empty_mask_tensor():
    dets, counts, masks = _module()(_feats(1, 64, 64, 64 + 3), torch.tensor([[0.0, 0.0, 1.0, 1.0, 64.0, 64.0]]),
                                    torch.tensor([0.1]), torch.tensor([0.7]), torch.tensor([5]))
    assert masks.shape == (1, 0, 0, 0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "end2end,kpt,decode",
    [(False, (0, 0), pp.KPT_DECODE_NONE), (False, (17, 3), pp.KPT_DECODE_POSE), (True, (17, 3), pp.KPT_DECODE_POSE26)],
)
def test_forward_decodes_candidates_like_the_full_decode(end2end, kpt, decode, channels_last):
    """forward decodes only the candidates; the rows equal the full decode() of every anchor followed by
    the selection (up to last-bit rounding of the DFL softmax / sigmoid on fewer elements)."""
    torch.manual_seed(0)
    reg_max = 1 if end2end else 16
    module = pp.YoloPostprocess(3, reg_max, [8.0, 16.0, 32.0], end2end, kpt, decode)
    feats = _feats(1, 256, 320, 4 * reg_max + 3 + kpt[0] * kpt[1])
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    geometry = torch.tensor([[0.0, 32.0, 0.5, 0.5, 640.0, 384.0]])
    out, counts, _ = _script(module)(feats, geometry, torch.tensor([0.3]), torch.tensor([0.6]), torch.tensor([100]))
    boxes, scores, extra = module.decode(feats)
    if end2end:
        index, score, cls = pp.select_topk(scores[0], 0.3, 100, None, False)
    else:
        index, score, cls = pp.select_nms(boxes[0], scores[0], 0.3, 0.6, 100, None, False)
    n = int(counts[0])
    assert n == index.numel() > 0
    assert torch.equal(out[0, :n, 4], score) and torch.equal(out[0, :n, 5], cls.float())
    xyxy = pp.unletterbox_points(boxes[0][index].view(n, 2, 2), geometry[0]).view(n, 4)
    torch.testing.assert_close(out[0, :n, :4], xyxy, rtol=1e-6, atol=1e-5)
    if kpt[0]:
        kb = extra[0][index]  # [n, 17, 3]
        ref = torch.cat((pp.unletterbox_points(kb[..., :2], geometry[0]), kb[..., 2:3]), -1).view(n, -1)
        torch.testing.assert_close(out[0, :n, 6:], ref, rtol=1e-6, atol=1e-5)
