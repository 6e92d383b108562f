"""What an INPUT of `pipeq submit` means: a JSON object as given, a URL or s3:// URI, a local file
(read and sent inline, since the worker may run elsewhere; its path only with --server-path),
else text. A name that looks like a file but is none is an error naming it, not a text."""

from __future__ import annotations

import base64
import json
import mimetypes
from pathlib import Path
from typing import Any

from pipeq.config.errors import InvalidInput


def cli_input(text: str, server_path: bool = False) -> Any:
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"INPUT {_short(text)} is not valid JSON: {exc}") from None
    if text.startswith(("http://", "https://")):
        return {"url": text}
    if text.startswith("s3://"):
        return {"s3": text}
    path = Path(text).expanduser()
    if path.is_file():
        if server_path:
            return {"path": str(path.resolve())}
        data = {"data": base64.b64encode(path.read_bytes()).decode()}
        mime = mimetypes.guess_type(path.name)[0]
        return {**data, "mime": mime} if mime else data
    if _names_a_file(text):
        raise InvalidInput(f"no such file: {text}")
    return text


def _names_a_file(text: str) -> bool:
    if any(char.isspace() for char in text):
        return False
    return "/" in text or mimetypes.guess_type(text)[0] is not None


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")
