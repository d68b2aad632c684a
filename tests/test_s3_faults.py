"""S3 faults injected while other requests are in flight: the endpoint down (connection refused),
hung (accepts, never answers) or slow. The S3 adapter's request fails within the download timeout
with a clear 424 (or, when only slow, succeeds with the adapter's real output); streams already
decoding on other adapters keep their pace; the failure is counted; and once the endpoint is back
the same adapter loads (failures are not cached)."""

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import pytest

from tests.adapter_factory import SPECS
from tests.conftest import ADAPTER_PROMPTS, NEW_TOKENS, S3_ENV, ServerProcess, free_port, metric

DOWNLOAD_TIMEOUT_S = 6
FAILURES = ("loraserve_adapter_events_total", {"tier": "cpu", "event": "failure"})
MAX_TOKEN_GAP_S = 1.5  # a stalled loop would show the whole fault (seconds) as one gap


class FaultyProxy:
    """A TCP proxy on loopback in front of the S3 server: `mode` is pass, hang or slow; `down()` closes
    the listening socket so connections are refused, `up()` listens again on the same port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.port, self.mode = upstream_port, free_port(), "pass"
        self.delay_s = 0.15  # per forwarded chunk in "slow" mode: a download of a few seconds, under the timeout
        self._listener: socket.socket | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        self._listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: down
            threading.Thread(target=self._serve, args=(client, self.mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        if mode == "hang":
            time.sleep(60)  # read nothing, answer nothing
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pipe, args=(client, upstream, 0.0), daemon=True).start()
        self._pipe(upstream, client, self.delay_s if mode == "slow" else 0.0)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, delay_s: float) -> None:
        try:
            while data := source.recv(1 << 20):
                time.sleep(delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()


@pytest.fixture(scope="module")
def s3_adapters(s3_endpoint, adapter_root) -> str:
    """SPECS[0] uploaded under one prefix per scenario (a success is cached on disk, so each needs its own)."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_ENV["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket="faults")
    for prefix in ("down", "hang", "slow"):
        for f in (adapter_root / SPECS[0].name / "1").iterdir():
            s3.upload_file(str(f), "faults", f"{prefix}/attn/{f.name}")
    return "faults"


@pytest.fixture(scope="module")
def proxy(s3_endpoint) -> FaultyProxy:
    return FaultyProxy(int(s3_endpoint.rsplit(":", 1)[1]))


@pytest.fixture(scope="module")
def s3_server(loaded, adapter_root, proxy, tmp_path_factory):
    home = tmp_path_factory.mktemp("s3-home")
    os.symlink(loaded.model_dir.parent, home / "models", target_is_directory=True)  # no second conversion
    env = {**S3_ENV, "S3_ENDPOINT_URL": proxy.url, "LORASERVE_HOME": str(home),
           "LORASERVE_ADAPTERS_DIR": str(adapter_root), "LORASERVE_ADAPTER_DOWNLOAD_TIMEOUT_S": str(DOWNLOAD_TIMEOUT_S)}
    proc = ServerProcess("--max-batch-size", "8", env=env)
    yield proc.wait_ready()
    proc.stop()


def stream_with_gaps(url: str, adapter: str | None) -> tuple[int, float]:
    """A 40-token stream: (tokens received, longest gap between two of them)."""
    body = {"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 40, "ignore_eos_token": True,
                                                          "adapter_id": adapter}}
    tokens, gap, last = 0, 0.0, None
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                now = time.monotonic()
                gap, last, tokens = max(gap, now - last) if last else gap, now, tokens + 1
    return tokens, gap


def s3_generate(url: str, prefix: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = httpx.post(url + "/generate", timeout=120, json={"inputs": ADAPTER_PROMPTS[0], "parameters": {
        "max_new_tokens": NEW_TOKENS, "details": True, "adapter_id": f"s3://faults/{prefix}/attn"}})
    return r, time.monotonic() - started


@pytest.mark.parametrize("fault", ["down", "hang", "slow"])
def test_an_s3_fault_fails_only_its_own_request(s3_server, s3_adapters, proxy, references, fault):
    url = s3_server.url
    failures_before = metric(url, FAILURES[0], **FAILURES[1])
    expected = references[(SPECS[0].name, ADAPTER_PROMPTS[0])]
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(stream_with_gaps, url, a) for a in (None, f"{SPECS[1].name}/1", f"{SPECS[2].name}/1")]
        time.sleep(1.0)  # the others are decoding
        proxy.down() if fault == "down" else setattr(proxy, "mode", fault)
        try:
            response, took = pool.submit(s3_generate, url, fault).result()
        finally:
            proxy.up() if fault == "down" else setattr(proxy, "mode", "pass")
        streams = [future.result() for future in others]
    print(f"\ns3 {fault}: {response.status_code} after {took:.1f} s; other streams' longest token gaps "
          f"{[round(gap, 2) for _, gap in streams]} s")
    for tokens, gap in streams:
        assert tokens == 40 and gap < MAX_TOKEN_GAP_S, (fault, tokens, gap)

    if fault == "slow":
        assert response.status_code == 200, response.text
        assert [t["id"] for t in response.json()["details"]["tokens"]] == expected
        return
    assert response.status_code == 424, response.text
    assert response.json()["error_type"] == "generation" and "S3" in response.json()["error"]
    assert took < DOWNLOAD_TIMEOUT_S * 5 / 3 + 3, took  # the documented bound, plus the generation's own time
    assert metric(url, FAILURES[0], **FAILURES[1]) - failures_before == 1
    recovered, _ = s3_generate(url, fault)  # the endpoint is back: the same id loads now
    assert [t["id"] for t in recovered.json()["details"]["tokens"]] == expected
