"""A real AWS emulator for the tests: `moto_server` as its own process, signatures checked.

moto checks SigV4 signatures (and IAM policies) once its first `INITIAL_NO_AUTH_ACTION_COUNT`
requests are spent. The fixture spends exactly those on creating an IAM user with an
administrator policy and an access key: the "real" AWS credentials a Countersign route signs
with. From then on a request signed with any other secret is refused by moto itself
(`SignatureDoesNotMatch`), so a test that gets an answer proves Countersign re-signed it the way
AWS checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
REGION = "us-east-1"
_SETUP_ACTIONS = 4  # create_user, create_access_key, create_policy, attach_user_policy
_ADMIN = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Moto:
    url: str
    access_key_id: str
    secret_access_key: str
    proc: subprocess.Popen[bytes]

    def client(self, service: str, **overrides: Any) -> Any:
        """A boto3 client straight to moto with the real credentials (to look behind the
        proxy: what exists, what ran)."""
        options: dict[str, Any] = {
            "endpoint_url": self.url,
            "region_name": REGION,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }
        options.update(overrides)
        return boto3.client(service, **options)


@contextlib.contextmanager
def moto_server() -> Iterator[Moto]:
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)}
    proc = subprocess.Popen(
        [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("moto_server did not listen within 20 s") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        # The setup requests are not checked: any key will do for them.
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="AKIASETUP00000000000",
            aws_secret_access_key="setup" * 8,
        )
        iam.create_user(UserName="countersign")
        key = iam.create_access_key(UserName="countersign")["AccessKey"]
        policy = iam.create_policy(PolicyName="admin", PolicyDocument=json.dumps(_ADMIN))
        iam.attach_user_policy(UserName="countersign", PolicyArn=policy["Policy"]["Arn"])
        yield Moto(url, key["AccessKeyId"], key["SecretAccessKey"], proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
