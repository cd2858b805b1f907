"""The Open Inference Protocol (KServe v2) for one request row: detect, parse, answer. No TorchServe here.

TorchServe 0.12 routes ``POST /v2/models/NAME/infer`` to the handler exactly like ``/predictions/NAME``:
the row is ``{"body": ...}`` and nothing says which route it came by (``docs/deploy.md``, "The Open Inference Protocol").
Its ``kservev2`` envelope reads only the first request of a batch, so we parse v2 ourselves, row by row,
and TorchServe's batching stays intact. What arrives (measured):

* tritonclient.http sends no Content-Type, so the body is ``bytearray``:

  - binary extension (tritonclient's default): the JSON header is the first
    ``Inference-Header-Content-Length`` bytes; each input with ``parameters.binary_data_size`` takes that many
    bytes of the rest, in input order; a ``BYTES`` element is a 4-byte little-endian length + the bytes;
  - plain JSON: the whole body is the JSON; ``BYTES`` data are base64 text (JSON strings cannot hold a JPEG).

* ``Content-Type: application/json`` (curl, the KServe wrapper, TorchServe's OIP gRPC service): TorchServe
  has parsed the JSON, the body is a ``dict``; ``BYTES`` data are base64 text.
* ``Content-Encoding: gzip|deflate`` (tritonclient ``request_compression_algorithm``): the body arrives
  compressed; we inflate it, at most ``max_inflated_bytes``.

A v2 request carries one image: one input of datatype ``BYTES`` and one element (shape ``[1]``), the encoded
file. Per-request options (``conf``, ``classes``, ...) go in the request's ``parameters``; protocol parameters
that clients add on their own (tritonclient's ``binary_data_output``, ...) are dropped. :meth:`V2Request.as_row`
turns the request into the row the ordinary parser takes (``handler/request.py``), which validates the options.
The answer (:func:`v2_response`) is a v2 response with one ``BYTES`` output, ``result``, whose one element is
our response JSON text; an error (:func:`v2_error`) is ``{"error": "<message>"}`` with the request's own 4xx.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from handler.errors import InvalidImage, InvalidParameter, UnsupportedMediaType

INPUT_NAME = "image"  # the name the model metadata declares; a request may name its one input otherwise
OUTPUT_NAME = "result"  # the one output: our response JSON as one BYTES element
DATATYPE = "BYTES"
BINARY_HEADER = "Inference-Header-Content-Length"  # binary data extension: length of the JSON header
CONTENT_ENCODING = "Content-Encoding"

# Request parameters that belong to the protocol or to a client, not to the model (tritonclient's
# TRITON_RESERVED_REQUEST_PARAMS, and its reserved prefix "triton_"). They are dropped, not rejected.
PROTOCOL_PARAMETERS: frozenset[str] = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers", "binary_data_output"}
)
PROTOCOL_PARAMETER_PREFIX = "triton_"
# Keys of a plain request row that carry the image (handler/request.py: "body" and IMAGE_FIELDS); a parameter
# with one of these names would be read as a second image there, so it is refused here.
_ROW_IMAGE_KEYS: frozenset[str] = frozenset({"body", "image", "data", "file"})
# Top-level keys of a v2 inference request (the spec's, plus model_name/model_version that TorchServe's OIP
# gRPC service and some clients add).
_REQUEST_KEYS: frozenset[str] = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
_HOW_TO_SEND = (
    f"send one input of datatype {DATATYPE} and shape [1] holding the encoded image file "
    "(base64 text in JSON \"data\", or raw bytes with the binary data extension)"
)
# Platforms of the model metadata, by backbone format (metadata.json "format"); "pytorch_libtorch" is the
# v2 / Triton name for TorchScript.
_PLATFORMS: dict[str, str] = {"torchscript": "pytorch_libtorch", "aoti": "pytorch_aotinductor"}


@dataclass(frozen=True)
class V2Request:
    """One v2 inference request, read and checked.

    ``image``: the encoded image file (JPEG, PNG, ...) as sent, not decoded.
    ``parameters``: the request's per-request options, protocol parameters removed; values as JSON gave them.
    ``request_id``: the request's ``id`` (answered back), or None.
    ``input_name``: the name the client gave its one input.
    ``outputs``: the output names the client asked for; () means all (ours: ``result``).
    """

    image: bytes
    parameters: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    input_name: str = INPUT_NAME
    outputs: tuple[str, ...] = ()

    def as_row(self) -> dict[str, Any]:
        """The plain request row with this image and these options (``handler/request.py`` reads it)."""
        return {"body": bytearray(self.image), **self.parameters}


def header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """A request header by case-insensitive name (clients and proxies differ in spelling), or None."""
    if not headers:
        return None
    lowered = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == lowered and isinstance(value, (str, bytes, bytearray)):
            return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value
    return None


def parse_v2_request(
    row: Any, headers: Mapping[str, Any] | None = None, max_inflated_bytes: int = 64 * 2**20
) -> V2Request | None:
    """``row`` (TorchServe's dict for one request) -> its :class:`V2Request`, or None when it is no v2 request.

    ``headers``: that request's headers (``context.get_all_request_header(idx)``). A row is a v2 request when
    its body is a JSON object with ``inputs``, or when it uses the binary data extension. A v2 request that
    is malformed raises :class:`InvalidParameter` / :class:`InvalidImage` (400) or
    :class:`UnsupportedMediaType` (415) with a message that names the problem.
    """
    if not isinstance(row, dict) or "body" not in row:
        return None
    body = row["body"]
    if isinstance(body, dict):
        if "inputs" not in body:
            return None
        request, binary = body, b""
    else:
        split = _split_body(body, headers, max_inflated_bytes)
        if split is None:
            return None
        request, binary = split
    extra = sorted(str(k)[:40] for k in row if k != "body")
    if extra:
        raise InvalidParameter(f"a v2 request carries its options in \"parameters\", not as fields {extra}")
    return _read_request(request, binary)


def _split_body(body: Any, headers: Mapping[str, Any] | None, max_inflated_bytes: int) -> tuple[dict, bytes] | None:
    """A bytes (or text) body -> (JSON header object, binary section), or None when it is not a v2 body."""
    if isinstance(body, str):  # TorchServe decodes text/* bodies
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        return None
    data = _inflate(body, header(headers, CONTENT_ENCODING), max_inflated_bytes)
    length = header(headers, BINARY_HEADER)
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise InvalidParameter(f"{BINARY_HEADER} must be an integer, got {length!r}") from None
        if not 0 < n <= len(data):
            raise InvalidParameter(f"{BINARY_HEADER} is {n}, but the body is {len(data)} bytes")
        request = _json_object(data[:n], f"the first {n} bytes of the body ({BINARY_HEADER})")
        return request, bytes(data[n:])
    if bytes(data[:4096]).lstrip()[:1] != b"{":  # an image file, a form, ...: not ours (no image format starts with "{")
        return None
    if b'"inputs"' not in bytes(data[:65536]):  # JSON of the plain API (or none that parses): its parser answers it
        return None
    request = _json_object(data, "the body")
    if "inputs" not in request:
        return None  # some other JSON (the plain API's {"image": ...} when sent without Content-Type)
    return request, b""


def _inflate(data: bytes | bytearray | memoryview, encoding: str | None, limit: int) -> bytes | bytearray | memoryview:
    """The body as sent (no copy) or, with Content-Encoding gzip/deflate, inflated to at most ``limit`` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return data
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)  # 31: gzip wrapper, 15: zlib (HTTP deflate)
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as e:
        raise InvalidParameter(f"the body is not valid {encoding} data ({e})") from None
    if inflater.unconsumed_tail or (not inflater.eof and len(out) >= limit):
        raise InvalidParameter(f"the {encoding} body inflates to more than {limit} bytes")
    if not inflater.eof:
        raise InvalidParameter(f"the body is not valid {encoding} data (the stream is truncated)")
    if inflater.unused_data:
        raise InvalidParameter(f"the body is not valid {encoding} data ({len(inflater.unused_data)} bytes after the stream)")
    return out


