"""A real S3 endpoint for the remote-tier tests (a pytest plugin of tests/conftest.py): moto's
standalone server, as its own process on 127.0.0.1 (a free port), one per test worker that asks
for it; every test gets a bucket of its own."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kiln-test-key", "AWS_SECRET_ACCESS_KEY": "kiln-test-secret-5f0c9e",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log: Path

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"kiln-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, url: str, **extra: str) -> dict[str, str]:
        """What a Kiln process needs to use `url` on this server (credentials from the environment)."""
        return {**CREDENTIALS, "KILN_REMOTE": url, "KILN_REMOTE_ENDPOINT": self.endpoint, **extra}


def start_server(directory: Path, timeout_s: float = 60) -> S3Server:
    """moto's server on a free port of 127.0.0.1, objects spilled under `directory` (also for bench/)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "moto.log"
    env = {**os.environ, **CREDENTIALS, "TMPDIR": str(directory)}  # objects spill to files here, not /tmp
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return True
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}") from None
            return False

    deadline = time.monotonic() + timeout_s
    while not up():
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"moto server not up after {timeout_s:g} s: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return S3Server(endpoint, process, log)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("obstore", reason="the remote extra (setup.sh installs it)")
    pytest.importorskip("moto", reason="the test extra's moto[s3] (setup.sh installs it)")
    server = start_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture
def bucket_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """s3://<a new bucket>/team: credentials in this process's environment, as a user's would be."""
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3_server.new_bucket()}/team"
