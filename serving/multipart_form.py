"""A ``multipart/form-data`` body, already in memory, split into its parts.

The request guard reads the whole body anyway (to enforce the size limit), so the form is parsed
once from those bytes: the guard checks the fields against the endpoint, and the image route reads
the uploads from the same parts. Nothing goes through a temporary file: BentoML hands a ``Path``
argument each upload written to a temporary file of its own (``_bentoml_sdk/validators.py``,
https://github.com/bentoml/BentoML/blob/v1.4.39/src/_bentoml_sdk/validators.py), with Starlette's
form parser before it: a third of a small PNG request's cost in our profile (docs/PERFORMANCE.md).
This parser goes with ``serving.direct_routes``.

The split follows RFC 7578 / RFC 2046: a part ends at ``CRLF--boundary``, so a payload's own bytes,
CRLFs included, come back exactly as sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import parse_options_header


class FormError(ValueError):
    """A body that is not a well-formed form; the message says what to do about it."""


@dataclass(frozen=True)
class FormPart:
    """One form field: its name, the filename when it is an upload (else None), and its bytes."""

    name: str
    filename: str | None
    data: bytes

    @property
    def is_file(self) -> bool:
        return self.filename is not None


def is_multipart(content_type: bytes) -> bool:
    return content_type.lower().startswith(b"multipart/form-data")


def boundary_of(content_type: bytes) -> bytes | None:
    """The ``boundary`` parameter of a multipart Content-Type, unquoted, or None."""
    for param in content_type.split(b";")[1:]:
        key, _, value = param.strip().partition(b"=")
        if key.strip().lower() == b"boundary":
            return value.strip().strip(b'"') or None
    return None


def _disposition(head: bytes) -> dict[bytes, bytes] | None:
    """The parameters of a part's Content-Disposition header, parsed as Starlette parses them."""
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            return parse_options_header(value.strip())[1]
    return None


def parse_form(content_type: bytes, body: bytes) -> list[FormPart]:
    """Every part of a multipart body, in order. Raises :class:`FormError` for a malformed one."""
    boundary = boundary_of(content_type)
    if not boundary:
        raise FormError("multipart body without a boundary; let your HTTP client build the form (or send JSON)")
    delimiter = b"\r\n--" + boundary
    pieces = (b"\r\n" + body).split(delimiter)
    parts: list[FormPart] = []
    closed = False
    for piece in pieces[1:]:  # pieces[0] is the preamble, which senders may fill and readers ignore
        if piece.startswith(b"--"):
            closed = True
            break
        line_end = piece.find(b"\r\n")  # the rest of the delimiter line: optional whitespace only
        head_and_data = piece[line_end + 2:] if line_end >= 0 else b""
        head, separator, data = head_and_data.partition(b"\r\n\r\n")
        if not separator:
            if head_and_data.startswith(b"\r\n"):  # a part with no headers at all
                head, data = b"", head_and_data[2:]
            else:
                raise FormError("a multipart part has no blank line after its headers; let your HTTP client "
                                "build the form")
        params = _disposition(head)
        if params is None or b"name" not in params:
            raise FormError("a multipart part has no Content-Disposition name; let your HTTP client build the form")
        filename = params.get(b"filename")
        parts.append(FormPart(params[b"name"].decode("utf-8", "replace"),
                              None if filename is None else filename.decode("utf-8", "replace"), data))
    if not closed:
        raise FormError("the multipart body ends before its closing boundary: it was cut short; send it whole")
    return parts
