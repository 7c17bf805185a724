"""An example Lambda function behind sluicegate, speaking its batch envelope.

sluicegate invokes the function with

    {"records": [{"id": "r1", "key": "<client key>", "body": <the client's record>}, ...]}

and ``handler`` answers in one of the two shapes sluicegate accepts, chosen by the
``RESPONSE_SHAPE`` environment variable:

- ``results`` (default): ``{"results": [{"id", "status": "success", "body"} |
  {"id", "status": "error", "error": {"errorType", "errorMessage"}}]}``; sluicegate
  answers each caller 200 with its body, or 422 with its error.
- ``batch_item_failures``: the SQS-style ``{"batchItemFailures": [{"itemIdentifier": id}]}``;
  the records not listed succeeded (200, no body), the listed ones get 422.

Each record is processed on its own: one bad record fails only itself. Raising out of
``handler`` fails the whole invoke, which sluicegate reports to every caller of the batch
as 502 -- right for "the function is broken", wrong for "this record is bad".

Standard library only, so the deployment package is this one file.
"""

import os

RESPONSE_SHAPE_ENV = "RESPONSE_SHAPE"
SHAPES = ("results", "batch_item_failures")


class RecordError(Exception):
    """A failure of one record; reported for that record, never for the batch."""

    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def process(record):
    """The per-record work (replace with the real thing).

    Visible and trivial: an object body comes back with ``"processed": true`` added, any
    other JSON value as ``{"value": <body>, "processed": true}``; a body with
    ``"poison": true`` fails.
    """
    body = record.get("body")
    if isinstance(body, dict) and body.get("poison") is True:
        raise RecordError("PoisonRecord", 'record %s is marked "poison": true' % record["id"])
    processed = dict(body) if isinstance(body, dict) else {"value": body}
    processed["processed"] = True
    return processed


def handle(event, shape="results"):
    """Processes every record of ``event`` independently and answers in ``shape``."""
    if shape not in SHAPES:
        raise ValueError("unknown response shape %r: expected one of %s" % (shape, SHAPES))
    results = []
    failures = []
    for record in event["records"]:
        record_id = record["id"]
        try:
            body = process(record)
        except RecordError as e:
            results.append(
                {
                    "id": record_id,
                    "status": "error",
                    "error": {"errorType": e.error_type, "errorMessage": e.message},
                }
            )
            failures.append({"itemIdentifier": record_id})
        else:
            results.append({"id": record_id, "status": "success", "body": body})
    if shape == "batch_item_failures":
        # An empty list, not a missing key, is how this shape says "all succeeded".
        return {"batchItemFailures": failures}
    return {"results": results}


def handler(event, context):
    """Lambda entry point (configure the handler as ``handler.handler``).

    The shape is read on every call (an environment lookup is cheap) so a configuration
    change needs no code change; an unknown value raises, failing the invoke loudly
    rather than answering a shape sluicegate does not expect.
    """
    shape = os.environ.get(RESPONSE_SHAPE_ENV, "results").strip() or "results"
    return handle(event, shape)
