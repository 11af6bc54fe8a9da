"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, storing repos on disk.

It speaks the subset of the Hub API that `huggingface_hub` and `transformers` use to create a repo, commit files to
it and download them again, so uploads can be tested (and demonstrated) without network access:

    with LocalHub(tmp_path / "hub") as hub:          # point HF_ENDPOINT at hub.endpoint before importing the client
        push_to_hub("outputs/my-model", "me/my-model")
        AutoModelForCausalLM.from_pretrained("me/my-model", trust_remote_code=True)

or from a shell: `python -m hybridzoo.testing.local_hub --root /tmp/hub --port 8765`, then `HF_ENDPOINT=http://127.0.0.1:8765`.

Storage, per repo (`ROOT/models/OWNER/NAME/`), works like git's: `blobs/<git-sha1>` hold file contents,
`commits/<sha>.json` hold a commit (parent, message, and the full file table `{path: {oid, size}}`), and `refs.json`
maps branch and pull-request names to commit shas. A commit writes its blobs and its commit file first and moves the
ref last, with an atomic rename: a commit that fails half-way leaves the previous head, and every file it names, intact.

Simplifications: `preupload` answers `uploadMode: "regular"` for every file, so file contents arrive base64-inlined
in the commit (no LFS or Xet); there are no tags, discussions, or gated repos. Tokens are accepted as they come unless
`LocalHub(token=...)` is given, in which case writes need that token. Tests can make the next requests to a route
fail (`fail_next`), to exercise retries and failed commits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hybridzoo.configs.settings import SettingsParser, add_command, setting
from hybridzoo.model_card import validate_card_metadata

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
LOCAL_USER = "local-user"


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub) gives a file's contents; `huggingface_hub` compares it to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer: status, the Hub's `X-Error-Code` (which `huggingface_hub` turns into typed errors), message."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


@dataclass
class Failure:
    """An injected failure: answer `status` (None: drop the connection without answering) with `message`."""

    status: int | None
    message: str


