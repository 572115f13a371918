"""The model store against a real `quill serve --store DIR --admin-key K` process on loopback.

`quill push` and the plain tuspy client publish models that generate exactly what the folder does; commits that
must fail (wrong checksum, truncated safetensors, config vs tensors, bad tokenizer) name the file and change
nothing; names, sizes and the admin key are enforced; an upload survives `kill -9` of the server mid-PATCH and
resumes byte-identical. The in-process tests cover a full disk and crash recovery of the store directory.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from tusclient.client import TusClient

from conftest import ServerProcess, free_port

K = "store-admin-key"
AUTH = {"Authorization": f"Bearer {K}"}
PROMPT = "Hello there"
LIMITS = {"QUILL_STORE_MAX_FILE_BYTES": "1MB", "QUILL_STORE_MAX_MODEL_BYTES": "2MB"}


class StoreServer:
    """`quill serve --store DIR --admin-key K` on a fixed port, so it can be killed and started again."""

    def __init__(self, store: Path, log_dir: Path):
        self.store, self.log_dir, self.port = store, log_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: ServerProcess | None = None
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.process.log

    def start(self, *extra: str) -> StoreServer:
        return self.spawn(*extra).wait()

    def spawn(self, *extra: str) -> StoreServer:
        self.runs += 1
        self.process = ServerProcess(["--store", self.store, "--admin-key", K, *extra],
                                     self.log_dir / f"server-{self.runs}.log", port=self.port, env=LIMITS)
        return self

    def wait(self) -> StoreServer:
        self.process.wait_ready()
        return self

    def kill9(self) -> None:
        self.process.kill9()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir  # conftest's: a character-level tiny model with a chat template


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("store-server")
    srv = StoreServer(base / "store", base).spawn()
    try:
        request.getfixturevalue("model_dir")  # built while the server starts
        yield srv.wait()
    finally:
        srv.stop()


# ---- helpers -------------------------------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_sums(folder: Path) -> dict[str, str]:
    return {p.name: sha(p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def tus_upload(url: str, model: str, filename: str, data: bytes, chunk_size: int = 40_000):
    """Upload `data` with the plain tuspy client; returns the uploader."""
    client = TusClient(url + "/v1/uploads", headers=AUTH)
    up = client.uploader(file_stream=io.BytesIO(data), chunk_size=chunk_size,
                         metadata={"model": model, "filename": filename})
    up.upload()
    return up


def commit(url: str, model: str, files: dict[str, str], **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{model}/commit", json={"files": files, **kw}, headers=AUTH, timeout=60)


def tokens_from_server(url: str, model: str, prompt_ids: list[int]) -> list[int]:
    r = httpx.post(f"{url}/v1/inference", json={"model": model, "tokens": prompt_ids, "max_tokens": 12,
                                                 "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["tokens"]


def expected_tokens(model_dir: Path) -> tuple[list[int], list[int]]:
    import quill

    engine = quill.load(model_dir)
    ids = engine.tokenizer.encode(PROMPT)
    return ids, engine.generate(ids, 12, temperature=0).tokens


def listing(url: str) -> dict[str, dict]:
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def published_files(store: Path) -> dict[str, str]:
    """Every published file (relative path -> SHA-256), i.e. all but the store's dot folders."""
    return {str(p.relative_to(store)): sha(p.read_bytes()) for p in sorted(store.rglob("*"))
            if p.is_file() and not p.relative_to(store).parts[0].startswith(".")}


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def tus_create(url: str, model: str, filename: str, length: int, headers: dict | None = None) -> httpx.Response:
    meta = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in
                    {"model": model, "filename": filename}.items())
    h = {"Tus-Resumable": "1.0.0", "Upload-Length": str(length), "Upload-Metadata": meta}
    return httpx.post(url + "/v1/uploads", headers={**h, **(AUTH if headers is None else headers)})


# ---- publishing --------------------------------------------------------------------------------------------------


