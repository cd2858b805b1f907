"""The ``handler:`` section of the archive's ``model-config.yaml``, parsed once into a frozen value.

Example (every key optional; these are the defaults)::

    handler:
      conf: 0.25              # default score threshold; a request may override it
      iou: 0.7                # default NMS IoU threshold
      max_det: 300            # default detections per image
      letterbox: rect         # rect (pad to the next stride multiple, as YOLO.predict) | square (pad to imgsz)
      imgsz: null             # int or [h, w], multiples of the model's max stride; null = the exported size
      half: false             # FP16 on CUDA; ignored with a warning on CPU
      max_image_pixels: 40000000  # larger images get HTTP 413; 0 = no limit
      warmup: 2               # forward passes at load time
      torch_threads: 0        # torch.set_num_threads; 0 = auto (on CPU: usable CPUs (affinity, cgroup quota) / maxWorkers)
      cpu_fallback: false     # a GPU worker whose CUDA is unusable serves on CPU (loud log + metric) instead of failing
      preprocess: cpu         # cpu (letterbox with OpenCV) | device (upload the decoded image, letterbox on the model's device; same pixels)
      runtime: auto           # auto | torchscript | aoti | openvino: what runs the backbone (handler/runtime/runtimes.py);
                              # auto: the export's fastest proven runtime that is installed and runs on this CPU

The ``tracking:`` section, a sibling of ``handler:`` (video streams, ``docs/tracking.md``)::

    tracking:
      enabled: true           # false: track/stream requests get 400
      max_streams: 16         # open streams per worker; one more start gets 429
      idle_seconds: 60        # a stream without a frame for this long is dropped (its next frame gets 410)
      tracker: bytetrack      # the tracker of `track=true`
      conf: 0.1               # default score threshold of a tracked frame (Ultralytics' track() default)
      bytetrack: {}           # overrides of Ultralytics' bytetrack.yaml (track_buffer: 60, ...)
      botsort: {}             # overrides of botsort.yaml (without ReID)

:meth:`HandlerConfig.from_dict` and :meth:`TrackingConfig.from_dict` raise ``ValueError`` naming the key
and what to write instead, so a bad archive fails when the worker loads, not on the first request.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from handler.contract import RUNTIME_SETTINGS
from handler.image.letterbox import LETTERBOX_MODES
from handler.tasks.detect import LIMITS, Thresholds
from handler.tracking.params import BotSortParams, ByteTrackParams, TrackerParams, tracker_name, tracker_params

_SECTION = "handler"
PREPROCESS_MODES: tuple[str, ...] = ("cpu", "device")  # where the transform runs (handler/pipeline.py)
_TRACKING = "tracking"


def _where(key: str, section: str = _SECTION) -> str:
    return f"model-config.yaml {section}.{key}"


def _number(key: str, value: Any, lo: float, hi: float, example: str, section: str = _SECTION) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{_where(key, section)} must be a number from {lo} to {hi}, got {value!r}; write e.g. `{key}: {example}`")
    return float(value)


def _integer(key: str, value: Any, lo: int, hi: int, example: str, section: str = _SECTION) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{_where(key, section)} must be an integer from {lo} to {hi}, got {value!r}; write e.g. `{key}: {example}`")
    return value


def _settings(section: Any, cls: type, name: str) -> dict:
    """The ``name:`` mapping of model-config.yaml (None: no settings) whose keys are the fields of ``cls``; an
    unknown key is an error, since a typo would otherwise be ignored without a word."""
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ValueError(f"model-config.yaml `{name}:` must be a mapping of settings, got {type(section).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in model-config.yaml `{name}:`; the settings are {known}")
    return section


def _imgsz(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{_where('imgsz')} must be a positive integer or [h, w], got {value!r}; write e.g. `imgsz: 640` or `imgsz: [480, 640]`")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class HandlerConfig:
    conf: float = Thresholds.conf  # the defaults of a request; its limits are handler/tasks/detect.py LIMITS
    iou: float = Thresholds.iou
    max_det: int = Thresholds.max_det
    letterbox: str | None = None  # None: the exported default (metadata["letterbox"])
    imgsz: tuple[int, int] | None = None  # (h, w); None: the exported size (metadata["imgsz"])
    half: bool = False
    max_image_pixels: int = 40_000_000
    warmup: int = 2
    torch_threads: int = 0  # 0: auto, see handler/runtime/device.py set_threads
    cpu_fallback: bool = False  # see yolo_handler.YoloHandler.initialize
    preprocess: str = "cpu"  # one of PREPROCESS_MODES
    runtime: str = "auto"  # one of RUNTIME_SETTINGS

    @classmethod
    def from_dict(cls, section: dict | None) -> "HandlerConfig":
        """Validate the ``handler:`` mapping; unknown keys are an error (a typo would be silently ignored)."""
        get, d = _settings(section, cls, _SECTION).get, cls()
        letterbox = get("letterbox", d.letterbox)
        if letterbox is not None and letterbox not in LETTERBOX_MODES:
            raise ValueError(f"{_where('letterbox')} must be one of {list(LETTERBOX_MODES)}, got {letterbox!r}; write e.g. `letterbox: rect`")
        half, cpu_fallback = get("half", d.half), get("cpu_fallback", d.cpu_fallback)
        preprocess = get("preprocess", d.preprocess)
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"{_where('preprocess')} must be one of {list(PREPROCESS_MODES)}, got {preprocess!r}; write e.g. `preprocess: cpu`")
        runtime = get("runtime", d.runtime)
        if runtime not in RUNTIME_SETTINGS:
            raise ValueError(f"{_where('runtime')} must be one of {list(RUNTIME_SETTINGS)}, got {runtime!r}; write e.g. `runtime: auto`")
        for key, value in (("half", half), ("cpu_fallback", cpu_fallback)):
            if not isinstance(value, bool):
                raise ValueError(f"{_where(key)} must be true or false, got {value!r}; write e.g. `{key}: false`")
        return cls(
            conf=_number("conf", get("conf", d.conf), *LIMITS["conf"], str(d.conf)),
            iou=_number("iou", get("iou", d.iou), *LIMITS["iou"], str(d.iou)),
            max_det=_integer("max_det", get("max_det", d.max_det), *LIMITS["max_det"], str(d.max_det)),
            letterbox=letterbox,
            imgsz=_imgsz(get("imgsz", d.imgsz)),
            half=half,
            max_image_pixels=_integer("max_image_pixels", get("max_image_pixels", d.max_image_pixels), 0, 2**40, "40000000"),
            warmup=_integer("warmup", get("warmup", d.warmup), 0, 100, "2"),
            torch_threads=_integer("torch_threads", get("torch_threads", d.torch_threads), 0, 1024, "0"),
            cpu_fallback=cpu_fallback,
            preprocess=preprocess,
            runtime=runtime,
        )

    def check_model(self, metadata: dict) -> None:
        """The checks of these settings against the exported model (``metadata.json``): the worker runs
        them when it loads, and ``python -m export --archive`` before it packs, so that an archive whose
        worker could never load is not built."""
        self.check_imgsz(int(metadata["max_stride"]))

    def check_imgsz(self, max_stride: int) -> None:
        """``imgsz`` must be a multiple of the model's largest stride (the backbone's input grid)."""
        if self.imgsz is not None and any(v % max_stride for v in self.imgsz):
            fixed = [max(max_stride, -(-v // max_stride) * max_stride) for v in self.imgsz]
            raise ValueError(f"{_where('imgsz')} {list(self.imgsz)} is not a multiple of the model's max stride {max_stride}; write `imgsz: {fixed}`")


@dataclass(frozen=True)
class TrackingConfig:
    """The ``tracking:`` section of ``model-config.yaml`` (see the module docstring): the worker's video
    streams and the defaults a stream starts with. A stream's request may override the tracker and its
    parameters (``handler/video.py``); these are validated with the same rules, at load."""

    enabled: bool = True
    max_streams: int = 16
    idle_seconds: float = 60.0
    tracker: str = "bytetrack"  # the tracker of ``track=true``
    conf: float = 0.1  # default score threshold of a tracked frame, as Ultralytics' ``track()``
    bytetrack: ByteTrackParams = ByteTrackParams()  # bytetrack.yaml with this section's overrides
    botsort: BotSortParams = BotSortParams()

    @classmethod
    def from_dict(cls, section: dict | None) -> "TrackingConfig":
        """Validate the ``tracking:`` mapping; unknown keys are an error."""
        get, d = _settings(section, cls, _TRACKING).get, cls()
        enabled = get("enabled", d.enabled)
        if not isinstance(enabled, bool):
            raise ValueError(f"{_where('enabled', _TRACKING)} must be true or false, got {enabled!r}; write e.g. `enabled: true`")
        try:
            default = tracker_name(get("tracker", d.tracker))
        except ValueError as e:
            raise ValueError(f"{_where('tracker', _TRACKING)}: {e}; write e.g. `tracker: bytetrack`") from None
        params = {}
        for name in ("bytetrack", "botsort"):
            overrides = get(name) or {}
            if not isinstance(overrides, dict):
                raise ValueError(f"{_where(name, _TRACKING)} must be a mapping of {name}.yaml keys, got {overrides!r}; "
                                 f"write e.g. `{name}: {{track_buffer: 60}}`")
            try:
                params[name] = tracker_params(name, overrides)
            except ValueError as e:
                raise ValueError(f"{_where(name, _TRACKING)}: {e}") from None
        idle = get("idle_seconds", d.idle_seconds)
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 < idle <= 86400:
            raise ValueError(f"{_where('idle_seconds', _TRACKING)} must be a number of seconds above 0 and at most 86400, "
                             f"got {idle!r}; write e.g. `idle_seconds: 60`")
        return cls(
            enabled=enabled,
            max_streams=_integer("max_streams", get("max_streams", d.max_streams), 1, 100_000, "16", _TRACKING),
            idle_seconds=float(idle),
            tracker=default,
            conf=_number("conf", get("conf", d.conf), 0.0, 1.0, "0.1", _TRACKING),
            bytetrack=params["bytetrack"],
            botsort=params["botsort"],
        )

    def params(self, name: str) -> TrackerParams:
        """The configured parameters of tracker ``name`` (``bytetrack`` or ``botsort``)."""
        return self.botsort if tracker_name(name) == "botsort" else self.bytetrack

    def worker_warning(self, model_yaml: dict | None) -> str | None:
        """Why this model's worker settings break streams, or None: streams live in one worker process, and
        TorchServe sends each request to any worker, so a second worker sees frames of streams it does not hold."""
        if not self.enabled:
            return None
        yaml = model_yaml or {}
        workers = {k: yaml.get(k) for k in ("minWorkers", "maxWorkers") if isinstance(yaml.get(k), int) and yaml.get(k) > 1}
        if not workers:
            return None
        return (f"tracking is on with {', '.join(f'{k} {v}' for k, v in workers.items())}: a stream's frames then reach "
                "workers that do not hold it (404/410 on most frames). Set `minWorkers: 1` and `maxWorkers: 1` for this "
                "model, or `tracking: {enabled: false}` and register a second, one-worker copy of the archive for video")