class RepoStore:
    """One repo on disk: blobs, commits and refs (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    # -- reading --
    def refs(self) -> dict[str, Any]:
        return json.loads((self.folder / "refs.json").read_text())

    def commit(self, sha: str) -> dict[str, Any]:
        return json.loads((self.folder / "commits" / f"{sha}.json").read_text())

    def blob(self, oid: str) -> bytes:
        return (self.folder / "blobs" / oid).read_bytes()

    def resolve(self, revision: str) -> str:
        """A branch name, `refs/heads/...`, `refs/pr/N` or a commit sha → commit sha (or a RevisionNotFound error)."""
        refs = self.refs()
        name = revision.removeprefix("refs/heads/")
        if name in refs["branches"]:
            return refs["branches"][name]
        if revision in refs["pull_requests"]:
            return refs["pull_requests"][revision]
        if len(revision) == 40 and (self.folder / "commits" / f"{revision}.json").exists():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # -- writing (callers hold the server's lock) --
    def write_refs(self, refs: dict[str, Any]) -> None:
        tmp = self.folder / "refs.json.tmp"
        tmp.write_text(json.dumps(refs, indent=1))
        os.replace(tmp, self.folder / "refs.json")  # atomic: readers see the old refs or the new ones

    def add_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self.folder / "blobs" / oid
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return oid

    def add_commit(self, parent: str | None, title: str, message: str, files: dict[str, dict]) -> str:
        record = {
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "time_ns": time.time_ns(),  # two identical commits in a row still get different shas
            "files": files,
        }
        sha = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        record["id"] = sha
        (self.folder / "commits" / f"{sha}.json").write_text(json.dumps(record, indent=1))
        return sha


class LocalHub:
    """The server: `start()`/`stop()` or a `with` block; `endpoint` is the URL to put in `HF_ENDPOINT`."""

    def __init__(self, root: str | Path, port: int = 0, token: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lock = threading.Lock()
        self.request_log: list[tuple[str, str, int]] = []  # (method, path, status); headers (tokens) never logged
        self._failures: dict[str, list[Failure]] = {}
        # loopback only: this server has no authentication worth the name and must not be reachable from outside
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- test helpers --
    def fail_next(self, route: str, times: int = 1, status: int | None = 503, message: str = "injected") -> None:
        """Make the next `times` requests to `route` fail.

        Routes: create, validate-yaml, info, preupload, commit, branch, refs, commits, tree, paths-info, resolve.
        A failing `commit` fails mid-way: after its blobs are stored, before the branch moves.
        """
        self._failures.setdefault(route, []).extend(Failure(status, message) for _ in range(times))

    def take_failure(self, route: str) -> Failure | None:
        with self.lock:
            queue = self._failures.get(route)
            return queue.pop(0) if queue else None

    def repo(self, repo_type: str, repo_id: str) -> RepoStore:
        folder = self.root / f"{repo_type}s" / repo_id
        if not (folder / "refs.json").exists():
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return RepoStore(folder)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str | None:
        """The commit sha `revision` points to, or None if the repo or revision does not exist."""
        try:
            return self.repo(repo_type, repo_id).resolve(revision)
        except HubError:
            return None

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of `revision`, path → contents."""
        store = self.repo(repo_type, repo_id)
        table = store.commit(store.resolve(revision))["files"]
        return {path: store.blob(entry["oid"]) for path, entry in table.items()}

    # -- API operations, each returning (status, JSON body) or raising HubError --
    def create_repo(self, body: dict, authorized: bool) -> tuple[int, dict]:
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or LOCAL_USER
        repo_id = f"{namespace}/{body['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = {"url": f"{self.endpoint}/{prefix}{repo_id}"}
        folder = self.root / f"{repo_type}s" / repo_id
        with self.lock:
            if (folder / "refs.json").exists():
                return 409, {**url, "error": "You already created this model repo"}  # the client reads `url` even here
            for sub in ("blobs", "commits"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            store = RepoStore(folder)
            sha = store.add_commit(None, "initial commit", "", {})
            private = body.get("private") or body.get("visibility") == "private"
            store.write_refs({"branches": {"main": sha}, "pull_requests": {}, "private": bool(private)})
        return 200, url

    def repo_info(self, repo_type: str, repo_id: str, revision: str, authorized: bool) -> dict:
        store = self.repo(repo_type, repo_id)
        refs = store.refs()
        if refs["private"] and not authorized:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")  # as the Hub: hide, not 403
        commit = store.commit(store.resolve(revision))
        info: dict[str, Any] = {
            "id": repo_id,
            "sha": commit["id"],
            "private": refs["private"],
            "lastModified": commit["date"],
            "siblings": [{"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
                         for path, entry in sorted(commit["files"].items())],
            "tags": [],
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if "README.md" in commit["files"]:
            card_data = _yaml_header(store.blob(commit["files"]["README.md"]["oid"]).decode())
            if card_data:
                info["cardData"] = card_data
                info["tags"] = list(card_data.get("tags") or [])
        return info

    def preupload(self, store: RepoStore, revision: str, body: dict) -> dict:
        table = store.commit(store.resolve(revision))["files"]
        return {
            "files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": table.get(f["path"], {}).get("oid")}
                for f in body["files"]
            ]
        }

    def commit(self, store: RepoStore, repo_id: str, revision: str, ndjson: bytes, create_pr: bool) -> dict:
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            raise HubError(400, "The commit payload has no header line.")
        with self.lock:
            refs = store.refs()
            base = store.resolve(revision)
            if header.get("parentCommit") and header["parentCommit"] != base:
                raise HubError(412, f"A commit has happened since {header['parentCommit']}: the head is now {base}.")
            files = dict(store.commit(base)["files"])
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                        value["content"].encode()
                    files[value["path"]] = {"oid": store.add_blob(data), "size": len(data)}
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif line["key"] == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {path: entry for path, entry in files.items() if not path.startswith(folder)}
                elif line["key"] != "header":
                    raise HubError(400, f"This local hub does not support `{line['key']}` commit operations.")
            # an injected "mid-commit" failure strikes here: blobs are stored, but no ref has moved yet
            pending = self._failures.get("commit")
            if pending:
                raise _InjectedFailure(pending.pop(0))
            sha = store.add_commit(base, header.get("summary", ""), header.get("description", ""), files)
            result = {"commitOid": sha, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}"}
            if create_pr:
                number = len(refs["pull_requests"]) + 1
                refs["pull_requests"][f"refs/pr/{number}"] = sha
                result["pullRequestUrl"] = f"{self.endpoint}/{repo_id}/discussions/{number}"
            elif revision in refs["pull_requests"]:
                refs["pull_requests"][revision] = sha
            else:
                refs["branches"][revision.removeprefix("refs/heads/")] = sha
            store.write_refs(refs)  # the one step that makes the commit visible
        return result

    def create_branch(self, store: RepoStore, branch: str, body: dict) -> dict:
        with self.lock:
            refs = store.refs()
            if branch in refs["branches"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            refs["branches"][branch] = store.resolve(body.get("startingPoint") or "main")
            store.write_refs(refs)
        return {}

    def tree(self, store: RepoStore, revision: str, path: str, recursive: bool) -> list[dict]:
        files = store.commit(store.resolve(revision))["files"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for name, entry in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            # every folder on the way is an entry of its own (recursive), or only the first one (not recursive)
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40})
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, "size": entry["size"], "oid": entry["oid"]}
        return list(entries.values())


