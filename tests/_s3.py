"""A real S3 endpoint for the remote and executor tests: moto's server on 127.0.0.1.

One server per test run, shared by the modules whose session fixture calls :func:`serve_s3`
(each module has its own fixture object, so the server itself is a reference-counted
singleton: started by the first user, stopped when the last one is torn down at the end of the
session). Also :func:`time_limit`, a SIGALRM deadline, so that no test can hang the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REGION = "us-east-1"
KEY, SECRET = "testing", "testing"


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "test") -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds``. Nests: an
    enclosing limit keeps running (and still applies) inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_handler = signal.getsignal(signal.SIGALRM)
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    limit = min(seconds, outer_left) if outer_left else seconds
    message = f"{what} took longer than {seconds} s" if limit == seconds else "the enclosing time limit expired"

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(message)

    start = time.monotonic()
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 0.001))


@dataclass
class S3:
    """The running server: its URL and helpers that talk to it with boto3 (no caches)."""

    url: str
    server: Any

    def client(self, service: str = "s3", key: str = KEY, secret: str = SECRET) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.url, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name=REGION)

    def options(self, key: str = KEY, secret: str = SECRET, **extra: Any) -> dict[str, Any]:
        """``storage_options`` for s3fs pointing at this server."""
        return {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": self.url, "region_name": REGION},
                **extra}

    def bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload(self, folder: Path, bucket: str, prefix: str) -> list[str]:
        """Upload every file of ``folder`` under ``s3://bucket/prefix/``; returns the Parquet URLs."""
        c = self.client()
        urls = []
        for p in sorted(folder.iterdir()):
            c.upload_file(str(p), bucket, f"{prefix}/{p.name}")
            if p.suffix == ".parquet":
                urls.append(f"s3://{bucket}/{prefix}/{p.name}")
        return urls

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def set_auth(self, enabled: bool) -> None:
        """Turn moto's IAM authentication on (every request must be signed by a known IAM key) or off."""
        import requests

        r = requests.post(f"{self.url}/moto-api/reset-auth", data=b"0" if enabled else b"inf", timeout=10)
        r.raise_for_status()

    def iam_keys(self, user: str) -> tuple[str, str]:
        """A new IAM user allowed everything, and its access key (create while auth is off)."""
        iam = self.client("iam")
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]


_lock = threading.Lock()
_state: dict[str, Any] = {"s3": None, "users": 0, "env": None}


def _acquire() -> S3:
    with _lock:
        if _state["s3"] is None:
            from moto.server import ThreadedMotoServer

            # Keep every request on this machine: no proxy for the server, no Ray usage reports.
            env = pytest.MonkeyPatch()
            no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY"), "127.0.0.1", "localhost") if x)
            env.setenv("NO_PROXY", no_proxy)
            env.setenv("no_proxy", no_proxy)
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            with time_limit(30, "starting moto"):
                server.start()
            host, port = server.get_host_and_port()
            assert host == "127.0.0.1"
            _state.update(s3=S3(f"http://{host}:{port}", server), env=env)
        _state["users"] += 1
        return _state["s3"]


def _release() -> None:
    with _lock:
        _state["users"] -= 1
        if _state["users"] == 0 and _state["s3"] is not None:
            _state["s3"].server.stop()
            _state["env"].undo()
            _state.update(s3=None, env=None)


def serve_s3() -> Iterator[S3]:
    """Body of a session fixture: the moto S3 server on 127.0.0.1 (one per test run, stopped at
    the end of the session)."""
    server = _acquire()
    try:
        yield server
    finally:
        _release()
