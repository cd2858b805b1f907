"""One TorchServe request row -> (encoded image bytes, :class:`Thresholds`), or a :class:`RequestError`.

(Classify models: :class:`handler.classify.TopK` instead of :class:`Thresholds`; their one parameter is
``top_k``, and the detection parameters are a 400 there, as ``top_k`` is on a detect or pose model.)

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
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from typing import Any, Sequence

from handler.classify import TopK
from handler.errors import InvalidImage, InvalidParameter, RequestError, UnsupportedMediaType
from handler.pipeline import Prepared, Thresholds
from handler.response import ResponseOptions

IMAGE_FIELDS: tuple[str, ...] = ("image", "data", "file")  # multipart fields that may carry the image
DETECTION_PARAMETERS: tuple[str, ...] = ("conf", "iou", "max_det", "classes", "polygons")
CLASSIFY_PARAMETERS: tuple[str, ...] = ("top_k",)
PARAMETERS: tuple[str, ...] = DETECTION_PARAMETERS + CLASSIFY_PARAMETERS
# Query parameters TorchServe itself uses for routing (``POST /invocations?model_name=yolo``).
ROUTING_KEYS: tuple[str, ...] = ("model_name",)
_HOW_TO_SEND = (
    "send the image as the raw body with Content-Type image/* or application/octet-stream, "
    "as multipart/form-data field image|data|file, or as JSON {\"image\": \"<base64>\"}"
)


@dataclass
class PreparedRequest:
    """A request of the batch that passed parsing and decoding, waiting for the batched forward."""

    idx: int  # position in the TorchServe batch
    prepared: Prepared  # letterboxed (or cropped) pixels, geometry, thresholds (or top-k)
    width: int  # original image size
    height: int
    preprocess_ms: float  # parse + decode + letterbox of this request
    options: ResponseOptions = ResponseOptions()  # what the response carries besides detections


def _text(name: str, value: Any) -> Any:
    """Row values are bytearray for query/form fields; JSON values stay as parsed."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidParameter(f"parameter {name!r} is not UTF-8 text") from None
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidParameter(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be a number, got {value!r}") from None


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}") from None


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise InvalidParameter(f"{name} must be true or false, got {value!r}")


def options_from(params: dict[str, Any]) -> ResponseOptions:
    """The request's response options (``polygons``)."""
    return ResponseOptions(polygons=_bool("polygons", params["polygons"]) if "polygons" in params else False)


def parse_classes(value: Any, names: Sequence[str]) -> tuple[int, ...]:
    """``"0,person"`` or ``[0, "person"]`` -> class ids. Ids are range-checked by ``Thresholds.validate``."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise InvalidParameter(f"classes must be comma-separated class ids or names (or a JSON list), got {value!r}")
    ids: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise InvalidParameter(f"classes: {item!r} is neither a class id nor a class name")
        if isinstance(item, int):
            ids.append(item)
            continue
        if not isinstance(item, str) or not item.strip():
            raise InvalidParameter(f"classes: {item!r} is neither a class id nor a class name")
        item = item.strip()
        if item.lstrip("-").isdigit():
            ids.append(int(item))
        elif item in names:
            ids.append(list(names).index(item))
        else:
            shown = ", ".join(list(names)[:10]) + (", ..." if len(names) > 10 else "")
            raise InvalidParameter(f"classes: {item!r} is not a class of this model ({shown})")
    return tuple(dict.fromkeys(ids))  # unique, in the given order


def _only(params: dict[str, Any], allowed: tuple[str, ...], why: str) -> None:
    """A parameter of the other kind of model is a 400 that says which ones this model takes."""
    other = [k for k in PARAMETERS if k in params and k not in allowed]
    if other:
        raise InvalidParameter(f"parameter(s) {other} {why}; this model's parameters are {list(allowed)}")


def top_k_from(params: dict[str, Any], defaults: TopK, names: Sequence[str]) -> TopK:
    """A classify model's ``top_k`` over the default; detection parameters are an error."""
    _only(params, CLASSIFY_PARAMETERS, "filter detections and do not apply to a classify model")
    t = TopK(_int("top_k", params["top_k"])) if "top_k" in params else defaults
    try:
        return t.validate(len(names))
    except ValueError as e:
        raise InvalidParameter(str(e)) from None


