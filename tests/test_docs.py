"""The documentation builds with ``mkdocs build --strict``, and every example in it is true.

Examples are marked with an HTML comment on the line right before their fenced block:

``<!-- test: python -->``
    run with this interpreter in a subprocess, in the page's sandbox directory.
``<!-- test: toml [FILE] -->``
    an ``oisp.toml``: parsed by :func:`oisp.config.parse_config` and checked the way ``oisp run`` checks it
    before listening (endpoints, CA, listen address, proxy settings, redaction patterns, sinks); with ``FILE``
    it is then left in the sandbox under that name for the blocks after it.
``<!-- test: shell -->``
    ``oisp`` commands only (``eval "$(oisp ...)"`` included), run by bash in the sandbox, each must exit 0;
    ``oisp run`` gets ``--listen 127.0.0.1:0``, is left to start, then stopped with SIGINT and must exit 0.
``<!-- test: json-event -->``
    one OISP event: ``oisp.Event.from_json`` reads it and writes it back unchanged.
``<!-- test: skip (REASON) -->``
    not run (root, PowerShell, the network, trust stores...); the reason is required.
``<!-- source: PATH -->``
    an excerpt of the repository file PATH: it must appear in that file verbatim.

Every ``python``, ``toml``, shell or ``json`` block of a page in ``docs/`` needs a marker, and the README's
Python blocks do too. Whatever the marker, every ``oisp ...`` command in a block or an inline code span must
parse with oisp's real argument parser, and every inline ```--flag``` must be one of oisp's options.

The sandbox is one temporary directory per page (the blocks of a page run in order and share it), with
``HOME``, ``XDG_CONFIG_HOME``, ``LOCALAPPDATA`` and ``USERPROFILE`` pointing into it: the examples create their
CA, configuration and event files there, bind only port 0, and never touch a trust store.

Also checked: every page is in the ``mkdocs.yml`` nav (and every nav entry is a page, but for pages others own),
and ``docs/configuration.md`` documents every key ``parse_config`` reads and every ``oisp run`` flag.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from oisp.cli.main import _parser
from oisp.events import Event

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)
EXAMPLE_FILES = [*PAGES, ROOT / "README.md"]

#: Pages other engineers own that the nav already lists; they may not exist yet.
OWNED_ELSEWHERE = {"performance.md"}

SHELL_LANGUAGES = {"sh", "shell", "bash", "console", "powershell", "ps1"}
NEEDS_MARKER = {"python", "py", "toml", "json", *SHELL_LANGUAGES}
MARKER = re.compile(r"^<!--\s*(test|source):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<info>[\w+-]*)\s*$")


@attrs.frozen
class Block:
    """One fenced code block and the marker before it."""

    path: Path
    line: int
    language: str
    text: str
    marker: str | None  # "test: python", "source: tests/...", or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str | None:
        if self.marker is None or not self.marker.startswith("test:"):
            return None
        return self.marker.removeprefix("test:").strip().split(" ", 1)[0]

    @property
    def argument(self) -> str:
        rest = self.marker.removeprefix("test:").strip() if self.marker else ""
        return rest.split(" ", 1)[1].strip() if " " in rest else ""


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the marker comment on the line before it."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        start = i
        close = re.compile(rf"^{opening['fence']}\s*$")
        i += 1
        body: list[str] = []
        while i < len(lines) and not close.match(lines[i]):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path.relative_to(ROOT)}:{start + 1}: unclosed code block"
        i += 1
        marker = None
        if start > 0 and (m := MARKER.match(lines[start - 1].strip())):
            marker = f"{m[1]}: {m[2]}"
        found.append(Block(path, start + 1, opening["info"].lower(), "\n".join(body) + "\n", marker))
    return found


def prose(path: Path) -> str:
    """The Markdown of ``path`` without its fenced blocks (inline code spans stay)."""
    out: list[str] = []
    in_block = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line) or (in_block and line.startswith("```")):
            in_block = not in_block
            continue
        if not in_block:
            out.append(line)
    return "\n".join(out)


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- the build and the nav ---------------------------------------------------------------------------------


def test_mkdocs_build_strict_succeeds(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install 'oisp[test]' brings it)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def _nav_files(node: object) -> Iterator[str]:
    if isinstance(node, str):
        if not node.startswith(("http://", "https://")):
            yield node
    elif isinstance(node, list):
        for item in node:
            yield from _nav_files(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _nav_files(value)


def _nav() -> list[str]:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of mkdocs) is not installed")

    class _Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use mkdocs' own tags (!ENV, !relative); the nav never does, so read them as plain values.
    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)
    return list(_nav_files(config.get("nav", [])))


def test_every_page_is_in_the_nav() -> None:
    nav = _nav()
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    missing = sorted(pages - set(nav))
    assert not missing, f"pages not in the mkdocs.yml nav: {missing}"


def test_every_nav_entry_is_a_page() -> None:
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    dangling = sorted(set(_nav()) - pages - OWNED_ELSEWHERE)
    assert not dangling, f"nav entries without a page in docs/: {dangling}"


# -- markers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=page_id)
def test_every_example_is_marked(path: Path) -> None:
    problems = []
    for block in blocks(path):
        needs = block.language in NEEDS_MARKER if path.parent == DOCS or DOCS in path.parents \
            else block.language in ("python", "py")
        if block.marker is None:
            if needs:
                problems.append(f"{block.where}: a {block.language} block without a <!-- test: ... --> marker")
            continue
        if block.marker.startswith("source:"):
            continue
        if block.kind not in ("python", "toml", "shell", "json-event", "skip"):
            problems.append(f"{block.where}: unknown marker {block.marker!r}")
        elif block.kind == "skip" and not re.fullmatch(r"\(.+\)", block.argument):
            problems.append(f"{block.where}: 'test: skip' needs a reason: <!-- test: skip (why) -->")
    assert not problems, "\n".join(problems)


# -- commands and flags ----------------------------------------------------------------------------------------


def _parses(argv: list[str]) -> str | None:
    """None when ``oisp argv`` parses, else why not."""
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(io.StringIO()):
        try:
            _parser()[0].parse_args(argv)
        except SystemExit as exc:
            if exc.code not in (0, None):  # --help and --version exit 0
                return sink.getvalue().strip().splitlines()[-1] if sink.getvalue().strip() else f"exit {exc.code}"
    return None


def _command_lines(block: Block) -> Iterator[str]:
    """Every ``oisp ...`` command of a shell-like block: whole lines and ``$(oisp ...)``/``(oisp ...)``."""
    powershell = block.language in ("powershell", "ps1")
    for line in block.text.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].replace('"$(command -v oisp)"', "oisp")
        stripped = re.sub(r"^(\$ |PS> |sudo (-E )?|& )", "", line.strip())
        if stripped.startswith("oisp "):
            yield stripped
        yield from re.findall(r"\((oisp [^()]*)\)" if powershell else r"\$\((oisp [^()]*)\)", line)


def _check_command(text: str, *, inline: bool = False) -> str | None:
    """Why ``text`` (``oisp ...``) is not a command oisp takes, or None. Prose may name a command without its
    operands (``oisp replay``), so inline spans may leave required arguments out."""
    text = text.split(" | ", 1)[0]  # `oisp ca env --shell fish | source`
    try:
        argv = shlex.split(text, posix=True)[1:]
    except ValueError as exc:
        return f"cannot split {text!r}: {exc}"
    problem = _parses(argv)
    if problem is not None and inline and "the following arguments are required" in problem:
        return None
    return None if problem is None else f"{text!r} does not parse: {problem}"


def _all_options(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """Every option string of oisp's parser and of all its subcommands (``oisp ca env --shell`` included)."""
    parser = parser or _parser()[0]
    options = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _all_options(sub)
    return options


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=page_id)
def test_every_oisp_command_and_flag_exists(path: Path) -> None:
    problems = []
    for block in blocks(path):
        if block.language in SHELL_LANGUAGES:
            for command in _command_lines(block):
                if (problem := _check_command(command)) is not None:
                    problems.append(f"{block.where}: {problem}")
    text = prose(path)
    for span in re.findall(r"`([^`\n]+)`", text):
        if span.startswith("oisp ") and (problem := _check_command(span, inline=True)) is not None:
            problems.append(f"{path.relative_to(ROOT)}: inline {problem}")
    options = _all_options()
    for flag in re.findall(r"`(--[a-z][\w-]*)", text):
        if flag not in options:
            problems.append(f"{path.relative_to(ROOT)}: inline `{flag}` is not an oisp option")
    assert not problems, "\n".join(problems)


