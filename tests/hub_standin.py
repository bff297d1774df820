"""A Hugging Face Hub stand-in for tests: the Hub's HTTP API, as huggingface_hub uses it, served on 127.0.0.1.

Repositories are folders of files, each at one or more commits. `requests` records every (kind, repo, revision)
asked for, so a test can check which revision the code really requested. Point the code at it with
HF_ENDPOINT=<url>; no download function is mocked.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

KINDS = {"models": "", "datasets": "datasets/"}


class HubStandIn:
    """Serve `repos[(kind, repo_id)] = {"refs": {name: commit}, "commits": {commit: {path: bytes}}}`."""

    def __init__(self, repos: dict[tuple[str, str], dict]):
        self.repos, self.requests = repos, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, kind: str, repo_id: str, revision: str) -> str | None:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            return None
        return revision if revision in repo["commits"] else repo["refs"].get(revision)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                info = re.fullmatch(r"/api/(models|datasets)/(.+?)/revision/([^/]+)", path)
                if info:
                    kind, repo_id, revision = info.groups()
                    return self._info(kind, repo_id, revision, body)
                tree = re.fullmatch(r"/api/(models|datasets)/(.+?)/tree/([^/]+)(?:/.*)?", path)
                if tree:
                    return self._tree(*tree.groups(), body)
                for kind, prefix in KINDS.items():
                    found = re.fullmatch(rf"/{prefix}(?!datasets/)([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                    if found:
                        return self._file(kind, *found.groups(), body)
                self._send(404, b'{"error": "not found"}', body)

            def _info(self, kind: str, repo_id: str, revision: str, body: bool) -> None:
                hub.requests.append((kind, repo_id, revision))
                commit = hub.commit(kind, repo_id, revision)
                if commit is None:
                    return self._send(404, json.dumps({"error": f"{repo_id}@{revision} not found"}).encode(), body,
                                      {"X-Error-Code": "RevisionNotFound"})
                files = hub.repos[(kind, repo_id)]["commits"][commit]
                data = {"id": repo_id, "sha": commit, "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(files)]}
                self._send(200, json.dumps(data).encode(), body)

            def _tree(self, kind: str, repo_id: str, revision: str, body: bool) -> None:
                hub.requests.append((kind, repo_id, revision))
                commit = hub.commit(kind, repo_id, revision)
                if commit is None:
                    return self._send(404, b'{"error": "revision not found"}', body,
                                      {"X-Error-Code": "RevisionNotFound"})
                files = hub.repos[(kind, repo_id)]["commits"][commit]
                entries = [{"type": "file", "path": name, "size": len(content),
                            "oid": hashlib.sha1(content).hexdigest()} for name, content in sorted(files.items())]
                self._send(200, json.dumps(entries).encode(), body)

            def _file(self, kind: str, repo_id: str, revision: str, name: str, body: bool) -> None:
                hub.requests.append((kind, repo_id, revision))
                commit = hub.commit(kind, repo_id, revision)
                files = hub.repos[(kind, repo_id)]["commits"].get(commit, {}) if commit else {}
                if name not in files:
                    return self._send(404, b'{"error": "entry not found"}', body, {"X-Error-Code": "EntryNotFound"})
                content = files[name]
                self._send(200, content, body, {"X-Repo-Commit": commit,
                                                "ETag": f'"{hashlib.sha256(content).hexdigest()}"'})

            def _send(self, status: int, content: bytes, body: bool, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(content)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(content)

        return Handler


def local_repo(folder: Path) -> dict[str, bytes]:
    """The files of a local folder as a commit's {path: bytes}."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
