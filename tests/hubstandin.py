"""A stand-in for the Hub on 127.0.0.1, speaking the part of its protocol ``huggingface_hub`` uses
to resolve a revision and download files, so the real client runs end to end in the tests:

- ``GET /api/models/OWNER/NAME[/revision/REV]`` (``model_info``): id, the commit (``sha``), and
  ``siblings`` with each file's size, git blob id and, for LFS files, ``lfs.sha256``;
- ``HEAD``/``GET /OWNER/NAME/resolve/REV/PATH``: ``X-Repo-Commit``, ``ETag`` (the git blob id, or
  the sha256 for LFS files, also as ``X-Linked-Etag``), ``X-Linked-Size``, ``Content-Length``, and
  ``Range: bytes=N-`` answered with 206;
- errors as the Hub sends them: 401 for a private repository without the right token, 404 with
  ``X-Error-Code: RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``.

Faults to order: ``drop`` (send half a file, then close the connection, for a number of requests),
``fail_after_drop`` (after the drops, answer 500 so the client gives up with half a file),
``corrupt`` (serve other bytes than the published hash describes), and ``stall`` (send half a
file, then wait until ``release`` is set).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    revisions: dict[str, str]
    token: str | None = None  # private: this bearer token is needed


@dataclass
class Faults:
    drop: dict[str, int] = field(default_factory=dict)  # file name -> connections still to cut
    fail_after_drop: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    stall: set[str] = field(default_factory=set)  # send half, then wait until `release` is set
    release: threading.Event = field(default_factory=threading.Event)


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], token: str | None = None) -> Repo:
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        repo = Repo(dict(files), commit, {"main": commit, commit: commit}, token)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> HubStandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _error(self, status: int, code: str | None, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    self._error(401, None, "Invalid username or password.")
                    return None
                return repo

            def do_GET(self) -> None:
                self._serve()

            def do_HEAD(self) -> None:
                self._serve()

            def _serve(self) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Range")))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                if m:
                    return self._info(m[1], m[2] or "main")
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    return self._file(m[1], m[2], m[3])
                self._error(404, None, "Not found")

            def _info(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if revision not in repo.revisions:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                siblings = []
                for name, data in repo.files.items():
                    s = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                    if name.endswith(LFS_SUFFIXES):
                        s["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                    siblings.append(s)
                body = json.dumps(
                    {"id": repo_id, "modelId": repo_id, "sha": repo.revisions[revision], "siblings": siblings}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _file(self, repo_id: str, revision: str, name: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if revision not in repo.revisions:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                if name not in repo.files:
                    return self._error(404, "EntryNotFound", f"{name} does not exist")
                data = repo.files[name]
                lfs = name.endswith(LFS_SUFFIXES)
                etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
                if name in hub.faults.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                with hub._lock:
                    dropping = hub.faults.drop.get(name, 0)
                    if self.command == "GET" and dropping:
                        hub.faults.drop[name] = dropping - 1
                    failing = self.command == "GET" and not dropping and name in hub.faults.fail_after_drop
                if failing:
                    return self._error(500, None, "Internal Error")
                start = 0
                rng = self.headers.get("Range")
                if self.command == "GET" and rng:
                    rm = re.fullmatch(r"bytes=(\d+)-", rng)
                    if rm is None or int(rm[1]) >= len(data):
                        return self._error(416, None, "Range Not Satisfiable")
                    start = int(rm[1])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.revisions[revision])
                self.send_header("ETag", f'"{etag}"')
                if lfs:
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                body = data[start:]
                if name in hub.faults.stall and not hub.faults.release.is_set():
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    hub.faults.release.wait(120)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if self.command == "GET" and dropping:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        return Handler
