"""The Gradio page: a header and one tab per module of ui/tabs, in order.

Each tab module builds its components and wires its events (``build(shared)``, see
ui/tabs/__init__.py); this file only assembles them and serves the page. Every handler turns a
LorakitError (a user's mistake) into a one-line message on the page; any other exception is
shown too, never swallowed. Components the browser test needs carry an ``elem_id``
(``train-start``, ``chat-input``, ...).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never calls home

import gradio as gr

from ..errors import LorakitError
from .inference import ModelSession
from .tabs import chat, compare, evaluate, export, models, train
from .tabs.common import Shared
from .training import RunManager
from .workdir import DEFAULT_MAX_UPLOAD_BYTES, Workdir, upload_limit

# The tabs, left to right. A tab reads only components of the tabs before it (Chat and Compare
# use the Models tab's base model). To add one, write ui/tabs/NAME.py with build(shared) -> gr.Tab,
# like the others (Export: ui/tabs/export.py), and list it here.
TABS = (train, models, chat, compare, evaluate, export)
CSS = train.CSS


def build_app(workdir: Workdir, runs: RunManager | None = None, session: ModelSession | None = None) -> gr.Blocks:
    with gr.Blocks(title="lorakit", analytics_enabled=False) as page:
        gr.Markdown(
            f"# lorakit\nFine-tune with LoRA, talk to the result, compare it with the base model. "
            f"Workdir: `{workdir.root}`",
            elem_id="header",
        )
        shared = Shared(workdir, runs or RunManager(), session or ModelSession())
        with gr.Tabs(elem_id="tabs"):
            tabs = [module.build(shared) for module in TABS]
        shared.wire_lists(page, tabs)  # adapter and dataset lists: fresh on load, on each tab, after a run
    # No API description of the handlers: Gradio puts it (with every dropdown's choices: file paths of
    # the workdir) into the page it serves, the login page included. The page's own calls still work.
    for fn in page.fns.values():
        fn.api_visibility = "private"
    return page


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def launch(
    workdir: str | Path = "lorakit-ui",
    host: str = "127.0.0.1",
    port: int = 7860,
    users: list[tuple[str, str]] | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> None:
    """Serve the page until interrupted; a training run still going is stopped on the way out
    (its complete checkpoints stay). ``users``: (user, password) pairs for Gradio's login (the
    command requires them for a --host other machines can reach, ui/security.py); None: no login.
    Never a share link."""
    import atexit
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        if os.name == "posix":  # as the server binds: connections of a closed server (TIME_WAIT) do not count
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise LorakitError(
                f"--port: cannot listen on {host}:{port} ({e.strerror or e}); "
                "is another page running there? choose another --port"
            ) from None
    wd = Workdir(workdir, max_upload_bytes=max_upload_bytes)
    runs = RunManager()
    atexit.register(runs.shutdown)
    if threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) ends the page like Ctrl-C: the server closes and a run in progress is stopped
        signal.signal(signal.SIGTERM, _interrupt)
    page = build_app(wd, runs, ModelSession())
    page.queue(default_concurrency_limit=4)
    login = f", login required ({len(users)} user{'s' if len(users) != 1 else ''})" if users else ""
    print(f"lorakit ui: workdir {wd.root}{login}, uploads up to {upload_limit(wd)}", flush=True)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,  # never a public gradio.live link (GRADIO_SHARE is ignored too)
        auth=list(users) if users else None,
        auth_message="lorakit ui: sign in with a user of --auth-file / --auth" if users else None,
        max_file_size=max_upload_bytes,  # Gradio refuses bigger uploads before they reach the workdir
        show_error=True,
        allowed_paths=[str(wd.root)],
        theme=gr.themes.Default(primary_hue="indigo"),
        css=CSS,
        footer_links=["gradio"],
    )