def thresholds_from(params: dict[str, Any], defaults: Thresholds, names: Sequence[str]) -> Thresholds:
    """Apply request parameters over the configured defaults and range-check the result."""
    _only(params, DETECTION_PARAMETERS, "apply to classify models only")
    t = defaults
    if "conf" in params:
        t = replace(t, conf=_float("conf", params["conf"]))
    if "iou" in params:
        t = replace(t, iou=_float("iou", params["iou"]))
    if "max_det" in params:
        t = replace(t, max_det=_int("max_det", params["max_det"]))
    if "classes" in params:
        t = replace(t, classes=parse_classes(params["classes"], names))
    try:
        return t.validate(len(names))
    except ValueError as e:
        raise InvalidParameter(str(e)) from None


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
    row: dict, defaults: Thresholds | TopK, names: Sequence[str], content_type: str | None = None
) -> tuple[bytes, Thresholds | TopK]:
    """Split one request row into the encoded image and its thresholds (``TopK`` when ``defaults`` is one).

    ``content_type`` is the request's Content-Type when known; it only sharpens error messages
    (TorchServe passes invalid JSON on as bytes).
    """
    image, thresholds, _ = parse_served_request(row, defaults, names, content_type)
    return image, thresholds


def parse_served_request(
    row: dict, defaults: Thresholds | TopK, names: Sequence[str], content_type: str | None = None
) -> tuple[bytes, Thresholds | TopK, ResponseOptions]:
    """As :func:`parse_request`, plus the request's :class:`ResponseOptions`."""
    if not isinstance(row, dict):
        raise UnsupportedMediaType(f"unexpected request layout; {_HOW_TO_SEND}")
    params = {k: _text(k, v) for k, v in row.items() if k in PARAMETERS}
    image_keys = [k for k in row if k == "body" or k in IMAGE_FIELDS]
    unknown = [str(k)[:40] for k in row if k not in PARAMETERS and k not in ROUTING_KEYS and k not in image_keys]
    if len(image_keys) > 1:
        raise InvalidParameter(f"the request carries more than one image ({image_keys}); send one")
    image = _image_from(image_keys[0], row[image_keys[0]], params, content_type) if image_keys else None
    if image is None:
        if unknown:  # e.g. a form-urlencoded body: the bytes became field names
            raise UnsupportedMediaType(f"no image found; {_HOW_TO_SEND}")
        raise InvalidImage(f"the request has no image; {_HOW_TO_SEND}")
    if unknown:
        raise InvalidParameter(f"unknown parameter(s) {sorted(unknown)}; the parameters are {list(PARAMETERS)}")
    if isinstance(defaults, TopK):
        return image, top_k_from(params, defaults, names), ResponseOptions()
    return image, thresholds_from(params, defaults, names), options_from(params)


def _image_from(key: str, value: Any, params: dict[str, Any], content_type: str | None) -> bytes:
    if isinstance(value, dict):  # application/json
        return _image_from_json(value, params)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if content_type and content_type.split(";")[0].strip().lower() == "application/json":
            raise InvalidParameter("the JSON body could not be parsed; send {\"image\": \"<base64>\", ...}")
        return data
    if isinstance(value, str):  # TorchServe decodes text/* bodies to str
        raise UnsupportedMediaType(f"{key!r} arrived as text; {_HOW_TO_SEND}")
    raise InvalidParameter(f"{key!r} must be an object with an \"image\" field or image bytes; {_HOW_TO_SEND}")


def _image_from_json(body: dict, params: dict[str, Any]) -> bytes:
    unknown = sorted(set(body) - set(PARAMETERS) - {"image"})
    if unknown:
        raise InvalidParameter(f"unknown JSON field(s) {unknown}; the fields are {['image', *PARAMETERS]}")
    for key in PARAMETERS:
        if key in body:
            if key in params:
                raise InvalidParameter(f"{key} is given both in the query string and in the JSON body; give it once")
            params[key] = body[key]
    if "image" not in body:
        raise InvalidImage('the JSON body has no "image" field (base64 of the image file)')
    return _decode_base64(body["image"])