# -- running the examples --------------------------------------------------------------------------------------

_TOML_CHECK = """
import sys, tomllib
from pathlib import Path
import attrs
from oisp.config import parse_config
from oisp.cli.run import build_sinks, endpoint_table, load_ca, parse_listen
from oisp.plugins import create_plugin_manager
from oisp.proxy import ProxyConfig, UpstreamOverride
from oisp.redaction import Redactor

config = parse_config(tomllib.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
plugins = create_plugin_manager()
endpoints = endpoint_table(plugins, config)
load_ca(attrs.evolve(config, confdir=Path("toml-check-ca")), endpoints)
host, port = parse_listen(config.listen)
# Files the example names (an upstream CA bundle, a pricing bundle) are the reader's; everything else is built.
ProxyConfig(mode=config.mode, listen_host=host, listen_port=port, upstream_insecure=config.upstream_insecure,
            overrides=tuple(UpstreamOverride.parse(item) for item in config.resolve),
            reverse_target=config.reverse_target, pinned_ttl=config.pinned_ttl,
            **({"body_cap": config.body_cap} if config.body_cap else {}))
Redactor(profile=config.redaction_profile, extra_patterns=config.redaction_patterns)
for sink in build_sinks(plugins, config).values():
    sink.close()
"""


def _sandbox_env(sandbox: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    env.update(HOME=str(sandbox), USERPROFILE=str(sandbox), XDG_CONFIG_HOME=str(sandbox / ".config"),
               LOCALAPPDATA=str(sandbox / "AppData" / "Local"), PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def _require_imports(block: Block) -> None:
    """Skip (fail on CI) a Python example whose example plugin package is not installed."""
    for node in ast.walk(ast.parse(block.text)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            top = name.split(".")[0]
            if top.startswith("oisp_example_") and importlib.util.find_spec(top) is None:
                package = top.replace("_", "-")
                message = f"{block.where} needs {package}: pip install ./tests/plugins/{package}"
                if os.environ.get("CI"):
                    pytest.fail(message)
                pytest.skip(message)


def _run(args: list[str], sandbox: Path, block: Block, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=sandbox, env=_sandbox_env(sandbox), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{block.where}: exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-4000:]}")
    return result


def _bash_oisp(line: str) -> list[str]:
    # `exec` makes the oisp process the one we signal; the function runs this interpreter's oisp.
    function = f'oisp() {{ exec {shlex.quote(sys.executable)} -m oisp.cli.main "$@"; }}'
    return ["bash", "-c", f"{function}\n{line}"]


def _run_proxy(line: str, sandbox: Path, block: Block) -> None:
    """Start an ``oisp run`` line on a free port, wait until it listens, stop it with SIGINT."""
    if re.search(r"--listen[ =]\S+", line):
        line = re.sub(r"--listen[ =]\S+", "--listen 127.0.0.1:0", line)
    else:
        line += " --listen 127.0.0.1:0"
    process = subprocess.Popen(_bash_oisp(line), cwd=sandbox, env=_sandbox_env(sandbox), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    try:
        deadline = time.monotonic() + 60
        assert process.stderr is not None
        while time.monotonic() < deadline:
            text = process.stderr.readline()
            if not text:
                break
            stderr.append(text)
            if " listening on " in text:
                time.sleep(1)  # the signal handler is installed just after the proxy reports it listens
                break
        assert any(" listening on " in s for s in stderr), f"{block.where}: {line!r} did not start:\n{''.join(stderr)}"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, f"{block.where}: {line!r} exited {process.returncode}:\n{''.join(stderr)}{err}"


def _run_shell(block: Block, sandbox: Path) -> None:
    if sys.platform == "win32":
        pytest.skip("the shell examples run under bash")
    for raw in block.text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert line.startswith(("oisp ", 'eval "$(oisp ')), (
            f"{block.where}: a 'test: shell' block may hold only oisp commands, not {line!r}; "
            "mark the block <!-- test: skip (why) --> instead")
        if line.startswith("oisp run"):
            _run_proxy(line, sandbox, block)
        else:
            _run(_bash_oisp(line), sandbox, block)


def _check_source(block: Block) -> None:
    target = ROOT / block.marker.removeprefix("source:").strip()  # type: ignore[union-attr]
    assert target.is_file(), f"{block.where}: {target} does not exist"
    assert block.text.strip("\n") in target.read_text(encoding="utf-8"), (
        f"{block.where}: this excerpt is not (or no longer) in {target.relative_to(ROOT)}; copy it again")


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=page_id)
def test_every_example_runs(path: Path, tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    for block in blocks(path):
        if block.marker is None:
            continue
        if block.marker.startswith("source:"):
            _check_source(block)
            continue
        kind = block.kind
        if kind == "python":
            _require_imports(block)
            script = sandbox / f"example_{block.line}.py"
            script.write_text(block.text, encoding="utf-8")
            _run([sys.executable, str(script)], sandbox, block)
        elif kind == "toml":
            name = block.argument or f"example_{block.line}.toml"
            config = sandbox / name
            config.write_text(block.text, encoding="utf-8")
            _run([sys.executable, "-c", _TOML_CHECK, str(config)], sandbox, block)
        elif kind == "shell":
            _run_shell(block, sandbox)
        elif kind == "json-event":
            value = json.loads(block.text)
            assert Event.from_json(block.text).to_dict() == value, f"{block.where}: the event does not round-trip"
        # "skip (reason)": not run; its oisp commands are checked by test_every_oisp_command_and_flag_exists


# -- the configuration reference covers oisp.toml and `oisp run` ------------------------------------------------


def _config_keys() -> set[str]:
    """Every key ``parse_config`` reads, as ``section.key``, found in its source."""
    tree = ast.parse((ROOT / "src" / "oisp" / "config.py").read_text(encoding="utf-8"))
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "parse_config")
    sections: dict[str, str] = {}
    keys: set[str] = set()
    readers = {"string", "path", "boolean", "number", "strings", "table", "_get"}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name) and \
                node.value.func.value.id == "root" and isinstance(node.targets[0], ast.Name):
            argument = node.value.args[0]
            if isinstance(argument, ast.Constant):
                sections[node.targets[0].id] = str(argument.value)
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in readers and \
                isinstance(node.func.value, ast.Name) and node.args and isinstance(node.args[0], ast.Constant):
            owner = node.func.value.id
            key = str(node.args[0].value)
            if owner == "root":
                if key == "sinks":
                    keys.add("sinks")
            elif owner in sections:
                keys.add(f"{sections[owner]}.{key}")
    return keys


def test_configuration_reference_lists_every_key() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    documented: set[str] = set()
    section = None
    for line in text.splitlines():
        heading = re.match(r"^##+ `\[{1,2}([\w.]+)\]{1,2}`", line)
        if heading:
            section = heading[1]
            if section == "sinks":
                documented.add("sinks")
            continue
        row = re.match(r"^\| `([\w-]+)` \|", line)
        if row and section and section != "sinks":
            documented.add(f"{section}.{row[1]}")
    keys = _config_keys()
    assert keys, "found no keys in oisp/config.py; has parse_config changed shape?"
    assert not keys - documented, f"oisp.toml keys missing from docs/configuration.md: {sorted(keys - documented)}"
    assert not documented - keys, f"docs/configuration.md documents keys oisp.toml lacks: {sorted(documented - keys)}"


def test_configuration_reference_names_every_run_flag() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    run = _parser()[1]["run"]
    flags = {s for s in run._option_string_actions if s.startswith("--") and s != "--help"}
    missing = sorted(f for f in flags if f"`{f}" not in text)
    assert not missing, f"`oisp run` flags missing from docs/configuration.md: {missing}"
