"""A Hugging Face hub on loopback, serving local directories as repositories: the endpoints
``huggingface_hub`` calls to download (revision info, the file tree, and each file's HEAD and GET).
Point ``HF_ENDPOINT`` at ``FakeHub.url``."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, Path]], token: str | None = None) -> None:
        """``repos[repo_id][revision]`` is the directory served as that revision; with ``token``,
        every request must carry it (a private repository)."""
        self.repos, self.token = repos, token
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                hub._answer(self, head=False)

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def commit(repo_id: str, revision: str) -> str:
        return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()

    def _revision(self, repo_id: str, rev: str) -> tuple[str, Path] | None:
        """(commit, directory) of a branch name or a commit hash."""
        for name, path in self.repos.get(repo_id, {}).items():
            if rev in (name, self.commit(repo_id, name)):
                return self.commit(repo_id, name), path
        return None

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path).strip("/")
        self.requests.append(f"{h.command} /{path}")
        if self.token is not None and h.headers.get("authorization") != f"Bearer {self.token}":
            return _send(h, 401, b'{"error": "Invalid credentials"}', {"X-Error-Code": "RepoNotFound"}, head)
        parts = path.split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:  # api/models/org/name/{revision|tree}/rev
            repo_id, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            if repo_id not in self.repos:
                return _send(h, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
            found = self._revision(repo_id, rev)
            if found is None:
                return _send(h, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head)
            commit, root = found
            files = sorted(p for p in root.rglob("*") if p.is_file())
            if kind == "tree":
                body = [_tree_entry(p, root) for p in files]
            else:
                siblings = [{"rfilename": str(p.relative_to(root))} for p in files]
                body = {"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings}
            return _send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if len(parts) >= 5 and parts[2] == "resolve":  # org/name/resolve/rev/file
            repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            found = self._revision(repo_id, rev) if repo_id in self.repos else None
            if found is None:
                return _send(h, 404, b"", {"X-Error-Code": "RepoNotFound"}, head)
            commit, root = found
            file = root / name
            if not file.is_file():
                return _send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = file.read_bytes()
            return _send(h, 200, data, {"ETag": f'"{_oid(file)}"', "X-Repo-Commit": commit}, head)
        _send(h, 404, b"", {}, head)


def _tree_entry(p: Path, root: Path) -> dict:
    return {"type": "file", "path": str(p.relative_to(root)), "size": p.stat().st_size, "oid": _oid(p)}


@functools.cache
def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _send(h: BaseHTTPRequestHandler, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
    h.send_response(code)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if not head:
        h.wfile.write(body)
