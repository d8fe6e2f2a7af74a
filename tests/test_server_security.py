"""The running app (launched in-process on 127.0.0.1, as app.py launches it): files outside Gradio's upload
cache are never served, the monitoring endpoint is off, uploads over --max-file-size are refused, and
with --auth nothing answers before sign-in while the library records who trained an adapter.

(Each browser session's uploads staying in that session, and a reloaded page reattaching to a running
job, are checked in a real browser by test_browser.py.)
"""
from __future__ import annotations

import http.client
import json
import time
from urllib.parse import quote, urlparse

import httpx
import pytest

from studio.app import launch_options
from studio.tabs import data
from studio_server import served_studio

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
MAX_UPLOAD = "64kb"


def _with_pirates(studio):
    text, _, state = data.sample_text("pirate_recipes")
    data.prepare(studio, state, text, 0.9, "pirates")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("open"), max_upload=MAX_UPLOAD, before_build=_with_pirates) as served:
        yield served


def raw_get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client-side '..' normalisation or re-quoting)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _upload(url: str, name: str, content: bytes, cookies=None) -> httpx.Response:
    return httpx.post(url + "gradio_api/upload", files={"files": (name, content)}, cookies=cookies, timeout=30)


# ---- file access -------------------------------------------------------------------------------

def test_the_file_route_serves_uploads_and_nothing_else(server):
    url, studio = server
    secret = studio.library.root / "secret-adapter" / "adapter_model.safetensors"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"LIBRARY-SECRET" * 10)
    (studio.library.root.parent / "beside-library.txt").write_text("PARENT-SECRET")
    up = _upload(url, "mine.txt", b"MY-UPLOAD")
    assert up.status_code == 200, up.text
    mine = up.json()[0]
    status, body = raw_get(url, "/gradio_api/file=" + quote(mine))
    assert status == 200 and body == b"MY-UPLOAD"  # the route works, for the upload cache

    upload_dir = mine.rsplit("/", 2)[0]  # <cache>/<hash>/mine.txt -> <cache>
    lib, parent = studio.library.root, studio.library.root.parent
    paths = [
        "/etc/passwd", quote("/etc/passwd", safe=""), "//etc/passwd", "/etc/./passwd", "/etc//passwd",
        f"{upload_dir}/../../etc/passwd", f"{upload_dir}/%2e%2e/%2e%2e/etc/passwd",
        quote(f"{upload_dir}/../../etc/passwd", safe=""), f"{mine}/../../../../etc/passwd",
        "../../../../../../etc/passwd", "..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        str(secret), f"{lib}/secret-adapter", str(lib), str(parent), f"{parent}/beside-library.txt",
        f"{upload_dir}/../{parent.relative_to('/')}/beside-library.txt",
        f"{studio.datasets_dir}/pirates/meta.json", f"{studio.datasets_dir}/pirates/train_00000.npy",
        str(studio.exports_dir), "/proc/self/environ", "/root/.bashrc",
        "http://127.0.0.1:1/", f"http://127.0.0.1:{urlparse(url).port}/config", "file:///etc/passwd",
    ]
    for p in paths:
        for prefix in ("/gradio_api/file=", "/file="):
            status, body = raw_get(url, prefix + p)
            assert status in (400, 403, 404), (prefix + p, status, body[:200])
            for leaked in (b"root:", b"LIBRARY-SECRET", b"PARENT-SECRET", b"PATH=", b"lora-studio-dataset", b"NUMPY"):
                assert leaked not in body, (prefix + p, body[:200])


def test_monitoring_is_off(server):
    url, _ = server
    for path in ("/monitoring", "/monitoring/summary", "/monitoring/0123456789abcdef", "/gradio_api/monitoring",
                 "/monitoring/0123456789abcdef/dashboard"):
        status, body = raw_get(url, path)
        assert status in (403, 404), (path, status, body[:200])


