import json

import pytest


@pytest.fixture
def write(tmp_path):
    """write(name, content) -> Path: bytes and str are written as is; anything else as JSON
    (or as JSON lines when the name ends in .jsonl and content is a list)."""

    def _write(name, content):
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
        else:
            path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        return path

    return _write
