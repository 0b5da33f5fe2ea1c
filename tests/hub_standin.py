"""A stand-in for the Hugging Face Hub on loopback, for tests of `hf://` adapter sources.

It is a stand-in because no hub is reachable from the machines these tests run on: it answers the few routes
huggingface_hub 2.4 calls for what `serve.adapters.hf_source` does, the way huggingface.co answers them (the
`X-Error-Code` headers huggingface_hub turns into its errors, the `X-Repo-Commit` and `ETag` headers a download
needs), from folders on disk:

- `GET /api/models/{repo}[/revision/{rev}]`: the repo's info, `sha` the commit `rev` (or `main`) names (`model_info`);
- `POST /api/models/{repo}/paths-info/{rev}`: the files among the form's `paths`, with sizes (`get_paths_info`);
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: a file's metadata, then its bytes (`hf_hub_download`).

Each `push` is a commit (a copy of a folder) that its branch then names; private repos answer only `token`.
Every request is logged in `requests`, so tests can tell what was (not) downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "hf_standin_token"


@dataclass
class Repo:
    """A repo: its commits (sha → folder of files) and what each branch names."""

    private: bool = False
    commits: dict[str, Path] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, revision: str) -> str | None:
        return self.branches.get(revision) or (revision if revision in self.commits else None)


class StandInHub:
    """The stand-in hub, serving on a free loopback port between `start` and `stop` (or as a context manager)."""

    def __init__(self, root: Path, token: str = TOKEN) -> None:
        self.root = root
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request, in order."""
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the stand-in hub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def push(self, repo_id: str, files: Path, *, branch: str = "main", private: bool = False) -> str:
        """Commits the folder `files` (subfolders too) as the new head of `branch`; returns the commit's sha."""
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        repo.private = private
        digest = hashlib.sha1(f"{repo_id}\0{branch}\0{len(repo.commits)}".encode())
        for path in sorted(p for p in files.rglob("*") if p.is_file()):
            digest.update(path.relative_to(files).as_posix().encode() + b"\0" + path.read_bytes())
        sha = digest.hexdigest()
        folder = self.root / repo_id / sha
        shutil.copytree(files, folder, dirs_exist_ok=True)
        repo.commits[sha] = folder
        repo.branches[branch] = sha
        return sha

    def downloads(self) -> list[str]:
        """Paths of the file downloads (`GET .../resolve/...`) so far."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def start(self) -> StandInHub:
        hub = self

        class Handler(_Handler):
            standin = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StandInHub:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    standin: StandInHub
    _body = b""

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: tests read `requests`

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        self.standin.requests.append((method, path))
        self._body = self.rfile.read(int(self.headers.get("Content-Length", 0)))  # read even when refusing: keep-alive
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:  # no revision: the default branch
            self._api(method, "revision", "/".join(parts[2:4]), "main")
        elif parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] in ("revision", "paths-info"):
            self._api(method, parts[4], "/".join(parts[2:4]), unquote(parts[5]))
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            self._resolve(method, "/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])))
        else:
            self._answer(404, {"error": "Not Found"})

    def _api(self, method: str, route: str, repo_id: str, revision: str) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        folder = repo.commits[sha]
        if route == "revision" and method == "GET":
            siblings = [
                {"rfilename": p.relative_to(folder).as_posix()} for p in sorted(folder.rglob("*")) if p.is_file()
            ]
            self._answer(200, {"id": repo_id, "sha": sha, "private": repo.private, "siblings": siblings})
        elif route == "paths-info" and method == "POST":
            form = parse_qs(self._body.decode())
            entries = [_entry(folder, path) for path in form.get("paths", []) if (folder / path).is_file()]
            self._answer(200, entries)
        else:
            self._answer(405, {"error": "Method Not Allowed"})

    def _resolve(self, method: str, repo_id: str, revision: str, filename: str) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        file = repo.commits[sha] / filename
        if not file.is_file():
            self._answer(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
            return
        data = file.read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self._send(200, data, "application/octet-stream", headers, body=method == "GET")

    def _commit(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
        """The repo and the commit `revision` names, or None once the hub's error was answered."""
        repo = self.standin.repos.get(repo_id)
        if repo is not None and repo.private and self.headers.get("Authorization") != f"Bearer {self.standin.token}":
            # The hub answers a private repo without a valid token as it answers a missing one.
            self._answer(401, {"error": "Invalid username or password."}, {"X-Error-Code": "RepoNotFound"})
            return None
        if repo is None:
            self._answer(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        sha = repo.commit(revision)
        if sha is None:
            self._answer(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo, sha

    def _answer(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers or {}, body=self.command != "HEAD")

    def _send(self, status: int, data: bytes, kind: str, headers: dict[str, str], *, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


def _entry(folder: Path, path: str) -> dict[str, object]:
    """A paths-info entry as the hub gives it: safetensors files are in LFS (their `size` is the file's)."""
    data = (folder / path).read_bytes()
    entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
    if path.endswith(".safetensors"):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