def test_uploads_over_the_limit_are_refused_by_the_server(server):
    url, _ = server
    r = _upload(url, "big.txt", b"word " * 20_000)  # 100 KB against --max-file-size 64kb
    assert r.status_code == 413 and "maximum allowed size" in r.text


def test_launch_options_keep_allowed_paths_empty(server):
    url, _ = server
    opts = launch_options()
    assert opts["enable_monitoring"] is False and not opts.get("allowed_paths") and opts["max_file_size"]
    config = httpx.get(url + "config", timeout=30).json()
    assert not config.get("allowed_paths") and config.get("max_file_size") == 64 * 1024


# ---- sign-in (--auth) ----------------------------------------------------------------------------

USERS = [("ann", "s3cret-ann"), ("bob", "s3cret-bob")]


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("auth"), auth=USERS, max_upload=MAX_UPLOAD,
                       before_build=_with_pirates) as served:
        yield served


def test_nothing_answers_before_sign_in(authed):
    url, _ = authed
    for path in ("/config", "/gradio_api/info", "/gradio_api/file=/etc/passwd", "/gradio_api/queue/status"):
        status, body = raw_get(url, path)
        assert status in (401, 403), (path, status, body[:200])
        assert b"root:" not in body
    r = httpx.post(url + "gradio_api/call/compare", json={"data": ["tiny", True, [], "Hi", 0.8, 50, 1.0, 4, 1]},
                   timeout=30)
    assert r.status_code in (401, 403), r.text
    assert _upload(url, "x.txt", b"hello").status_code in (401, 403)
    bad = httpx.post(url + "login", data={"username": "ann", "password": "wrong"}, timeout=30)
    assert bad.status_code >= 400
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError
    with pytest.raises(AuthenticationError, match="credentials were not provided"):  # /config answered 401
        Client(url, verbose=False)


def test_signed_in_users_are_recorded_with_their_adapters(authed):
    from gradio_client import Client
    url, studio = authed
    ann = Client(url, auth=USERS[0], verbose=False)
    msg, run, *_ = ann.predict("tiny", "pirates", "anns-run", ["attn.c_attn"], 4, 8, 0.0, 2e-3, 3, 2, 1, 32, 0, 7,
                              "Ahoy", api_name="/start_training")
    assert run == "anns-run" and "Started" in msg
    snap = studio.runs.wait(120)
    assert snap["state"] == "finished" and snap["user"] == "ann", snap["message"]
    meta = json.loads((studio.library.root / "anns-run" / "studio.json").read_text())
    assert meta["user"] == "ann"
    assert next(e for e in studio.library.list() if e.name == "anns-run").user == "ann"
    # a signed-in user still cannot read files outside the upload cache
    login = httpx.post(url + "login", data={"username": "bob", "password": USERS[1][1]}, timeout=30)
    assert login.status_code == 200
    r = httpx.get(url + "gradio_api/file=/etc/passwd", cookies=login.cookies, timeout=30)
    assert r.status_code == 403 and "root:" not in r.text
    # bob compares with ann's adapter, and cannot stop a run ann started
    bob = Client(url, auth=USERS[1], verbose=False)
    out = bob.predict("tiny", True, [], "Ahoy", 0.8, 50, 1.0, 4, 3, api_name="/compare")
    assert out[0].startswith("Ahoy")
    ann.predict("tiny", "pirates", "anns-long", ["attn.c_attn"], 4, 8, 0.0, 2e-3, 5000, 2, 1, 32, 0, 7, "",
                api_name="/start_training")
    end = time.time() + 60
    while studio.runs.snapshot()["state"] != "running" and time.time() < end:
        time.sleep(0.05)
    job_id = str(studio.runs.snapshot()["id"])
    assert "No training job of yours" in bob.predict(api_name="/stop_training")
    assert "only they (or an admin) can stop it" in bob.predict(job_id, api_name="/stop_training")  # refused
    time.sleep(0.5)
    assert studio.runs.snapshot()["state"] == "running"
    assert "Stopping" in ann.predict(api_name="/stop_training")
    assert studio.runs.wait(60)["state"] == "stopped"
