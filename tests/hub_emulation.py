"""The loopback hub of test_checkpoints_download.py, extended with what
huggingface_hub's ``create_repo`` / ``create_branch`` / ``create_commit`` call:
real HTTP on 127.0.0.1, real huggingface_hub client, no mocks.

Served on top of the download endpoints (``/OWNER/NAME/resolve/REV/FILE``):

* ``POST /api/repos/create``                     -> 200 ``{"url"}``, 409 when it exists
* ``POST /api/validate-yaml``                    -> the model card's front matter parsed
* ``POST /api/models/OWNER/NAME/preupload/REV``  -> every file "regular" (inline base64 in the commit)
* ``POST /api/models/OWNER/NAME/commit/REV``     -> NDJSON header + files -> a new commit id
* ``POST /api/models/OWNER/NAME/branch/BRANCH``  -> a branch at main's head

Writes need ``Authorization: Bearer <token>`` with a token from ``server.tokens``
(401 otherwise).  Every commit stays addressable by its id, so ``@REV`` loads
the files of that commit; ``server.repos[repo]`` is the head of ``main`` (what
the download tests fill directly).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import ThreadingHTTPServer

import yaml
from test_checkpoints_download import COMMIT, _Handler


class HubHandler(_Handler):
    def _auth(self) -> bool:
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if token in self.server.tokens:
            return True
        self._json(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _json(self, status: int, body: dict, extra: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # ------------------------------------------------------------ downloads
    def _file(self):
        path = self.path.split("?")[0]
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            return super()._file()
        repo, rev, name = m.groups()
        if repo not in self.server.repos:
            return "no-repo", None
        oid = self.server.branches.get(repo, {}).get(rev, rev)
        files = self.server.commits.get(oid)
        if files is None:
            if rev != "main":
                return "no-rev", None
            oid, files = COMMIT, self.server.repos[repo]        # a repo filled by hand
        self._oid = oid
        return "hub", files.get(name)

    def _send_headers(self, kind, body, status, extra):
        if kind == "hub":
            extra = {**extra, "X-Repo-Commit": getattr(self, "_oid", COMMIT)}
        super()._send_headers(kind, body, status, extra)

    def _not_found(self, kind):
        if kind == "no-rev":
            self.send_response(404)
            self.send_header("X-Error-Code", "RevisionNotFound")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        super()._not_found(kind)

    # ---------------------------------------------------------------- writes
    def do_POST(self):
        path = self.path.split("?")[0]
        body = self._body()
        self.server.log.append(("POST", path, None))
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                yaml.safe_load(m.group(1)) if m else None
            except yaml.YAMLError as exc:
                return self._json(400, {"errors": [{"message": str(exc)}]})
            return self._json(200, {"errors": [], "warnings": []})
        if not self._auth():
            return
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            if repo in self.server.repos:
                return self._json(409, {"error": "You already created this model repo",
                                        "url": f"{self.server.url}/{repo}"})
            self.server.repos[repo] = {}
            self.server.branches[repo] = {}
            self.server.created.append((repo, req.get("visibility")))
            return self._json(200, {"url": f"{self.server.url}/{repo}"})
        m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)$", path)
        if not m:
            return self._json(404, {"error": f"no endpoint {path}"})
        repo, action, rev = m.groups()
        rev = rev.replace("%2F", "/")
        if repo not in self.server.repos:
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                               "oid": None} for f in files]})
        heads = self.server.branches[repo]
        if action == "branch":
            heads[rev] = heads.get("main")
            self.server.commits.setdefault(heads[rev], dict(self.server.repos[repo]))
            return self._json(200, {})
        if rev != "main" and rev not in heads:
            return self._json(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(i["value"] for i in items if i["key"] == "header")
        files = dict(self.server.commits.get(heads.get(rev), {}))
        for item in items:
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return self._json(400, {"error": f"the emulation does not take {item['key']} operations"})
        oid = hashlib.sha1(json.dumps([header, sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()),
                                       len(self.server.commits)]).encode()).hexdigest()
        self.server.commits[oid] = files
        heads[rev] = oid
        if rev == "main":
            self.server.repos[repo] = files
        self.server.commit_log.append((repo, rev, oid, header["summary"]))
        return self._json(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid})


def start_hub(tokens=("hf_test_token",)) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    srv.files, srv.repos, srv.log, srv.cut_next, srv.ranges = {}, {}, [], set(), True
    srv.tokens, srv.branches, srv.commits, srv.created, srv.commit_log = set(tokens), {}, {}, [], []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    return srv