def _json_object(data: bytes | bytearray | memoryview, what: str) -> dict:
    try:
        value = json.loads(bytes(data) if isinstance(data, memoryview) else data)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidParameter(f"{what} is not valid JSON ({e}); a v2 request is a JSON object with \"inputs\"") from None
    if not isinstance(value, dict):
        raise InvalidParameter(f"{what} is JSON {type(value).__name__}, not an object with \"inputs\"")
    return value


def _read_request(request: dict, binary: bytes) -> V2Request:
    unknown = sorted(str(k)[:40] for k in request if k not in _REQUEST_KEYS)
    if unknown:
        raise InvalidParameter(f"unknown v2 request field(s) {unknown}; the fields are {sorted(_REQUEST_KEYS)}")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidParameter(f"v2 request \"id\" must be a string, got {request_id!r}")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidParameter(f"the v2 request has no inputs; {_HOW_TO_SEND}")
    if not all(isinstance(i, dict) for i in inputs):
        raise InvalidParameter(f"v2 \"inputs\" must be a list of objects; {_HOW_TO_SEND}")
    if len(inputs) != 1:
        names = [str(i.get("name"))[:40] for i in inputs]
        raise InvalidParameter(f"the v2 request has {len(inputs)} inputs {names}; {_HOW_TO_SEND}")
    name, image = _read_image_input(inputs[0], binary)
    return V2Request(
        image=image,
        parameters=_model_parameters(request.get("parameters")),
        request_id=request_id,
        input_name=name,
        outputs=_requested_outputs(request.get("outputs")),
    )


