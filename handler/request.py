"""One TorchServe request row -> (encoded image bytes, the task's options), or a :class:`RequestError`.

Which parameters a model takes, and what they mean, is its task's (``handler/tasks/``): a parameter of
another task is a 400 that lists this model's parameters (``top_k`` on a detect model, ``conf`` on a
classify model).

How TorchServe hands a request to ``handle()`` (one dict per request, "row"):

* raw body (``Content-Type: image/*`` or ``application/octet-stream``): ``{"body": bytearray}``;
* multipart form: one key per field, every value a ``bytearray``; the image is in ``image``,
  ``data`` or ``file``;
* ``application/json``: ``{"body": dict}``, the dict being ``{"image": "<base64>", "conf": ..,
  "iou": .., "max_det": .., "classes": [..], "polygons": true}`` (TorchServe passes bytes when the JSON is invalid);
* parameters given as multipart text fields or as query parameters (``?conf=0.5&classes=person,0``)
  arrive as extra keys of the row, ``bytearray`` values, with every form above. Caveat measured on
  TorchServe 0.12: ``/predictions/NAME`` drops the query string before the handler sees it (its
  ``InferenceRequestHandler`` passes no query decoder there); ``POST /invocations?model_name=NAME&conf=..``
  passes query parameters through (``model_name`` is ignored here).

A parameter may be given once: in the query string / form fields, or in the JSON body.
``polygons`` (``true``/``false``, ``1``/``0``) asks a segment model for mask outlines besides the RLE
masks; other models ignore it.

Video streams (``handler/video.py``): ``track``, ``stream``, ``end`` and the tracker parameters arrive the
same ways (the stream id also as the header ``X-Stream-Id``); a tracked request's default ``conf`` is the
``tracking:`` section's. Only the end of a stream (``stream=<id>&end=true``) may come without an image.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Sequence

from handler import video
from handler.errors import InvalidImage, InvalidParameter, UnsupportedMediaType
from handler.request_values import text
from handler.tasks import TASK_PARAMETERS, ResponseOptions, Task

IMAGE_FIELDS: tuple[str, ...] = ("image", "data", "file")  # multipart fields that may carry the image
# Query parameters TorchServe itself uses for routing (``POST /invocations?model_name=yolo``).
ROUTING_KEYS: tuple[str, ...] = ("model_name",)
_HOW_TO_SEND = (
    "send the image as the raw body with Content-Type image/* or application/octet-stream, "
    "as multipart/form-data field image|data|file, or as JSON {\"image\": \"<base64>\"}"
)


@dataclass(frozen=True)
class ParsedRequest:
    """What one request asks: the encoded image, the postprocessor options of its task, what the
    response carries."""

    image: bytes | None  # None only for the end of a stream without a last frame
    options: Any
    response: ResponseOptions | None
    stream: video.StreamOptions | None = None  # a tracked request's stream options; None: stateless


def _only_own(params: dict[str, Any], task: Task) -> None:
    """A parameter of another task is a 400 that says which ones this model takes."""
    other = [k for k in TASK_PARAMETERS if k in params and k not in task.parameters]
    if other:
        raise InvalidParameter(f"parameter(s) {other} {task.foreign}; this model's parameters are {list(task.parameters)}")


def _decode_base64(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidImage('JSON field "image" must be a non-empty base64 string')
    if value.startswith("data:") and "," in value:  # data URI: data:image/jpeg;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage('JSON field "image" is not valid base64') from None


def parse_request(
    row: dict,
    task: Task,
    defaults: Any,
    names: Sequence[str],
    content_type: str | None = None,
    tracked_defaults: Any = None,
    stream_header: str | None = None,
) -> ParsedRequest:
    """Split one request row into the encoded image and its options (``task``'s, over ``defaults``, or
    over ``tracked_defaults`` for a tracked request when given).

    ``content_type`` is the request's Content-Type when known; it only sharpens error messages
    (TorchServe passes invalid JSON on as bytes). ``stream_header``: the request's ``X-Stream-Id``.
    """
    if not isinstance(row, dict):
        raise UnsupportedMediaType(f"unexpected request layout; {_HOW_TO_SEND}")
    params = {k: text(k, v) for k, v in row.items() if k in TASK_PARAMETERS}
    stream_params = {k: text(k, v) for k, v in row.items() if k in video.VIDEO_PARAMETERS}
    image_keys = [k for k in row if k == "body" or k in IMAGE_FIELDS]
    unknown = [
        str(k)[:40] for k in row if k not in TASK_PARAMETERS and k not in video.VIDEO_PARAMETERS and k not in ROUTING_KEYS and k not in image_keys
    ]
    if len(image_keys) > 1:
        raise InvalidParameter(f"the request carries more than one image ({image_keys}); send one")
    image = _image_from(image_keys[0], row[image_keys[0]], params, content_type, stream_params) if image_keys else None
    stream = video.stream_options(stream_params, stream_header)
    if image is None and (stream is None or not stream.frameless):
        if image_keys and isinstance(row[image_keys[0]], dict):
            raise InvalidImage('the JSON body has no "image" field (base64 of the image file)')
        if unknown:  # e.g. a form-urlencoded body: the bytes became field names
            raise UnsupportedMediaType(f"no image found; {_HOW_TO_SEND}")
        raise InvalidImage(f"the request has no image; {_HOW_TO_SEND}")
    if unknown:
        raise InvalidParameter(f"unknown parameter(s) {sorted(unknown)}; the parameters are {list(TASK_PARAMETERS)}")
    _only_own(params, task)
    base = tracked_defaults if stream is not None and tracked_defaults is not None else defaults
    options, response = task.options(params, base, names)
    return ParsedRequest(image, options, response, stream)


def _image_from(key: str, value: Any, params: dict[str, Any], content_type: str | None, stream_params: dict[str, Any]) -> bytes | None:
    """The image bytes of the row's image field; None for a JSON body without ``"image"`` (the caller decides)."""
    if isinstance(value, dict):  # application/json
        return _image_from_json(value, params, stream_params)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if content_type and content_type.split(";")[0].strip().lower() == "application/json":
            raise InvalidParameter("the JSON body could not be parsed; send {\"image\": \"<base64>\", ...}")
        return data
    if isinstance(value, str):  # TorchServe decodes text/* bodies to str
        raise UnsupportedMediaType(f"{key!r} arrived as text; {_HOW_TO_SEND}")
    raise InvalidParameter(f"{key!r} must be an object with an \"image\" field or image bytes; {_HOW_TO_SEND}")


def _image_from_json(body: dict, params: dict[str, Any], stream_params: dict[str, Any]) -> bytes | None:
    unknown = sorted(set(body) - set(TASK_PARAMETERS) - set(video.VIDEO_PARAMETERS) - {"image"})
    if unknown:
        raise InvalidParameter(f"unknown JSON field(s) {unknown}; the fields are {['image', *TASK_PARAMETERS]}")
    for keys, into in ((TASK_PARAMETERS, params), (video.VIDEO_PARAMETERS, stream_params)):
        for key in keys:
            if key in body:
                if key in into:
                    raise InvalidParameter(f"{key} is given both in the query string and in the JSON body; give it once")
                into[key] = body[key]
    if "image" not in body:
        return None
    return _decode_base64(body["image"])
