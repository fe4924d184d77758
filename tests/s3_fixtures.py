"""A real S3 endpoint on 127.0.0.1 for the s3:// tests: moto's standalone server (as s3fs and
zarr-python test theirs), started once per test session on a free port, with authentication on:
an IAM user's keys are accepted, any other keys refused (InvalidAccessKeyId), as on AWS."""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import urllib.request
import uuid
from typing import Iterator

import pytest

from http_fixtures import PROXY_VARS

REGION = "us-east-1"


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[dict]:
    """{"endpoint", "key", "secret"}: a running moto S3 server and the keys it accepts."""
    pytest.importorskip("obstore", reason="the s3 extra (pip install 'dvsgesture-kit[s3]')")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (the dev extra)")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines on stderr
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="lab")
        iam.put_user_policy(UserName="lab", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        k = iam.create_access_key(UserName="lab")["AccessKey"]
        # From now on moto checks every request's signature and key, as S3 does.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                           headers={"Content-Type": "text/plain"}))
        yield {"endpoint": endpoint, "key": k["AccessKeyId"], "secret": k["SecretAccessKey"]}
    finally:
        server.stop()


@pytest.fixture()
def s3(moto_server, monkeypatch) -> Iterator[dict]:
    """The environment of a user of the endpoint (keys, endpoint, region) and a fresh bucket:
    {"bucket", "client" (boto3, to look at and tamper with objects), **moto_server}."""
    import boto3

    for var in (*PROXY_VARS, "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server["endpoint"])
    monkeypatch.setenv("AWS_REGION", REGION)
    client = boto3.client("s3", endpoint_url=moto_server["endpoint"], region_name=REGION,
                          aws_access_key_id=moto_server["key"], aws_secret_access_key=moto_server["secret"])
    bucket = f"lab-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield {"bucket": bucket, "client": client, **moto_server}
