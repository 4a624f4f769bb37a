"""A small Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub's snapshot_download calls.

  GET  /api/models/{repo}/revision/{rev}      repo info (sha, siblings)
  GET  /api/models/{repo}/tree/{rev}          file listing (path, size, oid, lfs)
  HEAD /{repo}/resolve/{rev}/{path}           metadata: ETag, X-Repo-Commit, Content-Length
  GET  /{repo}/resolve/{rev}/{path}           the bytes (Range supported, for resumes)

Errors answer as the Hub does: 404 + X-Error-Code RepoNotFound, 401 + X-Error-Code GatedRepo for a
gated repo without an accepted token, 401 + "Invalid credentials in Authorization header" for an
unknown token. Every request is logged so tests can check what was (not) downloaded.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    allowed_tokens: set[str] = field(default_factory=set)
    sha: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class HubServer:
    def __init__(self, repos: dict[str, Repo], valid_tokens: set[str] = frozenset()):
        self.repos = repos
        self.valid_tokens = set(valid_tokens)
        self.log: list[Request] = []
        self.truncate: set[str] = set()  # file paths whose GETs are cut halfway (a dropped connection)
        # A misbehaving Hub, for every request: an HTTP status (403, 500, ...), "not_json" (an HTML page),
        # "bad_listing" (siblings and tree of the wrong JSON type), or "hang" (accept, never answer).
        self.fault: int | str | None = None
        self.hang_s = 30.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                server.handle(self, head=True)

            def do_GET(self):
                server.handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def downloads(self) -> list[str]:
        """Paths of files whose bytes were requested (GET on resolve)."""
        return [r.path for r in self.log if r.method == "GET" and "/resolve/" in r.path]

    # -- request handling -------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        auth = h.headers.get("Authorization")
        path = unquote(urlparse(h.path).path)
        self.log.append(Request("HEAD" if head else "GET", path, auth))
        if self.fault == "hang":
            time.sleep(self.hang_s)
            return
        if isinstance(self.fault, int):
            msg = {403: "Forbidden: this IP is blocked", 500: "Internal Server Error"}.get(self.fault, "error")
            return self.reply(h, self.fault, {"error": msg}, {"X-Error-Message": msg}, head)
        if self.fault == "not_json" and path.startswith("/api/"):
            return self.reply(h, 200, None, {}, head, raw=b"<html><body>Welcome to the captive portal</body></html>")
        m = (re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
             or re.fullmatch(r"/([^/]+/[^/]+)/(resolve)/([^/]+)/(.+)", path))
        if not m:
            return self.reply(h, 404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"}, head)
        repo_id, kind, _rev, rest = m.groups()
        repo = self.repos.get(repo_id)
        if repo is None:
            return self.reply(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
        token = auth.removeprefix("Bearer ") if auth else None
        if token is not None and token not in self.valid_tokens:
            msg = "Invalid credentials in Authorization header"
            return self.reply(h, 401, {"error": msg}, {"X-Error-Message": msg}, head)
        if repo.gated and token not in repo.allowed_tokens:
            msg = "Access to this model is restricted. You must have access to it and be authenticated."
            return self.reply(h, 401, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg}, head)
        if kind == "revision":
            info = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": [{"rfilename": p} for p in repo.files]}
            if self.fault == "bad_listing":
                info["siblings"] = 42
            return self.reply(h, 200, info, {}, head)
        if kind == "tree":
            listing = [self.tree_entry(p, b) for p, b in repo.files.items()]
            return self.reply(h, 200, {"files": 42} if self.fault == "bad_listing" else listing, {}, head)
        return self.send_file(h, repo, rest, head)

    @staticmethod
    def etag(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def tree_entry(self, path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if path.endswith((".safetensors", ".pth")):
            entry["lfs"] = {"oid": self.etag(data), "size": len(data), "pointerSize": 134}
        return entry

    def send_file(self, h: BaseHTTPRequestHandler, repo: Repo, path: str, head: bool) -> None:
        data = repo.files.get(path)
        if data is None:
            return self.reply(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head)
        start = 0
        rng = h.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(m.group(1))
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", f'"{self.etag(data)}"')
        h.send_header("X-Repo-Commit", repo.sha)
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if head:
            return
        if path in self.truncate:
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(body)

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, obj, headers: dict, head: bool, raw: bytes | None = None) -> None:
        body = json.dumps(obj).encode() if raw is None else raw
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)