class _InjectedFailure(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _yaml_header(readme: str) -> dict | None:
    """The YAML metadata block at the top of a README.md (None if there is none or it is not a mapping)."""
    import yaml

    if not readme.startswith("---"):
        return None
    try:
        block = readme.split("---", 2)[1]
        data = yaml.safe_load(block)
    except (IndexError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a Content-Length

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass  # the request log below replaces stderr noise

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        # -- plumbing --
        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""  # read it all before answering, even on errors
            status = 500
            try:
                status = self._route(method, [unquote(part) for part in url.path.split("/")[1:]])
            except _InjectedFailure as injected:
                status = self._fail(injected.failure)
            except HubError as error:
                status = self._send_error(error)
            except Exception as error:  # a bug here must show up as a 500, not a hung client
                status = self._send_error(HubError(500, f"{type(error).__name__}: {error}"))
            hub.request_log.append((method, url.path, status))

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization", "")
            return bool(given) and (hub.token is None or given == f"Bearer {hub.token}")

        def _require_write(self) -> None:
            if not self._authorized():
                raise HubError(401, "Invalid credentials in Authorization header", "Unauthorized")

        def _fail(self, failure: Failure) -> int:
            if failure.status is None:  # a network failure: the connection closes with no answer
                self.close_connection = True
                return 0
            return self._send_error(HubError(failure.status, failure.message))

        def _inject(self, route: str) -> None:
            failure = hub.take_failure(route)
            if failure:
                raise _InjectedFailure(failure)

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> int:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return status

        def _send_json(self, status: int, data: Any) -> int:
            return self._send(status, json.dumps(data).encode())

        def _send_error(self, error: HubError) -> int:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            return self._send(error.status, json.dumps({"error": error.message}).encode(), headers)

        def _json_body(self) -> dict:
            return json.loads(self.body or b"{}")

        # -- routes --
        def _route(self, method: str, parts: list[str]) -> int:
            if parts[:1] == ["api"]:
                return self._api(method, parts[1:])
            # file downloads: /{owner}/{name}/resolve/{rev}/{path} (datasets and spaces under /datasets, /spaces)
            repo_type = "model"
            if parts and parts[0] in REPO_TYPES and len(parts) > 3 and parts[3] == "resolve":
                repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                self._inject("resolve")
                return self._resolve(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            raise HubError(404, f"No route for {method} /{'/'.join(parts)}")

        def _api(self, method: str, parts: list[str]) -> int:
            if parts == ["whoami-v2"]:
                self._require_write()
                return self._send_json(200, {"type": "user", "name": LOCAL_USER, "orgs": [],
                                             "auth": {"accessToken": {"displayName": "local", "role": "write"}}})
            if parts == ["validate-yaml"] and method == "POST":
                self._inject("validate-yaml")
                errors = validate_card_metadata(self._json_body().get("content", ""))
                return self._send_json(400 if errors else 200,
                                       {"errors": [{"message": e} for e in errors], "warnings": []})
            if parts == ["repos", "create"] and method == "POST":
                self._require_write()
                self._inject("create")
                status, data = hub.create_repo(self._json_body(), self._authorized())
                return self._send_json(status, data)
            if len(parts) < 3 or parts[0] not in REPO_TYPES:
                raise HubError(404, f"No route for {method} /api/{'/'.join(parts)}")
            repo_type, repo_id, rest = REPO_TYPES[parts[0]], f"{parts[1]}/{parts[2]}", parts[3:]
            if method == "GET" and (not rest or rest[0] == "revision"):
                self._inject("info")
                revision = rest[1] if len(rest) > 1 else "main"
                return self._send_json(200, hub.repo_info(repo_type, repo_id, revision, self._authorized()))
            store = hub.repo(repo_type, repo_id)
            if store.refs()["private"] and not self._authorized():
                raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
            action = rest[0] if rest else ""
            if action == "preupload" and method == "POST":
                self._require_write()
                self._inject("preupload")
                return self._send_json(200, hub.preupload(store, rest[1], self._json_body()))
            if action == "commit" and method == "POST":
                self._require_write()
                result = hub.commit(store, repo_id, rest[1], self.body, self.query.get("create_pr") == "1")
                return self._send_json(200, result)
            if action == "branch" and method == "POST":
                self._require_write()
                self._inject("branch")
                return self._send_json(200, hub.create_branch(store, "/".join(rest[1:]), self._json_body()))
            if action == "refs" and method == "GET":
                self._inject("refs")
                return self._send_json(200, self._refs(store))
            if action == "commits" and method == "GET":
                self._inject("commits")
                return self._send_json(200, self._commits(store, rest[1]))
            if action == "tree" and method == "GET":
                self._inject("tree")
                recursive = self.query.get("recursive", "false").lower() in ("1", "true")
                return self._send_json(200, hub.tree(store, rest[1], "/".join(rest[2:]), recursive))
            if action == "paths-info" and method == "POST":
                self._inject("paths-info")
                return self._send_json(200, self._paths_info(store, rest[1]))
            raise HubError(404, f"No route for {method} /api/{'/'.join(parts)}")

        def _refs(self, store: RepoStore) -> dict:
            refs = store.refs()
            return {
                "branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                             for name, sha in refs["branches"].items()],
                "converts": [],
                "tags": [],
                "pullRequests": [{"name": name, "ref": name, "targetCommit": sha}
                                 for name, sha in refs["pull_requests"].items()],
            }

        def _commits(self, store: RepoStore, revision: str) -> list[dict]:
            history, sha = [], store.resolve(revision)
            while sha:
                commit = store.commit(sha)
                history.append({"id": sha, "title": commit["title"], "message": commit["message"],
                                "authors": [{"user": LOCAL_USER}], "date": commit["date"]})
                sha = commit["parents"][0] if commit["parents"] else None
            return history

        def _paths_info(self, store: RepoStore, revision: str) -> list[dict]:
            # the client posts a form (`paths=a&paths=b&expand=...`)
            form = parse_qs(self.body.decode())
            wanted = form.get("paths", [])
            everything = hub.tree(store, revision, "", recursive=True)
            return [entry for entry in everything if entry["path"] in wanted]

        def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
            store = hub.repo(repo_type, repo_id)
            if store.refs()["private"] and not self._authorized():
                raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
            sha = store.resolve(revision)
            entry = store.commit(sha)["files"].get(path)
            if entry is None:
                # X-Repo-Commit on a 404 lets the client cache the absence of optional files
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=sha)
            data = store.blob(entry["oid"])
            headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
            status = 200
            byte_range = self.headers.get("Range", "")
            if byte_range.startswith("bytes=") and byte_range.endswith("-"):  # resuming: "bytes=N-"
                start = int(byte_range[len("bytes="):-1])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                data, status = data[start:], 206
            return self._send(status, data, headers, content_type="application/octet-stream")

    return Handler


@dataclass
class ServeSettings:
    """The options of `python -m hybridzoo.testing.local_hub`."""

    root: str = setting(help="folder that stores the repos")
    port: int = setting(0, "port (0: any free port)")


def serve(settings: ServeSettings) -> None:
    hub = LocalHub(settings.root, port=settings.port)
    print(f"local hub serving {settings.root} at {hub.endpoint}; set HF_ENDPOINT={hub.endpoint}", flush=True)
    try:
        hub._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub._server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = SettingsParser(description="Serve a local Hugging Face Hub-compatible endpoint on 127.0.0.1.")
    add_command(parser, ServeSettings, serve)
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
