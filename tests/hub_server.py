"""A loopback Hugging Face Hub for tests, written with the standard library only.

It implements the part of the Hub HTTP API that `huggingface_hub` 2.x calls to create
repos and branches, commit files (regular and Git LFS uploads; no Xet, so clients need
`HF_HUB_DISABLE_XET=1`), list and download them. Repos live in memory and survive
`stop()` / `start()`, so a test can take the Hub down and bring it back.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

# Patterns of the `.gitattributes` the Hub writes in every new repo (abridged).
LFS_PATTERNS = (
    *("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gz", "*.h5", "*.joblib"),
    *("*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet"),
    *("*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors"),
    *("saved_model/**/*", "*.tar", "*.tflite", "*.tgz", "*.xz", "*.zip", "*.zst"),
)
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)

# (method, path regex, handler, access): access is "read" or "write" for repo routes
# (private repos and writes need a token), "signed" for the LFS upload URL the batch
# API hands out (no token, like a signed S3 URL), None for routes outside repos.
_API = r"/api/(?P<kind>models|datasets|spaces)/(?P<repo_id>[^/]+/[^/]+)"
_WEB = r"/(?P<kind>datasets/|spaces/)?(?P<repo_id>[^/]+/[^/]+?)"
_LFS = _WEB + r"\.git/info/lfs/objects"
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami", None),
    ("POST", r"/api/validate-yaml", "validate_yaml", None),
    ("POST", r"/api/repos/create", "create_repo", None),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", "info", "read"),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree", "read"),
    ("GET", _API + r"/refs", "refs", "read"),
    ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info", "read"),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "preupload", "write"),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", "commit", "write"),
    ("POST", _API + r"/branch/(?P<branch>[^/]+)", "create_branch", "write"),
    ("POST", _LFS + r"/batch", "lfs_batch", "write"),
    ("PUT", _LFS + r"/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)", "lfs_upload", "signed"),
    ("POST", _LFS + r"/verify", "lfs_verify", "write"),
    ("GET", _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", "read"),
    ("HEAD", _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", "read"),
]
KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True)
class Blob:
    """File content and how the repo stores it: a plain git blob or an LFS object."""

    data: bytes
    lfs: bool = False

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The LFS pointer file git stores in place of the content."""
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def oid(self) -> str:
        """Git blob id (of the pointer file for LFS files, as on the Hub)."""
        data = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    @property
    def etag(self) -> str:
        """ETag of `resolve`: sha256 for LFS files, git blob id for regular ones."""
        return self.sha256 if self.lfs else self.oid

    def lfs_info(self, sha_key: str = "oid") -> dict[str, Any] | None:
        if not self.lfs:
            return None
        size = len(self.data)
        return {sha_key: self.sha256, "size": size, "pointerSize": len(self.pointer)}

    def entry(self, path: str) -> dict[str, Any]:
        """A file entry of the tree and paths-info APIs."""
        entry = {"type": "file", "oid": self.oid, "size": len(self.data), "path": path}
        return entry | ({"lfs": self.lfs_info()} if self.lfs else {})


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, Blob]
    date: str = field(default_factory=_now)

    def folders(self) -> set[str]:
        """Every folder holding a file, at any depth."""
        files = self.files
        return {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}

    def folder_entry(self, path: str) -> dict[str, Any]:
        return {"type": "directory", "oid": _id(f"{self.oid}:{path}"), "path": path}


