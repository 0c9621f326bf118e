"""Start the server: load the base (and the adapters named on the command line), then uvicorn."""

from __future__ import annotations

import os
import re

from ..console import info
from ..errors import LorakitError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=DIR`` (or just ``DIR``, named after its folder) -> [(name, dir)]."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = os.path.basename(os.path.normpath(spec))
        if not _NAME.match(name):
            raise LorakitError(
                f"--adapter {spec}: the name must be letters, digits, '.', '_' or '-' "
                "(at most 64), e.g. --adapter support=./lora-support"
            )
        if any(name == n for n, _ in out):
            raise LorakitError(f"--adapter {spec}: the name '{name}' is given twice")
        out.append((name, path))
    return out


def build(
    base: str,
    adapters: list[str] | None = None,
    *,
    template: str | None = None,
    dtype: str = "auto",
    max_batch_size: int = 8,
    max_queue: int = 64,
    batch_wait_ms: float = 10.0,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 1024,
    api_key: str | None = None,
    adapters_dir: str | None = None,
    max_body_bytes: int = 1 << 20,
    trust_remote_code: bool = False,
):
    """(engine, app) ready to serve."""
    from pathlib import Path

    from .app import create_app
    from .engine import Engine
    from .metrics import Metrics

    specs = parse_adapter_specs(adapters or [])
    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise LorakitError(f"--adapters-dir {adapters_dir}: not a folder")
    metrics = Metrics()
    engine = Engine(
        base,
        template=template,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        batch_wait_ms=batch_wait_ms,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        trust_remote_code=trust_remote_code,
        metrics=metrics,
    )
    try:
        for name, path in specs:
            engine.load_adapter(name, Path(path))
    except BaseException:
        engine.shutdown()
        raise
    app = create_app(
        engine, api_key=api_key, adapters_dir=adapters_dir, max_body_bytes=max_body_bytes, metrics=metrics
    )
    return engine, app


def serve(
    base: str,
    adapters: list[str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    **options,
) -> None:
    import uvicorn

    api_key = api_key or os.environ.get("LORAKIT_API_KEY") or None
    engine, app = build(base, adapters, api_key=api_key, **options)
    names = engine.model_names()
    info(
        f"serving {names[0]}"
        + (f" with adapters {', '.join(names[1:])}" if names[1:] else "")
        + f" at http://{host}:{port}/v1"
        + (" (API key required)" if api_key else "")
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        info(f"warning: listening on {host} without an API key: anyone who can reach it can use it")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