def _read_image_input(tensor: dict, binary: bytes) -> tuple[str, bytes]:
    """The one input -> (its name, the encoded image file)."""
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidParameter(f"the v2 input has no \"name\"; {_HOW_TO_SEND}")
    datatype = tensor.get("datatype")
    if datatype != DATATYPE:
        raise InvalidParameter(f"input {name!r} has datatype {datatype!r}, not {DATATYPE}; {_HOW_TO_SEND}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidParameter(f"input {name!r} has shape {shape!r}; a shape is a list of non-negative integers, here [1]")
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidParameter(f"input {name!r}: \"parameters\" must be an object, got {params!r}")
    if any(str(k).startswith("shared_memory") for k in params):
        raise InvalidParameter(f"input {name!r} uses shared memory, which this server does not offer; {_HOW_TO_SEND}")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise InvalidParameter(f"input {name!r} has both \"data\" and binary_data_size; send one of them")
        elements = _binary_elements(name, size, binary)
    else:
        if binary:
            raise InvalidParameter(f"the body has {len(binary)} bytes of binary data, but no input declares binary_data_size")
        if "data" not in tensor:
            raise InvalidParameter(f"input {name!r} has no \"data\"; {_HOW_TO_SEND}")
        elements = _json_elements(name, tensor["data"])
    if len(elements) != count:
        raise InvalidParameter(f"input {name!r}: shape {shape} holds {count} element(s), but its data has {len(elements)}")
    if count != 1:
        what = "no image" if count == 0 else f"{count} images"
        raise InvalidParameter(
            f"input {name!r} holds {what}; send one image per request (shape [1]): TorchServe batches concurrent requests"
        )
    image = elements[0]
    if not image:
        raise InvalidImage(f"input {name!r} holds an empty image")
    return name, image


def _json_elements(name: str, data: Any) -> list[bytes]:
    """JSON ``data`` (flat or nested row-major) of BYTES -> the elements, base64-decoded."""
    if not isinstance(data, list):
        raise InvalidParameter(f"input {name!r}: \"data\" must be a list, got {type(data).__name__}")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:  # row-major flatten without recursion limits
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return [_base64_element(name, i, item) for i, item in enumerate(flat)]


def _base64_element(name: str, index: int, value: Any) -> bytes:
    if not isinstance(value, str):
        raise InvalidParameter(f"input {name!r}: data[{index}] is {type(value).__name__}, not base64 text of the image file")
    if value.startswith("data:") and "," in value:  # data URI: data:image/jpeg;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(
            f"input {name!r}: data[{index}] is not valid base64; JSON carries {DATATYPE} as base64 text of the image file "
            "(or send raw bytes with the binary data extension)"
        ) from None


