"""Servers the remote-source tests start on 127.0.0.1: nginx (Debian's, which serves byte
ranges, with a log of the bytes it sends), moto's S3-compatible server (an emulator: no
other S3 server installs here), and a small HTTP server that dies after a few requests."""

import contextlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time

from tests.support.helpers import need


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc=None, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()[-2000:]!r}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class Nginx:
    def __init__(self, root, work, ranges: bool = True):
        need("nginx")
        self.port = free_port()
        self.log = os.path.join(work, "bytes.log")
        conf = os.path.join(work, "nginx.conf")
        temp = " ".join(
            f"{k}_temp_path {os.path.join(work, k)};"
            for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        with open(conf, "w") as f:
            f.write(
                f"daemon off; user root; worker_processes 1; pid {work}/nginx.pid;"
                f"error_log {work}/error.log; events {{ worker_connections 64; }}"
                f"http {{ {temp} log_format bytes '$request_uri $status $body_bytes_sent';"
                f"access_log {self.log} bytes;"
                f"server {{ listen 127.0.0.1:{self.port}; root {root};"
                + ("" if ranges else " max_ranges 0;")
                + " } }"
            )
        self.proc = subprocess.Popen(
            ["nginx", "-c", conf], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        _wait_port(self.port, self.proc)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def sent(self) -> int:
        """Bytes of bodies sent so far (nginx writes its log line as each request ends)."""
        with open(self.log) as f:
            return sum(int(line.split()[-1]) for line in f if line.strip())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.proc.stderr.close()


@contextlib.contextmanager
def nginx(root, work, ranges: bool = True):
    server = Nginx(str(root), str(work), ranges)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def moto_s3(work, files: dict[str, str], bucket: str = "backups"):
    """moto's server with a bucket holding files (key -> local path); yields the
    environment the commands need (credentials, endpoint)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], **_creds(env))
        s3.create_bucket(Bucket=bucket)
        for key, path in files.items():
            s3.upload_file(str(path), bucket, key)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stderr.close()


def _creds(env):
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@contextlib.contextmanager
def dying_server(path, die_after: int):
    """Serves one file with ranges; the request numbered die_after gets half its bytes,
    then the server stops listening (a server killed mid-read)."""
    data = open(path, "rb").read()
    state = {"requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self):
            state["requests"] += 1
            m = RANGE.match(self.headers.get("Range", ""))
            a = int(m[1]) if m else 0
            b = int(m[2]) + 1 if m and m[2] else len(data)
            body = data[a:b]
            self.send_response(206 if m else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Range", f"bytes {a}-{b - 1}/{len(data)}")
            self.end_headers()
            if state["requests"] >= die_after:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                threading.Thread(target=die).start()
                return
            self.wfile.write(body)

    def die():  # stop serving and stop listening: connections are refused from now on
        server.shutdown()
        server.server_close()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{os.path.basename(path)}"
    finally:
        server.shutdown()
        server.server_close()


def _wait_sock(path, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"server did not start: {proc.stderr.read()[-2000:]!r}")
        time.sleep(0.05)
