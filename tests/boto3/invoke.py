"""boto3 against sluicegate's Lambda Invoke API: `python3 tests/boto3/invoke.py <endpoint>`.

Run by `tests/invoke_api.rs` against a sidecar with `identity.source = "aws_access_key"`, a
raw route to `echo`, a batch route to `batched`, and a plan allowing the access key
`AKIDFLOOD` a burst of 2 at 0.01/s. Asserts and exits non-zero on the first failure.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config


def client(endpoint, access_key):
    # Retries off: a 429 must reach the assertion, not boto3's retry loop.
    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key="placeholder-secret",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def payload(response):
    return json.loads(response["Payload"].read())


def main(endpoint):
    lam = client(endpoint, "AKIDPYTHON")

    # A payload comes back as the function's result.
    response = lam.invoke(FunctionName="echo", Payload=json.dumps({"n": 41}))
    assert response["StatusCode"] == 200, response
    assert "FunctionError" not in response, response
    assert response["ExecutedVersion"] == "$LATEST", response
    assert payload(response) == {"n": 41}

    # A full ARN names the same function.
    response = lam.invoke(
        FunctionName="arn:aws:lambda:us-east-1:123456789012:function:echo",
        Payload=b"[1, 2]",
    )
    assert payload(response) == [1, 2]

    # Concurrent calls on a batch route: each gets its own record's result.
    def call(n):
        return n, payload(lam.invoke(FunctionName="batched", Payload=json.dumps({"n": n})))

    with ThreadPoolExecutor(max_workers=8) as pool:
        for n, result in pool.map(call, range(8)):
            assert result == {"n": n}, (n, result)

    # An unconfigured function.
    try:
        lam.invoke(FunctionName="nope", Payload=b"{}")
        raise AssertionError("an unconfigured function was invoked")
    except lam.exceptions.ResourceNotFoundException as e:
        assert e.response["Error"]["Code"] == "ResourceNotFoundException", e.response
        assert "Function not found: arn:aws:lambda:" in str(e), str(e)
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    # An Event invoke is accepted.
    response = lam.invoke(FunctionName="echo", InvocationType="Event", Payload=b"{}")
    assert response["StatusCode"] == 202, response

    # A flooded access key is throttled with Lambda's shape and Reason; another is served.
    flood = client(endpoint, "AKIDFLOOD")
    for n in range(2):
        assert payload(flood.invoke(FunctionName="echo", Payload=json.dumps(n))) == n
    try:
        flood.invoke(FunctionName="echo", Payload=b"{}")
        raise AssertionError("the flooded key was served a third time")
    except flood.exceptions.TooManyRequestsException as e:
        assert e.response["Reason"] == "CallerRateLimitExceeded", e.response
        assert e.response["Type"] == "User", e.response
        assert e.response["message"] == "Rate Exceeded.", e.response
        assert int(e.response["retryAfterSeconds"]) >= 1, e.response
        headers = e.response["ResponseMetadata"]["HTTPHeaders"]
        assert int(headers["retry-after"]) >= 1, headers
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    response = lam.invoke(FunctionName="echo", Payload=b"{}")
    assert response["StatusCode"] == 200, response
    print("boto3 invoke checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