def _binary_elements(name: str, size: Any, binary: bytes) -> list[bytes]:
    """The binary section of the one input -> its BYTES elements (each: uint32 little-endian length + bytes)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidParameter(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
    if size != len(binary):
        raise InvalidParameter(f"input {name!r} declares binary_data_size {size}, but the body's binary section is {len(binary)} bytes")
    elements: list[bytes] = []
    offset = 0
    while offset < size:
        if size - offset < 4:
            raise InvalidParameter(f"input {name!r}: {size - offset} stray byte(s) after element {len(elements)} of the binary data")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if length > size - offset:
            raise InvalidParameter(
                f"input {name!r}: binary element {len(elements)} says {length} bytes, only {size - offset} remain; "
                f"{DATATYPE} binary data is a 4-byte little-endian length before each element"
            )
        elements.append(binary[offset : offset + length])
        offset += length
    return elements


def _model_parameters(parameters: Any) -> dict[str, Any]:
    """The request's ``parameters`` -> the model's options (protocol parameters dropped)."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidParameter(f"v2 request \"parameters\" must be an object, got {parameters!r}")
    options = {
        k: v for k, v in parameters.items()
        if k not in PROTOCOL_PARAMETERS and not str(k).startswith(PROTOCOL_PARAMETER_PREFIX)
    }
    clash = sorted(k for k in options if k in _ROW_IMAGE_KEYS)
    if clash:
        raise InvalidParameter(f"parameter(s) {clash} are not options; the image goes in the {DATATYPE} input")
    return options


def _requested_outputs(outputs: Any) -> tuple[str, ...]:
    if outputs is None:
        return ()
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidParameter(f"v2 \"outputs\" must be a list of objects with a \"name\", got {outputs!r}")
    names = tuple(o.get("name") for o in outputs)
    unknown = [n for n in names if n != OUTPUT_NAME]
    if unknown:
        raise InvalidParameter(f"unknown output(s) {unknown}; this model has one output, {OUTPUT_NAME!r}")
    return names


def v2_response(result_json: str, model_name: str, model_version: str | None = None, request_id: str | None = None) -> dict:
    """A v2 inference response whose one output, ``result`` (BYTES, shape [1]), holds ``result_json``
    (our response body as JSON text; clients read it with ``json.loads(result.as_numpy("result")[0])``).

    The outputs are always JSON, also when a client asks for binary outputs (``binary_data_output``):
    tritonclient reads both."""
    response: dict[str, Any] = {"model_name": model_name}
    if model_version:
        response["model_version"] = model_version
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [{"name": OUTPUT_NAME, "datatype": DATATYPE, "shape": [1], "data": [result_json]}]
    return response


def v2_error(message: str) -> dict:
    """The v2 error body, ``{"error": "<message>"}`` (tritonclient shows the string as the exception message)."""
    return {"error": message}


def v2_model_metadata(model_name: str, model_version: str | None, metadata: Mapping[str, Any]) -> dict:
    """The v2 model metadata of an exported model (``metadata``: its ``metadata.json``).

    TorchServe's REST frontend does not route ``GET /v2/models/NAME`` to the handler; the handler can publish
    this as its describe answer (``GET /models/NAME?customized=true`` on the management API)."""
    return {
        "name": model_name,
        "versions": [model_version] if model_version else [],
        "platform": _PLATFORMS.get(str(metadata.get("format")), "pytorch"),
        "inputs": [{"name": INPUT_NAME, "datatype": DATATYPE, "shape": [1]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": DATATYPE, "shape": [1]}],
    }
