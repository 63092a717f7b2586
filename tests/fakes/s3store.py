"""A local S3-compatible store for tests: moto's server on a free loopback port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest

from pipeline.io import fs

moto_server = pytest.importorskip("moto.server")

BUCKET = "pipeline-data"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance metadata service
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server in a thread, on a free loopback port."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[pafs.S3FileSystem]:
    """A fresh bucket; the pipeline finds the store through the standard AWS variables."""
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    fs.s3_filesystem.cache_clear()
    store = pafs.S3FileSystem(
        endpoint_override=s3_endpoint, region="us-east-1", allow_bucket_creation=True, allow_bucket_deletion=True
    )
    store.create_dir(BUCKET)
    yield store
    store.delete_dir(BUCKET)
    fs.s3_filesystem.cache_clear()
