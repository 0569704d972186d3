"""A Hugging Face Hub on 127.0.0.1 for tests: olah serves the reads, a small front here takes the writes.

olah (PyPI `olah`, installed by `pip install -e ".[test]"`) runs offline and serves git repositories
laid out as `<mirrors>/models/<org>/<name>` with the Hub's read API (repo info, resolve, paths-info,
tree), so `hf_hub_download` and `from_pretrained("org/name")` work against it. No server on PyPI
accepts uploads, so the front answers the write side of what huggingface_hub speaks (create repo,
validate-yaml, preupload, NDJSON commit) and writes each commit into the mirror's git repository,
where olah serves it at once; every other request goes to olah. The front also covers olah's gaps:
repo info without a revision (olah: 401), a missing file or folder (olah: 401 or 500; the Hub: 404
EntryNotFound, which huggingface_hub and transformers rely on) and redirects that would bypass the front.

Writes need `Authorization: Bearer <token>` (401 otherwise) and a namespace of the token's user or
its orgs (403 otherwise). Every file is uploaded "regular" (base64 inside the commit), never through
LFS or Xet as the real Hub does for weights. Requests are logged as (method, path, status, bearer).
"""

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from conftest import free_port

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "hub", "GIT_AUTHOR_EMAIL": "hub@127.0.0.1",
                "GIT_COMMITTER_NAME": "hub", "GIT_COMMITTER_EMAIL": "hub@127.0.0.1"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # (method, pattern, handler name); the first match wins, no match goes to olah
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/models/{REPO}", "repo_info"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "existing_path"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)/(?P<path>.+)", "existing_path"),
]


