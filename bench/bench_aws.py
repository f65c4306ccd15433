"""What an AWS request costs Countersign on top of a plain one: SigV4 verification of the
agent, action recognition and SigV4 re-signing with the route's credentials, each timed alone
on requests real boto3 signs (captured before sending), in one process, after warm-up.

    .venv/bin/python bench/bench_aws.py

Prints µs per call (best of 5 runs of N calls). Routes without `protocol` or `aws_sigv4` pay
none of this: the stages are skipped by a None check (see bench/bench_policy.py and `make
bench` for the plain path).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.authn.sigv4 import SigV4Verifier
from proxy.aws_resign import AwsUpstreamSigner
from proxy.config import AwsKeySettings, AwsRouteSettings, AwsStaticCredentials
from proxy.model import RequestBody
from proxy.protocols import Message, recognizer_for
from tests.test_sigv4 import KEY_ID, SECRET, Signed, boto_client, capture

N = 2000


async def timed(call: Callable[[], Awaitable[Any]], n: int = N) -> float:
    for _ in range(50):
        await call()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            await call()
        best = min(best, (time.perf_counter() - started) / n)
    return best * 1e6


def message(request: Signed, service: str) -> Message:
    path, _, query = request.target.partition("?")
    return Message(
        method=request.method,
        path=path,
        raw_path=path,
        query=query,
        headers=request.headers,
        body=RequestBody(request.body, request.headers.get("Content-Type")),
        service=service,
    )


async def main() -> None:
    verifier = SigV4Verifier(
        [AwsKeySettings(access_key_id=KEY_ID, secret=SECRET, subject="agent-7")]
    )
    signer = AwsUpstreamSigner(
        AwsRouteSettings(
            region="us-east-1",
            credentials=AwsStaticCredentials(
                access_key_id="AKIAREALKEY000000000", secret_access_key="r" * 40
            ),
        )
    )
    await signer.start()
    aws = recognizer_for("aws")
    cases = [
        (
            "iam",
            "IAM CreateRole (query)",
            "create_role",
            {"RoleName": "r", "AssumeRolePolicyDocument": "{}"},
        ),
        ("dynamodb", "DynamoDB DeleteTable (json)", "delete_table", {"TableName": "t"}),
        (
            "s3",
            "S3 PutObject 1 KiB (rest-xml)",
            "put_object",
            {"Bucket": "bkt", "Key": "logs//a b+c.txt", "Body": b"x" * 1024},
        ),
    ]
    print(f"{'request':<34} {'verify':>8} {'recognize':>10} {'re-sign':>8} {'total':>8}  (µs)")
    for service, label, operation, params in cases:
        request = capture(boto_client(service), operation, **params)
        now = time.time()

        async def verify(request: Signed = request, now: float = now) -> Any:
            return await verifier.verify(
                method=request.method,
                target=request.target,
                host=request.host,
                headers=request.headers,
                body=request.body,
                now=now,
            )

        _, caller = await verify()

        async def recognize(request: Signed = request, service: str = service) -> Any:
            return await aws.recognize(message(request, service))

        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "authorization"]

        async def resign(
            request: Signed = request, caller: Any = caller, headers: Any = headers
        ) -> Any:
            return await signer.sign(
                method=request.method,
                url="https://aws.example.com" + request.target,
                headers=list(headers),
                body=request.body,
                service=caller.service,
                payload=caller.payload,
            )

        costs = [await timed(verify), await timed(recognize), await timed(resign)]
        print(f"{label:<34} " + " ".join(f"{c:>8.1f}" for c in costs) + f" {sum(costs):>8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
