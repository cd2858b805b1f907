"""The few errors a request can cause, and their HTTP status. The one place that maps them.

Everything a client can get wrong is a :class:`RequestError`, and so is a model that could not load
(:class:`ModelLoadFailed`, a 503 for every request); the handler turns it into that request's status
(``context.set_response_status(status, phrase, idx)``) and the body ``{"error": {"type": ..., "message": ...}}``.

Anything else is our bug, logged with its traceback. Where it fails decides who gets the error
(``handler/service.py``):

* while one request is read, decoded or transformed, or while one tracked frame is tracked: that
  request alone gets 500 :class:`InternalError`; the rest of the batch is answered as usual;
* in the batched forward or the postprocessor, which every request of the batch shares: the exception
  leaves ``handle()`` and TorchServe fails the whole batch (503; 507 for an out-of-memory error).
"""

from __future__ import annotations

from http import HTTPStatus

from handler.image.decode import ImageDecodeError, ImageTooLargeError


class RequestError(Exception):
    """A client error that belongs to one request of a batch."""

    status: int = HTTPStatus.BAD_REQUEST
    type: str = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def phrase(self) -> str:
        return HTTPStatus(self.status).phrase

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message}}


class InvalidParameter(RequestError):
    """A query parameter or JSON field is missing, unknown, malformed or out of range (400)."""

    type = "invalid_parameter"


class InvalidImage(RequestError):
    """The body is not a decodable image (400)."""

    type = "invalid_image"


class ImageTooLarge(RequestError):
    """The image has more pixels than ``max_image_pixels`` (413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    type = "image_too_large"


class UnsupportedMediaType(RequestError):
    """The body is not JPEG, PNG, WebP, BMP or TIFF, or arrived as an unsupported content type (415)."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    type = "unsupported_media_type"


def from_decode_error(error: ValueError) -> RequestError:
    """``handler.image.decode`` errors -> the matching :class:`RequestError`."""
    if isinstance(error, ImageTooLargeError):
        return ImageTooLarge(str(error))
    if isinstance(error, ImageDecodeError) and error.unsupported:
        return UnsupportedMediaType(str(error))
    return InvalidImage(str(error))


class ModelLoadFailed(RequestError):
    """The worker could not load its model for a reason a retry cannot fix (a bad ``handler:`` or ``tracking:``
    setting, a missing or corrupt file, another contract version, a task this handler does not serve). The
    worker stays up and answers every request, and the describe request, with this error (503), so that no
    client waits in the queue of a worker that would crash-loop (``handler/service.py``, :class:`FailedModel`)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "model_load_failed"

    @classmethod
    def message_in(cls, body: object) -> str | None:
        """The message when ``body`` (an answer, or the ``customizedMetadata`` of ``GET /models/NAME?customized=true``)
        is this error, else None: how launchers, probes and the rollout tool tell a model that failed to load."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("type") == cls.type:
            return str(error.get("message", ""))
        return None


class InternalError(RequestError):
    """Our bug while handling one request; logged with its traceback, the rest of the batch still runs (500)."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    type = "internal_error"


class ResponseTooLarge(RequestError):
    """The answer in the requested encoding would exceed the response limit (413); the message names a smaller one."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    type = "response_too_large"


# A stream's failure (``handler.tracking.StreamError.kind``) -> (HTTP status, error type). Only that request
# fails; the stream itself goes on where it still exists (``docs/tracking.md``, "Errors").
STREAM_ERRORS: dict[str, tuple[int, str]] = {
    "unknown": (HTTPStatus.NOT_FOUND, "unknown_stream"),  # never started on this worker
    "restarted": (HTTPStatus.GONE, "stream_restarted"),  # started on an earlier process of this worker
    "expired": (HTTPStatus.GONE, "stream_expired"),  # idle longer than tracking.idle_seconds
    "ended": (HTTPStatus.GONE, "stream_ended"),  # the client ended it
    "too_many": (HTTPStatus.TOO_MANY_REQUESTS, "too_many_streams"),  # tracking.max_streams are open
    "exists": (HTTPStatus.CONFLICT, "stream_exists"),
}


class StreamUnavailable(RequestError):
    """A request names a stream this worker cannot continue, or would open one stream too many
    (404, 409, 410 or 429 by ``kind``, see :data:`STREAM_ERRORS`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status, self.type = STREAM_ERRORS[kind]