def test_push_and_plain_tus_publish_models_that_generate_like_the_folder(server, model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    from quill import cli

    monkeypatch.setenv("QUILL_PUSH_RESUME", str(tmp_path / "resume.json"))
    assert cli.main(["push", str(model_dir), "pushed", "--url", server.url, "--admin-key", K,
                     "--chunk-size", "32KB", "--quiet"]) == 0
    sums = folder_sums(model_dir)
    out = capsys.readouterr().out
    assert out.startswith(f"published pushed: {len(sums)} files") and out.count("\n") == 1
    assert json.loads((tmp_path / "resume.json").read_text()) == {}  # committed: nothing left to resume

    for fn in sums:  # any tus client: tuspy with no Quill code
        tus_upload(server.url, "plain", fn, (model_dir / fn).read_bytes(), chunk_size=50_000)
    r = commit(server.url, "plain", sums)
    assert r.status_code == 200, r.text

    models = listing(server.url)
    size = sum((model_dir / fn).stat().st_size for fn in sums)
    import quill

    params = quill.load(model_dir).config.num_params()
    for name in ("pushed", "plain"):
        m = models[name]
        assert (m["stored"], m["loaded"], m["bytes"], m["parameters"], m["dtype"]) == (True, False, size, params,
                                                                                      "float32")
        assert m["files"] == {fn: (model_dir / fn).stat().st_size for fn in sums}
        assert (server.store / name / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()

    assert httpx.post(f"{server.url}/v1/models/pushed/load", headers=AUTH, timeout=60).status_code == 200
    r = httpx.post(f"{server.url}/v1/models/plain/load", json={"dtype": "fp32"}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["precision"] == "float32"
    ids, want = expected_tokens(model_dir)
    assert tokens_from_server(server.url, "pushed", ids) == want
    assert tokens_from_server(server.url, "plain", ids) == want
    models = listing(server.url)
    assert models["pushed"]["loaded"] and models["plain"]["precision"] == "float32"

    r = httpx.post(f"{server.url}/v1/models/plain/load", json={"dtype": "bf16"}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and listing(server.url)["plain"]["precision"] == "bfloat16"
    r = httpx.post(f"{server.url}/v1/models/plain/load", json={"dtype": "int8"}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["precision"] == "int8", r.text
    assert listing(server.url)["plain"]["precision"] == "int8"
    assert len(tokens_from_server(server.url, "plain", ids)) > 0
    r = httpx.post(f"{server.url}/v1/models/plain/load", json={"dtype": "int4"}, headers=AUTH, timeout=60)
    assert_error(r, 400, "invalid_value", "dtype")
    assert "int8" in r.json()["error"]["message"]  # the precisions a load takes, int8 among them
    assert listing(server.url)["plain"]["precision"] == "int8"  # a refused load leaves the model as it was
    assert httpx.post(f"{server.url}/v1/models/plain/unload", headers=AUTH).status_code == 200
    assert listing(server.url)["plain"]["loaded"] is False
    assert_error(httpx.post(f"{server.url}/v1/models/plain/unload", headers=AUTH), 404, "model_not_found")

    # quill.load finds published models by name in the default store
    monkeypatch.setenv("QUILL_STORE", str(server.store))
    assert quill.load("pushed").generate(ids, 12, temperature=0).tokens == want

    # pushing again: the name is taken unless --replace
    assert cli.main(["push", str(model_dir), "pushed", "--url", server.url, "--admin-key", K, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quill: error: commit of pushed failed: HTTP 409") and err.count("\n") == 1
    assert cli.main(["push", str(model_dir), "pushed", "--url", server.url, "--admin-key", K, "--quiet",
                     "--replace"]) == 0
    assert cli.main(["push", str(model_dir), "pushed", "--url", server.url, "--admin-key", "wrong"]) == 2
    assert "HTTP 401" in capsys.readouterr().err
    assert cli.main(["push", str(model_dir), "x", "--url", f"http://127.0.0.1:{free_port()}", "--admin-key", K,
                     "--retry-for", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quill: error: upload of ") and err.count("\n") == 1


def test_failed_commits_name_the_file_and_change_nothing(server, model_dir):
    files = {fn: (model_dir / fn).read_bytes() for fn in folder_sums(model_dir)}
    sums = {fn: sha(b) for fn, b in files.items()}
    for fn, data in files.items():
        tus_upload(server.url, "broken", fn, data)
    before = (listing(server.url), published_files(server.store))

    def refused(files_sums, code, param, words):
        err = assert_error(commit(server.url, "broken", files_sums), 400, code, param)
        assert words in err["message"], err
        assert (listing(server.url), published_files(server.store)) == before
        assert not (server.store / "broken").exists()
        assert not any((server.store / ".staging").glob("*"))

    refused({**sums, "config.json": "0" * 64}, "checksum_mismatch", "config.json", "checksum mismatch")

    truncated = files["model.safetensors"][:-1000]
    tus_upload(server.url, "broken", "model.safetensors", truncated)
    refused({**sums, "model.safetensors": sha(truncated)}, "invalid_safetensors", "model.safetensors", "truncated")

    tus_upload(server.url, "broken", "model.safetensors", files["model.safetensors"])
    config = json.loads(files["config.json"])
    config["n_embd"] = 64
    other = json.dumps(config).encode()
    tus_upload(server.url, "broken", "config.json", other)
    refused({**sums, "config.json": sha(other)}, "weights_mismatch", "model.safetensors", "does not match config.json")

    tus_upload(server.url, "broken", "config.json", files["config.json"])
    bad_tok = b'{"version": "1.0", "model": {"type": "WordLevel", "vocab": 7}}'
    tus_upload(server.url, "broken", "tokenizer.json", bad_tok)
    refused({**sums, "tokenizer.json": sha(bad_tok)}, "invalid_tokenizer", "tokenizer.json", "tokenizer")

    # the uploads stay after a failed commit: fix the one bad file and commit
    tus_upload(server.url, "broken", "tokenizer.json", files["tokenizer.json"])
    refused({fn: s for fn, s in sums.items() if fn != "config.json"}, "missing_file", "config.json", "missing")
    assert_error(commit(server.url, "broken", {**sums, "README.md": sha(b"x")}), 400, "upload_missing", "README.md")
    assert commit(server.url, "broken", sums).status_code == 200
    assert listing(server.url)["broken"]["stored"]
    assert httpx.get(server.url + "/v1/uploads", params={"model": "broken"}, headers=AUTH).json()["data"] == []
    assert httpx.delete(f"{server.url}/v1/models/broken", headers=AUTH).status_code == 200
    assert (listing(server.url), published_files(server.store)) == before
    assert_error(httpx.delete(f"{server.url}/v1/models/broken", headers=AUTH), 404, "model_not_found")


def test_int8_checkpoint_publishes_and_loads_as_int8(server, model_dir, tmp_path, monkeypatch):
    from quill import cli, quantize
    from quill.weights import load_model

    out = tmp_path / "int8"
    quantize.save_quantized(quantize.quantize_model(load_model(model_dir), "int8"), out, source=model_dir)
    monkeypatch.setenv("QUILL_PUSH_RESUME", str(tmp_path / "resume.json"))
    assert cli.main(["push", str(out), "tiny-int8", "--url", server.url, "--admin-key", K, "--quiet", "--load"]) == 0
    m = listing(server.url)["tiny-int8"]
    assert (m["dtype"], m["precision"], m["loaded"]) == ("int8", "int8", True)
    import quill

    ids, _ = expected_tokens(model_dir)
    want = quill.load(out).generate(ids, 12, temperature=0).tokens
    assert tokens_from_server(server.url, "tiny-int8", ids) == want
    assert httpx.delete(f"{server.url}/v1/models/tiny-int8", headers=AUTH).status_code == 200
    assert "tiny-int8" not in listing(server.url)


# ---- safety --------------------------------------------------------------------------------------------------------


def test_admin_key_names_and_sizes_are_enforced(server, tmp_path):
    url = server.url
    for headers in ({}, {"Authorization": "Bearer nope"}):
        assert_error(tus_create(url, "m", "config.json", 10, headers), 401, "invalid_admin_key")
        assert_error(httpx.post(f"{url}/v1/models/m/commit", json={"files": {}}, headers=headers), 401)
        for route in ("load", "unload"):
            assert_error(httpx.post(f"{url}/v1/models/m/{route}", headers=headers), 401)
        assert_error(httpx.delete(f"{url}/v1/models/m", headers=headers), 401)
        assert_error(httpx.get(f"{url}/v1/uploads", headers=headers), 401)
    # an upload created with the key takes no bytes without it
    loc = tus_create(url, "m", "config.json", 10).headers["location"]
    patch = {"Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    assert_error(httpx.patch(loc, content=b"0123456789", headers=patch), 401)
    assert httpx.head(loc, headers={**AUTH, "Tus-Resumable": "1.0.0"}).headers["upload-offset"] == "0"
    assert_error(httpx.patch(loc, content=b"01234567890", headers={**patch, **AUTH}), 400)  # past Upload-Length
    bad = "sha1 " + base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    assert_error(httpx.patch(loc, content=b"0123456789", headers={**patch, **AUTH, "Upload-Checksum": bad}), 460,
                 "checksum_mismatch")
    assert httpx.head(loc, headers={**AUTH, "Tus-Resumable": "1.0.0"}).headers["upload-offset"] == "0"
    assert httpx.delete(loc, headers={**AUTH, "Tus-Resumable": "1.0.0"}).status_code == 204

    for name in ("../evil", "a/b", "..", ".hidden", "x" * 65, "", "a..b", "evil\\x"):
        assert_error(tus_create(url, name, "config.json", 10), 400, "invalid_model_name", "model")
    for fn, code in (("../config.json", "invalid_file_name"), ("sub/config.json", "invalid_file_name"),
                     ("..", "invalid_file_name"), ("evil.py", "invalid_file_name"), ("model.safetensors.tmp", None),
                     ("pytorch_model.bin", "unsupported_file_type"), ("model.pkl", "unsupported_file_type"),
                     ("model.pt", "unsupported_file_type")):
        assert_error(tus_create(url, "m", fn, 10), 400, code, "filename")
    assert_error(commit(url, ".hidden", {"config.json": "0" * 64}), 400, "invalid_model_name")
    assert httpx.post(f"{url}/v1/models/..%2F..%2Fevil/commit", json={"files": {"config.json": "0" * 64}},
                      headers=AUTH).status_code in (400, 404, 405)
    assert_error(commit(url, "m", {"../../evil.json": "0" * 64}), 400, "invalid_file_name")
    assert_error(commit(url, "m", {"config.json": "not-a-sha"}), 400, "invalid_value", "config.json")
    assert not (server.store.parent / "evil").exists() and not (server.store.parent / "evil.json").exists()

    # sizes: 1 MB per file, 2 MB per model (LIMITS), checked when the upload is created
    assert_error(tus_create(url, "big", "model.safetensors", 1024 * 1024 + 1), 413, "file_too_large",
                 "model.safetensors")
    made = [tus_create(url, "big", f"model-0000{i}-of-00003.safetensors", 900_000) for i in (1, 2)]
    assert all(r.status_code == 201 for r in made)
    assert_error(tus_create(url, "big", "model-00003-of-00003.safetensors", 900_000), 413, "model_too_large",
                 "model-00003-of-00003.safetensors")
    with_body = {"Tus-Resumable": "1.0.0", "Upload-Length": "3", **AUTH,
                 "Upload-Metadata": "model " + base64.b64encode(b"m").decode() + ",filename " +
                                    base64.b64encode(b"README.md").decode()}
    assert_error(httpx.post(url + "/v1/uploads", content=b"abc", headers=with_body), 400)  # data goes with PATCH
    for r in made:
        httpx.delete(r.headers["location"], headers={**AUTH, "Tus-Resumable": "1.0.0"})
    opts = httpx.options(url + "/v1/uploads", headers=AUTH)
    assert "checksum" in opts.headers["tus-extension"] and opts.headers["tus-max-size"] == str(1024 * 1024)


# ---- kill -9 and resume (restarts the module's server: keep it last) ------------------------------------------------


def test_upload_survives_kill_9_mid_patch_and_resumes_byte_identical(server, model_dir, tmp_path, monkeypatch):
    from quill import cli

    monkeypatch.setenv("QUILL_PUSH_RESUME", str(tmp_path / "resume.json"))
    assert cli.main(["push", str(model_dir), "survivor", "--url", server.url, "--admin-key", K, "--quiet"]) == 0
    weights = (model_dir / "model.safetensors").read_bytes()
    chunk = 16 * 1024
    client = TusClient(server.url + "/v1/uploads", headers=AUTH)
    up = client.uploader(file_stream=io.BytesIO(weights), chunk_size=chunk,
                         metadata={"model": "resumed", "filename": "model.safetensors"})
    for _ in range(3):
        up.upload_chunk()
    assert up.offset == 3 * chunk
    uid = up.url.rsplit("/", 1)[1]
    data_file = server.store / ".uploads" / uid

    # a PATCH that never finishes: half its body (garbage) reaches the server, which then dies with SIGKILL
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("PATCH", f"/v1/uploads/{uid}")
    for k, v in {**AUTH, "Tus-Resumable": "1.0.0", "Upload-Offset": str(3 * chunk), "Content-Length": str(chunk),
                 "Content-Type": "application/offset+octet-stream"}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(b"\xff" * 5000)
    deadline = time.monotonic() + 5
    while data_file.stat().st_size <= 3 * chunk and time.monotonic() < deadline:
        time.sleep(0.05)
    assert data_file.stat().st_size > 3 * chunk  # unacknowledged bytes are on disk when the server dies
    server.kill9()
    conn.close()

    server.start("--load", "survivor")  # same store, same port
    assert data_file.stat().st_size == 3 * chunk  # start-up cut the unacknowledged tail
    head = httpx.head(up.url, headers={**AUTH, "Tus-Resumable": "1.0.0"})
    assert head.headers["upload-offset"] == str(3 * chunk)
    resumed = client.uploader(file_stream=io.BytesIO(weights), url=up.url, chunk_size=chunk,
                              metadata={"model": "resumed", "filename": "model.safetensors"})
    assert resumed.offset == 3 * chunk
    resumed.upload()
    assert data_file.read_bytes() == weights

    sums = folder_sums(model_dir)
    for fn in sums:
        if fn != "model.safetensors":
            tus_upload(server.url, "resumed", fn, (model_dir / fn).read_bytes())
    r = commit(server.url, "resumed", sums)
    assert r.status_code == 200, r.text
    assert (server.store / "resumed" / "model.safetensors").read_bytes() == weights

    models = listing(server.url)  # published models survive; --load served one from the start
    assert models["survivor"]["loaded"] and models["resumed"]["stored"] and not models["resumed"]["loaded"]
    ids, want = expected_tokens(model_dir)
    assert tokens_from_server(server.url, "survivor", ids) == want
    assert httpx.post(f"{server.url}/v1/models/resumed/load", headers=AUTH, timeout=60).status_code == 200
    assert tokens_from_server(server.url, "resumed", ids) == want
    assert "Traceback" not in server.log.read_text()


# ---- in process: a full disk, crash recovery, names ----------------------------------------------------------------


def _app(store: Path):
    from fastapi.testclient import TestClient

    from quill.server import AppState, ServerConfig, create_app

    state = AppState(ServerConfig(store_dir=store, admin_keys=(K,)))
    return TestClient(create_app(state, router_modules=["quill.server.routes_openai", "quill.server.routes_store"]))


def _put(c, model: str, filename: str, data: bytes) -> str:
    meta = f"model {base64.b64encode(model.encode()).decode()},filename {base64.b64encode(filename.encode()).decode()}"
    r = c.post("/v1/uploads", headers={**AUTH, "Tus-Resumable": "1.0.0", "Upload-Length": str(len(data)),
                                       "Upload-Metadata": meta})
    assert r.status_code == 201, r.text
    loc = r.headers["location"]
    r = c.patch(loc, content=data, headers={**AUTH, "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
                                            "Content-Type": "application/offset+octet-stream"})
    assert r.status_code == 204, r.text
    return loc


def test_disk_full_is_507_and_changes_nothing(tmp_path, model_dir, monkeypatch):
    import errno

    import quill.server.routes_store as rs
    import quill.store as qs

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = tmp_path / "store"
    with _app(store) as c:
        sums = {}
        for fn, s in folder_sums(model_dir).items():
            _put(c, "m", fn, (model_dir / fn).read_bytes())
            sums[fn] = s
        assert c.post("/v1/models/m/commit", json={"files": sums}, headers=AUTH).status_code == 200
        before = (c.get("/v1/models").json(), published_files(store))

        for fn in sums:
            _put(c, "m", fn, (model_dir / fn).read_bytes())
        with monkeypatch.context() as mp:
            mp.setattr(qs, "write_json_durably", full)
            r = c.post("/v1/models/m/commit", json={"files": sums, "replace": True}, headers=AUTH)
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        assert (c.get("/v1/models").json(), published_files(store)) == before
        assert not any((store / ".staging").glob("*"))

        meta = f"model {base64.b64encode(b'm').decode()},filename {base64.b64encode(b'README.md').decode()}"
        loc = c.post("/v1/uploads", headers={**AUTH, "Tus-Resumable": "1.0.0", "Upload-Length": "10",
                                             "Upload-Metadata": meta}).headers["location"]
        patch = {**AUTH, "Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream"}
        assert c.patch(loc, content=b"01234", headers={**patch, "Upload-Offset": "0"}).status_code == 204
        with monkeypatch.context() as mp:
            mp.setattr(rs, "_write_at", full)
            r = c.patch(loc, content=b"56789", headers={**patch, "Upload-Offset": "5"})
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        assert c.head(loc, headers={**AUTH, "Tus-Resumable": "1.0.0"}).headers["upload-offset"] == "5"
        assert c.patch(loc, content=b"56789", headers={**patch, "Upload-Offset": "5"}).status_code == 204
        assert (store / ".uploads" / loc.rsplit("/", 1)[1]).read_bytes() == b"0123456789"


def test_recover_undoes_interrupted_work(tmp_path, model_dir):
    import shutil

    from quill.store import MANIFEST, Store

    store = tmp_path / "store"
    with _app(store) as c:
        sums = folder_sums(model_dir)
        for fn in sums:
            _put(c, "m", fn, (model_dir / fn).read_bytes())
        assert c.post("/v1/models/m/commit", json={"files": sums}, headers=AUTH).status_code == 200
        loc = c.post("/v1/uploads", headers={**AUTH, "Tus-Resumable": "1.0.0", "Upload-Length": "10",
                                             "Upload-Metadata": "model bQ==,filename UkVBRE1FLm1k"}).headers["location"]
        assert c.patch(loc, content=b"abc", headers={**AUTH, "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
                                                     "Content-Type": "application/offset+octet-stream"}).status_code == 204
    uid = loc.rsplit("/", 1)[1]
    # what crashes leave: a replacement cut between its two renames, a staging folder, an unacknowledged tail,
    # an upload without its sidecar, a sidecar's temporary file
    (store / ".trash").mkdir(exist_ok=True)
    os.rename(store / "m", store / ".trash" / "m.0123abcd.old")
    shutil.copytree(store / ".trash" / "m.0123abcd.old", store / ".staging" / "m.feed")
    with open(store / ".uploads" / uid, "ab") as f:
        f.write(b"GARBAGE")
    (store / ".uploads" / ("f" * 32)).write_bytes(b"orphan")
    (store / ".uploads" / f"{uid}.info.tmp").write_text("{")
    s = Store(store)
    assert s.list() == []
    done = s.recover()
    assert len(done) == 5, done
    assert [m["name"] for m in s.list()] == ["m"] and (store / "m" / MANIFEST).is_file()
    assert sorted(os.listdir(store / ".uploads")) == sorted([".locks", uid, f"{uid}.info"])
    assert (store / ".uploads" / uid).read_bytes() == b"abc"
    assert list((store / ".staging").iterdir()) == [] and list((store / ".trash").iterdir()) == []
    assert s.recover() == []


def test_names():
    from quill.store import StoreError, parse_size, validate_file_name, validate_model_name

    for ok in ("gpt2", "my-model_v1.2", "A" * 64):
        assert validate_model_name(ok) == ok
    for bad in ("", "../x", "x/y", ".x", "-x", "a..b", "A" * 65, "x\\y", "x y", None, 3):
        with pytest.raises(StoreError):
            validate_model_name(bad)
    for ok in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json", "merges.txt", "README.md", "model.safetensors.index.json"):
        assert validate_file_name(ok) == ok
    for bad in ("model-00003-of-00002.safetensors", "model-1-of-2.safetensors", "x.json", "pytorch_model.bin",
                "model.int8.safetensors",
                "/etc/passwd", "a/config.json", "config.json\0", "model.ckpt"):
        with pytest.raises(StoreError):
            validate_file_name(bad)
    assert parse_size("2MB") == 2 * 1024**2 and parse_size("512KiB") == 512 * 1024 and parse_size("100") == 100


def test_upload_length_and_ids_are_checked(tmp_path):
    store = tmp_path / "store"
    meta = f"model {base64.b64encode(b'm').decode()},filename {base64.b64encode(b'README.md').decode()}"
    create = {**AUTH, "Tus-Resumable": "1.0.0", "Upload-Metadata": meta}
    with _app(store) as c:
        for length in ("-1", "+5", "1e3", "0x10", "1_0", ""):
            r = c.post("/v1/uploads", headers={**create, "Upload-Length": length})
            assert r.status_code == 400 and r.json()["error"]["param"] == "Upload-Length", (length, r.text)
        assert not any((store / ".uploads").glob("*.info"))
        loc = _put(c, "m", "README.md", b"hello")
        uid = loc.rsplit("/", 1)[1]
        tus = {**AUTH, "Tus-Resumable": "1.0.0"}
        for path in (f"{uid}.info", f"{uid}.tmp", uid.upper(), "x"):
            r = c.delete(f"/v1/uploads/{path}", headers=tus)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        assert (store / ".uploads" / f"{uid}.info").exists() and (store / ".uploads" / uid).read_bytes() == b"hello"
        patch = {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
        r = c.patch(loc, content=b"too long!", headers=patch)  # tuspyserver's own errors get a code too
        assert r.status_code >= 400 and r.json()["error"]["code"], r.text
