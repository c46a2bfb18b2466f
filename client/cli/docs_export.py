"""``uds-client docs --output DIR``: Swagger UI (read-only) and ReDoc pages (``pages/``) with the
spec inlined, ``openapi.json``, and ``fastapi-offline``'s assets: API docs that open from ``file://``."""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from client._errors import ClientError, UsageError
from client.address import to_url
from client.cli._commands import client_for

ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")

# file: when opened from disk, 'self' when served; blocks ReDoc 2's one remote image (a logo).
CSP = (
    "default-src 'none'; script-src 'self' file: 'unsafe-inline'; style-src 'self' file: 'unsafe-inline'; "
    "img-src 'self' file: data:; font-src 'self' file: data:; worker-src 'self' blob:; connect-src 'none'"
)
_SCRIPT_SAFE = str.maketrans({c: f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Exit codes: 0 written; 1 the server answered an error or no OpenAPI document; "
    parser.epilog += "2 --output is a file or cannot be written; 3 the socket cannot be reached."
    where = "directory to write index.html (Swagger UI), redoc.html, openapi.json and assets/ into; "
    where += "created if missing, existing files replaced"
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help=where)


def run(args: argparse.Namespace) -> int:
    """Fetch the spec, write the offline docs, print where they are."""
    with client_for(args) as client:
        spec = client.openapi()
    if not isinstance(spec.get("openapi"), str) or not isinstance(spec.get("paths"), dict):
        raise ClientError(
            f"{to_url(args.socket)} answered /openapi.json with something that is not an OpenAPI document"
        )
    written = export(spec, Path(args.output))
    print(f"Wrote {', '.join(str(p) for p in written)}")
    print(f"Open {written[0].resolve().as_uri()} (Swagger UI) or {written[1].resolve().as_uri()} (ReDoc)")
    return 0


def assets_directory() -> Path:
    """The ``fastapi-offline`` package's static directory (found without importing FastAPI)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the fastapi-offline package is not installed; pip install fastapi-offline")
    directory = Path(next(iter(spec.submodule_search_locations))) / "static"
    missing = [name for name in ASSETS if not (directory / name).is_file()]
    if missing:
        raise UsageError(f"fastapi-offline in {directory} lacks {', '.join(missing)}; reinstall it")
    return directory


def render(spec: dict[str, Any], page: str) -> str:
    """The page ``page`` (``swagger`` or ``redoc``) with ``spec`` inlined."""
    info = spec.get("info")
    title = html.escape(str((info.get("title") if isinstance(info, dict) else None) or "API"))
    # The spec as JSON that is safe inside a <script> element: no </script>, no <!--.
    script = json.dumps(spec, ensure_ascii=False, separators=(",", ":")).translate(_SCRIPT_SAFE)
    template = resources.files("client.cli").joinpath(f"pages/{page}.html").read_text(encoding="utf-8")
    return template % {"title": title, "spec": script, "csp": CSP}


def export(spec: dict[str, Any], output: Path) -> list[Path]:
    """Write the pages, the spec and the assets into ``output``; return the written paths."""
    source = assets_directory()
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} is a file, not a directory; name a directory")
    assets = output / "assets"
    try:
        assets.mkdir(parents=True, exist_ok=True)
        pages = {"index.html": render(spec, "swagger"), "redoc.html": render(spec, "redoc")}
        pages["openapi.json"] = json.dumps(spec, indent=2, ensure_ascii=False) + "\n"
        files = [_write(output / name, text.encode()) for name, text in pages.items()]
        for name in ASSETS:
            _write(assets / name, (source / name).read_bytes())
    except OSError as exc:
        where = exc.filename or output
        reason = (exc.strerror or type(exc).__name__).lower()
        raise UsageError(f"cannot write {where} ({reason}); choose another --output directory") from exc
    return [*files, assets]


def _write(path: Path, data: bytes) -> Path:
    """Replace ``path`` atomically, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
