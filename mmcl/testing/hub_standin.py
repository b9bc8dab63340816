"""A small in-memory Hugging Face Hub stand-in on 127.0.0.1, for offline tests of push and pull.

It answers the HTTP API that ``huggingface_hub`` uses to create a repo, create a branch,
preupload (every file in ``regular`` mode, so no LFS/Xet storage is needed), commit, read repo
info and trees, and resolve/download files, with token-based write permissions per namespace
and private repos. Point a client at it with ``HfApi(endpoint=server.url)`` or the
``HF_ENDPOINT`` environment variable::

    with HubStandIn(tokens={"hf_secret": "alice"}) as hub:
        subprocess.run([..., "mmcl", "push", ...], env={**os.environ, "HF_ENDPOINT": hub.url,
                                                          "HF_TOKEN": "hf_secret"})

``python -m mmcl.testing.hub_standin --token T --user alice`` serves one until interrupted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

EMPTY = "0" * 40


def blob_oid(data: bytes) -> str:
    """Git's blob id of ``data`` (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One model repo: commits (sha -> files) and branches (name -> sha)."""

    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=lambda: {EMPTY: {}})
    branches: dict[str, str] = field(default_factory=lambda: {"main": EMPTY})
    messages: list[str] = field(default_factory=list)

    def files(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) of a branch name or commit sha, or None."""
        sha = self.branches.get(revision, revision)
        return (sha, self.commits[sha]) if sha in self.commits else None


class HubStandIn:
    """The server; ``repos`` and ``requests`` (method, path, lower-cased headers) are open to inspection."""

    def __init__(self, tokens: dict[str, str], orgs: dict[str, set[str]] | None = None, port: int = 0):
        self.tokens, self.orgs = dict(tokens), orgs or {}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HubStandIn:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def user(self, headers: Any) -> str | None:
        auth = headers.get("Authorization", "")
        return self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, set()))

    def can_read(self, user: str | None, repo_id: str) -> bool:
        repo = self.repos.get(repo_id)
        return repo is not None and (not repo.private or self.can_write(user, repo_id.split("/")[0]))


_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", _REPO + r"/branch/(?P<rev>[^/]+)", "create_branch"),
    ("GET", _REPO + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        # -- plumbing -------------------------------------------------------------------------
        def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            self.query = parse_qs(url.query)
            # read the whole body first: on a kept-alive connection, unread bytes would be taken
            # for the next request
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with hub.lock:
                hub.requests.append((self.command, url.path, {k.lower(): v for k, v in self.headers.items()}))
            for method, pattern, name in ROUTES:
                m = re.fullmatch(pattern, url.path)
                if m and method == self.command:
                    args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    with hub.lock:
                        return getattr(self, name)(**args)
            self._error(404, f"no route for {self.command} {url.path}")

        do_GET = do_POST = do_HEAD = _dispatch

        def _readable(self, repo: str) -> Repo | None:
            if not hub.can_read(hub.user(self.headers), repo):
                self._error(401, "Repository not found", "RepoNotFound")
                return None
            return hub.repos[repo]

        def _writable(self, repo: str) -> Repo | None:
            user = hub.user(self.headers)
            if repo not in hub.repos:
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if not hub.can_write(user, repo.split("/")[0]):
                self._error(401 if user is None else 403, "You don't have the rights to write to this repo")
                return None
            return hub.repos[repo]

        def _snapshot(self, repo: str, rev: str) -> tuple[Repo, str, dict[str, bytes]] | None:
            """(repo, commit sha, files) readable at ``rev``, or None after answering the error."""
            r = self._readable(repo)
            if r is None:
                return None
            found = r.files(rev)
            if found is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return None
            return r, *found

        # -- routes ---------------------------------------------------------------------------
        def create_repo(self) -> None:
            payload = json.loads(self.body)
            user = hub.user(self.headers)
            namespace = payload.get("organization") or user
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            repo_id = f"{namespace}/{payload['name']}"
            if not hub.can_write(user, namespace):
                return self._error(403, f"You don't have the rights to create a model under the namespace "
                                        f"\"{namespace}\"")
            if repo_id in hub.repos:
                return self._error(409, "You already created this model repo")
            hub.repos[repo_id] = Repo(private=payload.get("visibility", "public") == "private"
                                      or bool(payload.get("private")))
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def validate_yaml(self) -> None:
            content = json.loads(self.body)["content"]
            try:
                front = content.split("---", 2)[1] if content.startswith("---") else ""
                yaml.safe_load(front)
            except (IndexError, yaml.YAMLError) as e:
                return self._send(400, {"errors": [{"message": str(e)}]})
            self._send(200, {"errors": [], "warnings": []})

        def preupload(self, repo: str, rev: str) -> None:
            if self._writable(repo) is None:
                return
            files = json.loads(self.body)["files"]
            self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]})

        def create_branch(self, repo: str, rev: str) -> None:
            r = self._writable(repo)
            if r is None:
                return
            if rev in r.branches:
                return self._error(409, f"Branch {rev} already exists")
            r.branches[rev] = r.branches["main"]
            self._send(200, {})

        def commit(self, repo: str, rev: str) -> None:
            r = self._writable(repo)
            if r is None:
                return
            if rev not in r.branches:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            files = dict(r.commits[r.branches[rev]])
            header = {}
            for line in self.body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return self._error(400, f"the stand-in only accepts regular files, got {key!r}")
            parent = r.branches[rev]
            sha = hashlib.sha1(json.dumps([parent, header.get("summary"), sorted(
                (p, blob_oid(d)) for p, d in files.items())]).encode()).hexdigest()
            r.commits[sha], r.branches[rev] = files, sha
            r.messages.append(header.get("summary", ""))
            self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha, "success": True})

        def repo_info(self, repo: str, rev: str = "main") -> None:
            snap = self._snapshot(repo, rev)
            if snap is None:
                return
            r, sha, files = snap
            self._send(200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private,
                             "siblings": [{"rfilename": p} for p in sorted(files)]})

        def tree(self, repo: str, rev: str, path: str = "") -> None:
            snap = self._snapshot(repo, rev)
            if snap is None:
                return
            prefix = path.rstrip("/") + "/" if path else ""
            recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries: dict[str, dict[str, Any]] = {}
            for p, data in sorted(snap[2].items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                if "/" in rest and not recursive:
                    folder = prefix + rest.split("/")[0]
                    entries[folder] = {"type": "directory", "path": folder, "oid": EMPTY, "size": 0}
                else:
                    entries[p] = {"type": "file", "path": p, "size": len(data), "oid": blob_oid(data)}
            self._send(200, list(entries.values()))

        def resolve(self, repo: str, rev: str, path: str) -> None:
            snap = self._snapshot(repo, rev)
            if snap is None:
                return
            _, sha, files = snap
            if path not in files:
                return self._error(404, f"Entry not found: {path}", "EntryNotFound")
            self._send(200, raw=files[path], headers={"X-Repo-Commit": sha, "ETag": f'"{blob_oid(files[path])}"'})

    return Handler


def main() -> None:
    """Serve a stand-in until Ctrl-C (for trying ``mmcl push`` by hand)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--token", default="hf_standin_token")
    ap.add_argument("--user", default="mmcl-user")
    args = ap.parse_args()
    with HubStandIn({args.token: args.user}, port=args.port) as hub:
        print(f"Hub stand-in at {hub.url}: export HF_ENDPOINT={hub.url} HF_TOKEN=<the --token value> "
              f"(user {args.user!r}); Ctrl-C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
