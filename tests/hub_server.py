"""A Hugging Face Hub on loopback: the parts of its HTTP API that huggingface_hub's
snapshot_download and model_info speak (repo info by revision, with each file's size when
asked for blobs; the file tree; HEAD and GET of a file by commit), serving repositories made of local directories. Tests point loramux's
`--hub-endpoint` at it, so the online code path runs for real: revisions resolved to commits,
files fetched into a cache, not-found and server errors answered as the Hub answers them."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


class LocalHub:
    def __init__(self):
        self.repos: dict[str, dict[str, Path]] = {}  # repo id -> commit -> directory
        self.refs: dict[str, dict[str, str]] = {}  # repo id -> branch or tag -> commit
        self.failures = 0  # answer this many next requests with 503 (a Hub having a bad moment)
        self.requests: list[str] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo_id: str, directory: Path, refs: tuple[str, ...] = ("main",)) -> str:
        """Publish `directory` as a new commit of `repo_id`; the refs point at it. Returns the commit."""
        digest = hashlib.sha1()
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            digest.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
        digest.update(repo_id.encode())
        commit = digest.hexdigest()
        self.repos.setdefault(repo_id, {})[commit] = directory
        for ref in refs:
            self.refs.setdefault(repo_id, {})[ref] = commit
        return commit

    # -- the API ------------------------------------------------------------------------

    def _answer(self, request: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(request.path)
        path = unquote(url.path)
        blobs = parse_qs(url.query).get("blobs", [""])[0].lower() == "true"
        with self._lock:
            self.requests.append(f"{'HEAD' if head else 'GET'} {path}")
            failing = self.failures > 0
            self.failures -= failing
        if failing:
            return self._send(request, 503, b'{"error": "unavailable"}', head)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            return self._api(request, parts[2:], head, blobs)
        if len(parts) >= 5 and parts[2] == "resolve":  # /<org>/<name>/resolve/<revision>/<file...>
            return self._file(request, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._send(request, 404, b'{"error": "not found"}', head, {"X-Error-Code": "RepoNotFound"})

    def _commit(self, repo_id: str, revision: str) -> str | None:
        commits = self.repos.get(repo_id, {})
        return revision if revision in commits else self.refs.get(repo_id, {}).get(revision)

    def _api(self, request, parts: list[str], head: bool, blobs: bool = False) -> None:
        # models/<org>/<name>[/revision/<rev>]  or  models/<org>/<name>/tree/<rev>[/path]
        repo_id, kind, revision = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "revision", parts[3] if len(parts) > 3 else "main"
        if repo_id not in self.repos:
            return self._send(request, 404, b'{"error": "Repository not found"}', head, {"X-Error-Code": "RepoNotFound"})
        commit = self._commit(repo_id, revision)
        if commit is None:
            return self._send(request, 404, b'{"error": "Invalid rev id"}', head, {"X-Error-Code": "RevisionNotFound"})
        files = sorted(p for p in self.repos[repo_id][commit].rglob("*") if p.is_file())
        root = self.repos[repo_id][commit]
        if kind == "revision":
            body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "disabled": False,
                    "siblings": [{"rfilename": p.relative_to(root).as_posix(),
                                  **({"size": p.stat().st_size} if blobs else {})} for p in files]}
        elif kind == "tree":
            body = [{"type": "file", "path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]
        else:
            return self._send(request, 404, b'{"error": "not found"}', head)
        self._send(request, 200, json.dumps(body).encode(), head, {"Content-Type": "application/json"})

    def _file(self, request, repo_id: str, revision: str, name: str, head: bool) -> None:
        if repo_id not in self.repos:
            return self._send(request, 404, b"", head, {"X-Error-Code": "RepoNotFound"})
        commit = self._commit(repo_id, revision)
        if commit is None:
            return self._send(request, 404, b"", head, {"X-Error-Code": "RevisionNotFound"})
        path = self.repos[repo_id][commit] / name
        if not path.is_file():
            return self._send(request, 404, b"", head, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        data = path.read_bytes()
        self._send(request, 200, data, head, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                              "Content-Type": "application/octet-stream"})

    @staticmethod
    def _send(request, status: int, body: bytes, head: bool, headers: dict | None = None) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if not head:
            request.wfile.write(body)