class HubError(Exception):
    """An error answer: JSON {"error": message, **extra}, with the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class LocalHub:
    """`with LocalHub(root, token) as hub:` point HF_ENDPOINT at `hub.url`."""

    def __init__(self, root: Path, token: str, user: str = "me", orgs: tuple[str, ...] = ("org",)):
        self.root, self.token, self.user, self.namespaces = Path(root), token, user, {user, *orgs}
        self.mirrors = self.root / "mirrors"
        self.log: list[tuple[str, str, int, str | None]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._olah_port = free_port()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def repo_dir(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def git(self, repo_id: str, *args: str, data: bytes | None = None, check: bool = True) -> str:
        env = {**os.environ, **GIT_IDENTITY, "GIT_INDEX_FILE": str(self.repo_dir(repo_id) / ".git" / "hub-index")}
        result = subprocess.run(["git", *args], cwd=self.repo_dir(repo_id), input=data, capture_output=True, env=env)
        if check and result.returncode:
            raise RuntimeError(f"git {' '.join(args)}: {result.stderr.decode()}")
        return result.stdout.decode().strip() if result.returncode == 0 else ""

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "LocalHub":
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self._olah_port}\nrepos-path = "{self.root / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n\n[accessibility]\noffline = true\n'
        )
        self._olah_log = open(self.root / "olah.log", "w")
        self._olah = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(config)],  # it logs to ./logs
                                      cwd=self.root, stdout=self._olah_log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while not self._olah_answers():
            if self._olah.poll() is not None or time.time() > deadline:
                self.__exit__()
                raise RuntimeError(f"olah did not start: {(self.root / 'olah.log').read_text()[-2000:]}")
            time.sleep(0.1)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def _olah_answers(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self._olah_port, timeout=2)
            conn.request("GET", "/api/models/none/none/revision/main")
            conn.getresponse().read()
            return True
        except OSError:
            return False

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._olah.send_signal(signal.SIGINT)  # olah ignores SIGTERM
        try:
            self._olah.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._olah.kill()
        self._olah_log.close()

    # --- the write side ----------------------------------------------------------------------

    def _authorize(self, bearer: str | None, namespace: str) -> None:
        if bearer != self.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        if namespace not in self.namespaces:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')

    def _existing(self, repo: str, rev: str, branch: bool = False) -> str:
        """The commit `rev` names in `repo` (a branch only, for writes)."""
        if not (self.repo_dir(repo) / ".git").is_dir():
            raise HubError(404, "Repository not found", "RepoNotFound")
        rev = urllib.parse.unquote(rev)
        head = self.git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{rev}" if branch else f"{rev}^{{commit}}", check=False)
        if not head:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return head

    def create_repo(self, body: bytes, bearer: str | None, **_) -> dict:
        payload = json.loads(body)
        namespace, name = payload.get("organization") or self.user, payload["name"]
        self._authorize(bearer, namespace)
        repo = f"{namespace}/{name}"
        with self._lock:
            if self.repo_dir(repo).exists():
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo}")
            self.repo_dir(repo).mkdir(parents=True)
            self.git(repo, "init", "-q", "-b", "main")
            self._write_commit(repo, None, [("file", ".gitattributes", GITATTRIBUTES)], "initial commit")
        return {"url": f"{self.url}/{repo}", "name": repo, "id": repo}

    def validate_yaml(self, body: bytes, **_) -> dict:
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, flags=re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            raise HubError(400, "Invalid YAML", "BadRequest") from err
        errors = [] if isinstance(metadata, dict) else ["metadata is not a mapping"]
        errors += [f'"{k}" must be a string' for k in ("license", "library_name", "pipeline_tag")
                   if isinstance(metadata, dict) and not isinstance(metadata.get(k, ""), str)]
        if errors:
            raise HubError(400, "Invalid metadata", "BadRequest", errors=[{"message": e} for e in errors])
        return {"warnings": []}

    def preupload(self, repo: str, rev: str, body: bytes, bearer: str | None, **_) -> dict:
        self._authorize(bearer, repo.split("/")[0])
        head = self._existing(repo, rev, branch=True)
        files = []
        for item in json.loads(body)["files"]:
            oid = self.git(repo, "rev-parse", "--verify", "--quiet", f"{head}:{item['path']}", check=False) or None
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return {"files": files, "commitOid": head}

    def commit(self, repo: str, rev: str, body: bytes, bearer: str | None, **_) -> dict:
        self._authorize(bearer, repo.split("/")[0])
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        ops = []
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                ops.append(("file", value["path"], base64.b64decode(value["content"])))
            elif line["key"] in ("deletedFile", "deletedFolder"):
                ops.append(("delete", value["path"].rstrip("/"), b""))
            elif line["key"] != "header":
                raise HubError(400, f"{line['key']} is not supported by this test Hub (it asks for regular uploads)")
        with self._lock:
            head = self._existing(repo, rev, branch=True)
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
            sha = self._write_commit(repo, head, ops, message, branch=urllib.parse.unquote(rev))
        return {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None, "success": True}

    def _write_commit(self, repo: str, parent: str | None, ops: list, message: str, branch: str = "main") -> str:
        """A commit built with git plumbing (no working tree, no filters): blobs are the bytes uploaded."""
        self.git(repo, "read-tree", *([parent] if parent else ["--empty"]))
        for kind, path, content in ops:
            if kind == "file":
                blob = self.git(repo, "hash-object", "-w", "--no-filters", "--stdin", data=content)
                self.git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
            else:
                for listed in self.git(repo, "ls-files", "--", path).splitlines():
                    self.git(repo, "update-index", "--force-remove", "--", listed)
        tree = self.git(repo, "write-tree")
        sha = self.git(repo, "commit-tree", "--no-gpg-sign", tree, *(["-p", parent] if parent else []), "-m", message)
        self.git(repo, "update-ref", f"refs/heads/{branch}", sha)
        return sha

    # --- the read side: olah, with the front's fixes ---------------------------------------------

    def repo_info(self, repo: str, query: str, **_):
        return ("proxy", f"/api/models/{repo}/revision/main{query}")  # olah answers 401 without a revision

    def existing_path(self, repo: str, rev: str, path: str, **_):
        """olah answers 401 or 500 for a missing file or folder; the Hub: 404 EntryNotFound."""
        if (self.repo_dir(repo) / ".git").is_dir():
            head = self._existing(repo, rev)
            if not self.git(repo, "rev-parse", "--verify", "--quiet", f"{head}:{urllib.parse.unquote(path)}", check=False):
                raise HubError(404, "Entry not found", "EntryNotFound")
        return ("proxy", None)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _route(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                query = f"?{parsed.query}" if parsed.query else ""
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ") or None
                method = "GET" if self.command == "HEAD" else self.command
                try:
                    for verb, pattern, name in ROUTES:
                        match = re.fullmatch(pattern, parsed.path)
                        if verb == method and match:
                            result = getattr(hub, name)(**match.groupdict(), body=body, bearer=bearer, query=query)
                            if isinstance(result, tuple):  # ("proxy", path or None)
                                return self._proxy(result[1] or self.path, body, bearer)
                            return self._reply(200, json.dumps(result).encode(), bearer)
                    self._proxy(self.path, body, bearer)
                except HubError as err:
                    headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
                    headers |= {"X-Error-Code": err.code} if err.code else {}
                    self._reply(err.status, json.dumps({"error": err.message} | err.extra).encode(), bearer, headers)
                except Exception as err:  # a bug here: answer it (tests assert `hub.errors` is empty)
                    hub.errors.append(f"{self.command} {self.path}: {err!r}")
                    self._reply(500, json.dumps({"error": repr(err)}).encode(), bearer)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _route

            def _reply(self, status: int, data: bytes, bearer, headers: dict | None = None, length: str | None = None):
                hub.log.append((self.command, self.path, status, bearer))
                self.send_response(status)
                for key, value in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _proxy(self, path: str, body: bytes, bearer) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", hub._olah_port, timeout=120)
                skip = {"host", "connection", "accept-encoding", "content-length"}
                conn.request(self.command, path, body=body or None, headers={k: v for k, v in self.headers.items() if k.lower() not in skip})
                response = conn.getresponse()
                data = response.read()
                olah = f"http://127.0.0.1:{hub._olah_port}"
                headers = {k: v.replace(olah, hub.url) for k, v in response.getheaders()
                           if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server")}
                self._reply(response.status, data, bearer, headers, response.getheader("content-length") if self.command == "HEAD" else None)

        return Handler
