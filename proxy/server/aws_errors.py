"""Countersign's refusals in AWS's own error shapes, for routes with `protocol: aws`.

An AWS SDK parses an error answer the way the service would send it: XML
(`<ErrorResponse><Error><Code>…</Code><Message>…</Message></Error>…`) for the query and
rest-xml services (IAM, STS, EC2, S3), JSON (`{"__type": …, "message": …}` with
`x-amzn-ErrorType`) for the JSON services (DynamoDB, KMS, …). Answered in that shape, boto3
raises `ClientError` with our code and sentence — "An error occurred (AccessDenied) when calling
the DeleteTable operation: Denied by bob@example.com: not this quarter. …" — where Countersign's
own JSON would only give an unparsable body. The Countersign code, approval id and request id
stay readable: in the message's tail and in the `Countersign-Error` header.
"""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape

from multidict import CIMultiDictProxy

from ..front.message import Answer
from .responses import error_body, error_sentence

__all__ = ["aws_error_answer"]

# Countersign code → (code in an XML answer, code in a JSON answer). SDKs retry throttling and
# unavailability by these codes, and never retry access errors.
_AWS_CODES: dict[int, tuple[str, str]] = {
    400: ("InvalidRequest", "ValidationException"),
    401: ("AccessDenied", "AccessDeniedException"),
    403: ("AccessDenied", "AccessDeniedException"),
    404: ("NotFound", "ResourceNotFoundException"),
    405: ("MethodNotAllowed", "ValidationException"),
    413: ("EntityTooLarge", "RequestEntityTooLargeException"),
    429: ("Throttling", "ThrottlingException"),
    502: ("ServiceUnavailable", "ServiceUnavailableException"),
    503: ("ServiceUnavailable", "ServiceUnavailableException"),
    504: ("RequestTimeout", "RequestTimeoutException"),
}
_SIGNATURE = ("SignatureDoesNotMatch", "InvalidSignatureException")


def _wants_json(headers: CIMultiDictProxy[str], service: str | None) -> bool:
    """Whether the SDK that sent this reads errors as JSON: JSON-protocol services send
    `X-Amz-Target` or a JSON Content-Type, and REST-JSON ones (Lambda) are known by their
    model once the signing service is; the rest read XML."""
    if "X-Amz-Target" in headers:
        return True
    if service is not None:
        from ..protocols.aws import speaks_json  # botocore: only where AWS routes exist

        if speaks_json(service):
            return True
    return "json" in headers.get("Content-Type", "").lower()


def aws_error_answer(
    request_headers: CIMultiDictProxy[str],
    status: int,
    code: str,
    *,
    request_id: str,
    headers: dict[str, str],
    service: str | None = None,
    message: str | None = None,
    **fields: Any,
) -> Answer:
    body = error_body(status, code, message=message, request_id=request_id, **fields)
    xml_code, json_code = (
        _SIGNATURE
        if code == "invalid_signature"
        else _AWS_CODES.get(status, ("AccessDenied", "AccessDeniedException"))
    )
    sentence = error_sentence(body)
    out = {**headers, "Countersign-Error": code, "x-amzn-RequestId": request_id}
    if _wants_json(request_headers, service):
        out["x-amzn-ErrorType"] = json_code
        return Answer(
            status,
            json.dumps({"__type": json_code, "message": sentence}).encode(),
            [("Content-Type", "application/x-amz-json-1.0"), *out.items()],
        )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{xml_code}</Code>"
        f"<Message>{escape(sentence)}</Message></Error>"
        f"<RequestId>{escape(request_id)}</RequestId></ErrorResponse>"
    )
    return Answer(status, xml.encode(), [("Content-Type", "text/xml"), *out.items()])