@dataclass
class Repo:
    kind: str  # "model", "dataset" or "space"
    repo_id: str
    private: bool
    created_at: str = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content

    def resolve(self, revision: str) -> Commit:
        """The commit of a branch or of a full commit oid."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def commit(self, branch: str, files: dict[str, Blob], title: str) -> Commit:
        seed = f"{self.repo_id}:{branch}:{title}:{secrets.token_hex(8)}"
        new = Commit(oid=_id(seed), title=title, files=files)
        self.commits[new.oid] = new
        self.branches[branch] = new.oid
        return new


class HubError(Exception):
    """An error answer; `code` goes to `X-Error-Code`, which the client maps to its
    exceptions (RepoNotFound, RevisionNotFound, EntryNotFound)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes

    @property
    def token(self) -> str | None:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return token.strip() or None

    def json(self) -> Any:
        return json.loads(self.body or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(obj: Any, status: int = 200, media: str = "application/json") -> Response:
    return Response(status, json.dumps(obj).encode(), {"Content-Type": media})


class HubServer:
    """In-memory Hub on 127.0.0.1; any bearer token authenticates as `user`.

    A file is stored with LFS when its path matches an LFS rule of the repo's
    `.gitattributes`, or when it weighs `lfs_threshold` bytes or more. `requests` logs
    the `(method, path)` of every request, for assertions.
    """

    def __init__(self, port: int = 0, *, user: str = "test-user", lfs_threshold: int = 10**7):
        self.port, self.user, self.lfs_threshold = port, user, lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> Self:
        """Serve from a background thread; a restart reuses the port and the repos."""
        if self._httpd is None:
            self._httpd = _HTTPServer(("127.0.0.1", self.port), self)
            self.port = self._httpd.server_address[1]
            serve = partial(self._httpd.serve_forever, poll_interval=0.05)
            self._thread = threading.Thread(target=serve, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections: the Hub went away."""
        if self._httpd is None:
            return
        httpd, self._httpd = self._httpd, None
        httpd.shutdown()
        for conn in list(httpd.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(self, req: Request) -> Response:
        """Route a request to its handler; errors become Hub-style error answers."""
        with self._lock:
            self.requests.append((req.method, req.path))
            try:
                return self._dispatch(req)
            except HubError as err:
                response = _json({"error": err.message}, err.status)
                response.headers.update({"X-Error-Message": err.message, **err.headers})
                if err.code:
                    response.headers["X-Error-Code"] = err.code
                return response

    def _dispatch(self, req: Request) -> Response:
        for method, pattern, handler, access in ROUTES:
            match = re.fullmatch(pattern, req.path)
            if method != req.method or match is None:
                continue
            args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            if access is not None:
                kind = KINDS.get(args.pop("kind", "models").strip("/"), "model")
                args["repo"] = self._repo(kind, args.pop("repo_id"), req, access)
            return getattr(self, f"_{handler}")(req, **args)
        raise HubError(404, f"Not implemented by the test Hub: {req.method} {req.path}")

    def _repo(self, kind: str, repo_id: str, req: Request, access: str) -> Repo:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        needs_token = access == "write" or (access == "read" and repo.private)
        if needs_token and req.token is None:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.kind == "model" else f"{repo.kind}s/"
        return f"{self.url}/{prefix}{repo.repo_id}"

    # Account and repos.

    def _whoami(self, req: Request) -> Response:
        if req.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        token = {"displayName": "hub-server", "role": "write", "createdAt": _now()}
        return _json(
            {
                "type": "user",
                "id": _id(self.user)[:24],
                "name": self.user,
                "fullname": "Test User",
                "email": f"{self.user}@example.com",
                "emailVerified": True,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def _validate_yaml(self, req: Request) -> Response:
        """Only checks that the metadata block is closed; YAML is not parsed."""
        content = req.json().get("content", "")
        if content.startswith("---") and "\n---" not in content[3:]:
            error = {"message": "Metadata block is not closed"}
            return _json({"errors": [error], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _create_repo(self, req: Request) -> Response:
        if req.token is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = req.json()
        kind = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        visibility = payload.get("visibility") or "public"
        repo = Repo(kind=kind, repo_id=repo_id, private=visibility != "public")
        url = self._repo_url(repo)
        if (kind, repo_id) in self.repos:
            message = f"You already created this {kind} repo"
            return _json({"error": message, "url": url}, 409)
        initial = {".gitattributes": Blob(GITATTRIBUTES.encode())}
        repo.commit("main", initial, "initial commit")
        self.repos[(kind, repo_id)] = repo
        return _json({"url": url, "name": repo_id, "id": _id(url)[:24]})

    def _info(self, req: Request, repo: Repo, rev: str = "main") -> Response:
        commit = repo.resolve(rev)
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if req.flag("blobs"):
                sibling.update(size=len(blob.data), blobId=blob.oid)
                sibling.update({"lfs": blob.lfs_info("sha256")} if blob.lfs else {})
            siblings.append(sibling)
        return _json(
            {
                "_id": _id(repo.repo_id)[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _refs(self, req: Request, repo: Repo) -> Response:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in repo.branches.items()
        ]
        refs = {"branches": branches, "converts": [], "tags": [], "pullRequests": []}
        return _json(refs)

    def _create_branch(self, req: Request, repo: Repo, branch: str) -> Response:
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(req.json().get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        return Response()

    # Listing.

    def _tree(self, req: Request, repo: Repo, rev: str, path: str = "") -> Response:
        commit = repo.resolve(rev)
        folders = commit.folders()
        if path and path not in folders:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        prefix = f"{path}/" if path else ""
        entries = [b.entry(p) for p, b in commit.files.items() if p.startswith(prefix)]
        entries += [commit.folder_entry(p) for p in folders if p.startswith(prefix)]
        if not req.flag("recursive"):
            entries = [e for e in entries if "/" not in e["path"][len(prefix) :]]
        return _json(sorted(entries, key=lambda e: e["path"]))

    def _paths_info(self, req: Request, repo: Repo, rev: str) -> Response:
        """Entries of the requested paths that exist; the body is form-encoded."""
        commit = repo.resolve(rev)
        folders, entries = commit.folders(), []
        for path in parse_qs(req.body.decode()).get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append(commit.files[path].entry(path))
            elif path in folders:
                entries.append(commit.folder_entry(path))
        return _json(entries)

    # Uploads: preupload decides regular or LFS; LFS content goes through the batch
    # API (upload and verify actions pointing back to this server), then the commit.

    def _is_lfs(self, commit: Commit, path: str, size: int) -> bool:
        attributes = commit.files.get(".gitattributes", Blob(b"")).data
        for line in attributes.decode(errors="replace").splitlines():
            pattern, *attrs = line.split() or [""]
            name = path if "/" in pattern else path.rsplit("/", 1)[-1]
            if "filter=lfs" in attrs and fnmatch.fnmatch(name, pattern):
                return True
        return size >= self.lfs_threshold

    def _preupload(self, req: Request, repo: Repo, rev: str) -> Response:
        """Upload mode of each file, and the oid of the file it would replace, which
        the client compares to skip unchanged files."""
        commit, files = repo.resolve(rev), []
        for file in req.json()["files"]:
            lfs = self._is_lfs(commit, file["path"], file["size"])
            remote = commit.files.get(file["path"])
            files.append(
                {
                    "path": file["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote and (remote.sha256 if remote.lfs else remote.oid),
                }
            )
        return _json({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, req: Request, repo: Repo) -> Response:
        payload = req.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are implemented")
        base = f"{self._repo_url(repo)}.git/info/lfs/objects"
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:  # no actions: already uploaded
                answer["actions"] = {
                    "upload": {"href": f"{base}/{oid}/{size}", "header": {}},
                    "verify": {"href": f"{base}/verify", "header": {}},
                }
            objects.append(answer)
        answer = {"transfer": "basic", "objects": objects}
        return _json(answer, media="application/vnd.git-lfs+json")

    def _lfs_upload(self, req: Request, repo: Repo, oid: str, size: str) -> Response:
        if len(req.body) != int(size) or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, f"Content does not match LFS object {oid} ({size} B)")
        repo.lfs_objects[oid] = req.body
        return Response()

    def _lfs_verify(self, req: Request, repo: Repo) -> Response:
        payload = req.json()
        if len(repo.lfs_objects.get(payload["oid"], b"")) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
        return _json({"success": True})

    def _commit(self, req: Request, repo: Repo, rev: str) -> Response:
        """Apply an ndjson commit (header, file, lfsFile, deletedFile, deletedFolder)
        on top of branch `rev`."""
        if req.flag("create_pr"):
            raise HubError(400, "Pull requests are not implemented by the test Hub")
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = repo.resolve(rev)
        files, title = dict(head.files), ""
        for line in filter(str.strip, req.body.decode().splitlines()):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value["summary"]
                if value.get("parentCommit") not in (None, head.oid):
                    raise HubError(412, "A commit has happened since the parent commit")
            elif key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]))
            elif key == "lfsFile" and value["oid"] in repo.lfs_objects:
                files[value["path"]] = Blob(repo.lfs_objects[value["oid"]], lfs=True)
            elif key == "lfsFile":
                raise HubError(422, f"LFS object of {value['path']} was not uploaded")
            elif key == "deletedFile" and value["path"] in files:
                del files[value["path"]]
            elif key == "deletedFile":
                message = f"A file with this name doesn't exist: {value['path']}"
                raise HubError(404, message, "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        new = repo.commit(rev, files, title)
        return _json(
            {
                "success": True,
                "commitOid": new.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{new.oid}",
                "pullRequestUrl": None,
            }
        )

    # Downloads.

    def _resolve(self, req: Request, repo: Repo, rev: str, path: str) -> Response:
        """File content with the headers `hf_hub_download` relies on (a 200, where the
        Hub redirects LFS files to its CDN)."""
        commit = repo.resolve(rev)
        blob = commit.files.get(path)
        if blob is None:
            headers = {"X-Repo-Commit": commit.oid}
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = headers["ETag"]
            headers["X-Linked-Size"] = str(len(blob.data))
        return Response(200, blob.data, headers)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer):
        self.hub = hub
        self.connections: set[socket.socket] = set()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 plumbing: always read the whole body (keep-alive), let
    `HubServer.handle` answer, write the answer with its Content-Length."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    def _serve(self) -> None:
        url, body = urlsplit(self.path), self._read_body()
        query = parse_qs(url.query)
        request = Request(self.command, url.path, query, self.headers, body)
        response = self.server.hub.handle(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _serve
