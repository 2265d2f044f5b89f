"""A local stand-in for the Hugging Face Hub's file API, enough for huggingface_hub's model_info,
hf_hub_download and snapshot_download (HF_ENDPOINT points at it):

    GET  /api/models/{org}/{repo}[/revision/{rev}]       model info: sha and the file list
    GET  /api/models/{org}/{repo}/tree/{rev}?recursive=1  the file tree (paths, sizes, blob ids)
    HEAD /{org}/{repo}/resolve/{rev}/{file}               X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{repo}/resolve/{rev}/{file}               the bytes

Unknown repos and revisions get the Hub's 404s (X-Error-Code RepoNotFound / RevisionNotFound). Every
request is recorded in `log`, so a test can tell which files were fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeRepo:
    def __init__(self, folder: Path) -> None:
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.sha = hashlib.sha1(b"".join(hashlib.sha1(v).digest() for v in self.files.values())).hexdigest()

    @staticmethod
    def blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, port: int) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[tuple[str, str]] = []
        self.auth: set[str] = set()  # Authorization headers seen (HF_TOKEN reaches the Hub)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub.log.append(("HEAD", self.path))
                hub.auth.add(self.headers.get("Authorization", ""))
                hub.answer(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub.log.append(("GET", self.path))
                hub.auth.add(self.headers.get("Authorization", ""))
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, repo_id: str, folder: Path) -> FakeRepo:
        self.repos[repo_id] = FakeRepo(folder)
        return self.repos[repo_id]

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self, name: str) -> int:
        """GETs of a file's bytes."""
        return sum(1 for m, p in self.log if m == "GET" and "/resolve/" in p and urlparse(p).path.endswith("/" + name))

    # ------------------------------------------------------------ routing

    def answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._repo(h, "/".join(parts[2:4]))
            if repo is None:
                return
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                if rest and not self._revision_ok(h, repo, rest[1]):
                    return
                body = {"id": "/".join(parts[2:4]), "modelId": "/".join(parts[2:4]), "sha": repo.sha, "private": False,
                        "siblings": [{"rfilename": f} for f in repo.files], "tags": [], "downloads": 0, "likes": 0}
                return self._json(h, body, head)
            if rest[0] == "tree" and len(rest) >= 2:
                if not self._revision_ok(h, repo, rest[1]):
                    return
                body = [{"type": "file", "oid": repo.blob_id(v), "size": len(v), "path": f} for f, v in repo.files.items()]
                return self._json(h, body, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(h, "/".join(parts[:2]))
            if repo is None or not self._revision_ok(h, repo, parts[3]):
                return
            name = "/".join(parts[4:])
            if name not in repo.files:
                return self._error(h, 404, "EntryNotFound", f"{name} not found")
            data = repo.files[name]
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("ETag", f'"{repo.blob_id(data)}"')
            h.send_header("X-Repo-Commit", repo.sha)
            h.send_header("Content-Type", "application/octet-stream")
            h.end_headers()
            if not head:
                h.wfile.write(data)
            return
        self._error(h, 404, "RepoNotFound", "not found")

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str) -> FakeRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _revision_ok(self, h: BaseHTTPRequestHandler, repo: FakeRepo, rev: str) -> bool:
        if rev in ("main", repo.sha):
            return True
        self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, body: object, head: bool) -> None:
        data = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
