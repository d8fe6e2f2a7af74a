"""The real studio served in-process on a free loopback port, for the browser and server tests."""
from __future__ import annotations

import socket
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_studio(tmp, auth=None, max_upload=None, before_build=None, demo=None, settings=None):
    """Yield (url, studio) for a 'tiny' studio on tmp/adapters and tmp/datasets; stops any run after.

    before_build(studio) runs before the UI is built (the API's dropdown choices are built with it).
    demo: keyword arguments of studio.demo.install (a public demo); settings: more of create_studio's keyword
    arguments.
    """
    from studio.app import build_ui, create_studio, launch_options
    studio = create_studio(tmp / "adapters", tmp / "datasets", "cpu", "tiny", auth=bool(auth) or demo is not None,
                           **(settings or {}))
    if demo is not None:
        from studio.demo import install
        install(studio, **demo)
    if before_build:
        before_build(studio)
    ui = build_ui(studio)
    options = launch_options(*([max_upload] if max_upload else []), demo=studio.demo)
    _, url, _ = ui.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                          quiet=True, auth=auth, **options)
    try:
        yield url, studio
    finally:
        studio.runs.stop_all(60)
        ui.close()
