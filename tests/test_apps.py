"""Which app: from request headers as the apps send them, from real processes started with a chosen argv (and
ancestors), merged; plugins add apps through the ``oisp_apps`` hook."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oisp
from oisp.apps import AppSignature, AppTable, merge
from oisp.attribution import Attributor
from oisp.events import App
from oisp.events.context import ParentProcess, ProcessInfo
from oisp.http.exchange import Headers
from oisp.plugins import create_plugin_manager

TABLE = AppTable()

#: Request headers as the apps send them (captured from the apps' own traffic and documentation).
REQUESTS: list[tuple[str, str | None, list[tuple[str, str]]]] = [
    ("claude-code", "2.0.14", [("user-agent", "claude-cli/2.0.14 (external, cli)"), ("x-app", "cli"),
                               ("anthropic-beta", "claude-code-20250219,oauth-2025-04-20")]),
    ("codex-cli", "0.46.0", [("user-agent", "codex_cli_rs/0.46.0 (Mac OS 15.6.1; arm64) iTerm.app/3.6.1"),
                             ("originator", "codex_cli_rs")]),
    ("codex-cli", None, [("user-agent", "node"), ("originator", "codex_exec")]),
    ("codex-vscode", "0.4.19", [("user-agent", "codex_vscode/0.4.19 (Windows 10.0.26100; x86_64) vscode/1.104.1"),
                                ("originator", "codex_vscode")]),
    ("gemini-cli", "0.8.2", [("user-agent",
                              "GeminiCLI/0.8.2/gemini-2.5-pro (linux; x64) google-api-nodejs-client/9.15.1")]),
    ("gemini-cli", "0.1.5", [("user-agent", "GeminiCLI/0.1.5 (darwin; arm64)")]),
    ("github-copilot-vscode", "0.31.2", [("user-agent", "GitHubCopilotChat/0.31.2"),
                                         ("editor-version", "vscode/1.104.1"),
                                         ("editor-plugin-version", "copilot-chat/0.31.2"),
                                         ("copilot-integration-id", "vscode-chat")]),
    ("github-copilot-jetbrains", None, [("user-agent", "ktor-client"), ("editor-version", "JetBrains-IU/252.23892.409"),
                                        ("editor-plugin-version", "copilot-intellij/1.5.58-243"),
                                        ("copilot-integration-id", "jetbrains-chat")]),
    ("cursor", None, [("user-agent", "connect-es/1.6.1"), ("x-cursor-client-version", "1.7.44"),
                      ("x-ghost-mode", "true")]),
    ("claude-desktop", "0.13.64", [("user-agent", "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
                                   "(KHTML, like Gecko) Claude/0.13.64 Chrome/138.0.7204.251 Electron/37.6.0 "
                                   "Safari/537.36")]),
    ("chatgpt-desktop", "1.2025.258", [("user-agent",
                                        "ChatGPT/1.2025.258 (Mac OS X 15.6.1; arm64; build 1758226495)")]),
    ("aider", None, [("user-agent", "litellm/1.77.5"), ("http-referer", "https://aider.chat"), ("x-title", "Aider")]),
    ("cline", None, [("user-agent", "OpenAI/JS 4.96.0"), ("http-referer", "https://cline.bot"), ("x-title", "Cline")]),
    ("roo-code", None, [("http-referer", "https://github.com/RooVetGit/Roo-Cline"), ("x-title", "Roo Code")]),
    ("continue", None, [("http-referer", "https://www.continue.dev/"), ("x-title", "Continue")]),
    ("opencode", "0.15.0", [("user-agent", "opencode/0.15.0 ai-sdk/provider-utils/3.0.9 runtime/bun/1.2.21")]),
    (None, None, [("user-agent", "OpenAI/Python 1.109.1"), ("x-stainless-lang", "python")]),
    (None, None, [("user-agent", "curl/8.5.0")]),
]


@pytest.mark.parametrize(("app_id", "version", "headers"), REQUESTS, ids=[f"{a}-{i}" for i, (a, _, _) in
                                                                         enumerate(REQUESTS)])
def test_the_app_a_request_names(app_id: str | None, version: str | None, headers: list[tuple[str, str]]) -> None:
    app = TABLE.for_request(Headers(headers))
    if app_id is None:
        assert app is None
        return
    assert app is not None and app.app_id == app_id and app.version == version
    assert app.tier == "identified" and app.extra["identified_by"] == "request"


def _process(name: str, exe: str | None = None, cmdline: str | None = None, bundle_id: str | None = None) \
        -> ProcessInfo:
    return ProcessInfo(pid=10, name=name, exe=exe, cmdline=cmdline, bundle_id=bundle_id)


@pytest.mark.parametrize(("process", "ancestors", "app_id", "host"), [
    (_process("node", "/usr/bin/node", "node /usr/local/bin/claude --resume"), [], "claude-code", None),
    (_process("node", "/usr/bin/node",
              "node /home/me/.npm-global/lib/node_modules/@google/gemini-cli/dist/index.js -p hi"), [], "gemini-cli",
     None),
    (_process("codex", "/opt/homebrew/bin/codex", "codex exec fix the tests"), [], "codex-cli", None),
    (_process("python3.12", "/usr/bin/python3.12", "/usr/bin/python3.12 /home/me/.local/bin/aider --model o3"), [],
     "aider", None),
    (_process("Claude", "/Applications/Claude.app/Contents/MacOS/Claude", bundle_id="com.anthropic.claudefordesktop"),
     [], "claude-desktop", None),
    (_process("Cursor Helper (Plugin)", "/Applications/Cursor.app/Contents/Frameworks/Cursor Helper (Plugin).app/"
              "Contents/MacOS/Cursor Helper (Plugin)"), [], "cursor", None),
    # An agent in the editor's terminal is the agent; the editor stays as its host.
    (_process("claude", "/home/me/.local/bin/claude"),
     [ParentProcess(pid=9, name="bash"), ParentProcess(pid=8, name="code", exe="/usr/share/code/code")],
     "claude-code", "vscode"),
    # The editor's own extension host: the editor (an AI host) when nothing more specific is known.
    (_process("code", "/usr/share/code/code", "/usr/share/code/code --type=utility"), [], "vscode", None),
    (_process("python3", "/usr/bin/python3", "python3 my_agent.py"), [ParentProcess(pid=2, name="bash")], None, None),
])
def test_the_app_a_process_chain_names(process: ProcessInfo, ancestors: list[ParentProcess], app_id: str | None,
                                       host: str | None) -> None:
    app = TABLE.for_process(process, ancestors)
    if app_id is None:
        assert app is None
        return
    assert app is not None and app.app_id == app_id and app.extra.get("host_app") == host


def test_merge_prefers_what_the_request_says_and_keeps_the_host() -> None:
    vscode = App(app_id="vscode", name="Visual Studio Code", is_ai_host=True)
    copilot = App(app_id="github-copilot-vscode", name="GitHub Copilot (VS Code)", version="0.31.2")
    claude = App(app_id="claude-code", name="Claude Code")
    merged = merge(vscode, copilot)
    assert merged is not None and merged.app_id == "github-copilot-vscode" and merged.extra["host_app"] == "vscode"
    assert merge(claude, App(app_id="vscode", name="VS Code", is_ai_host=True)) is claude
    same = merge(claude, App(app_id="claude-code", name="Claude Code", version="2.0.14"))
    assert same is not None and same.version == "2.0.14"
    assert merge(None, copilot) is copilot and merge(claude, None) is claude


@pytest.fixture
def program(tmp_path: Path) -> Iterator[Any]:
    """Start a real process under a chosen program name and argv (a copy of python, renamed)."""
    started: list[subprocess.Popen[str]] = []

    ready = "import sys; print('ready', flush=True); sys.stdin.read()"

    def start(name: str, *argv: str, parent: str | None = None) -> int:
        """The pid of the process, once it runs (it says so: its command line is readable from then on)."""
        exe = tmp_path / name
        if not exe.exists():
            exe.symlink_to(sys.executable)
        if parent is None:
            proc = subprocess.Popen([str(exe), "-c", ready, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
            started.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            return proc.pid
        parent_exe = tmp_path / parent
        if not parent_exe.exists():
            parent_exe.symlink_to(sys.executable)
        code = ("import subprocess, sys; p = subprocess.Popen([sys.argv[1], '-c', sys.argv[2], *sys.argv[3:]], "
                "stdin=subprocess.PIPE); print(p.pid, flush=True); sys.stdin.read(); p.communicate(b'')")
        proc = subprocess.Popen([str(parent_exe), "-c", code, str(exe), ready, *argv], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None
        lines = {proc.stdout.readline().strip(), proc.stdout.readline().strip()}  # the child's pid and "ready"
        assert "ready" in lines
        return int(next(line for line in lines if line != "ready"))

    yield start
    for proc in started:
        proc.communicate("")


@pytest.mark.skipif(sys.platform != "linux", reason="the process tests name programs through renamed copies of python")
def test_real_processes_are_named_by_their_argv_and_ancestors(program: Any) -> None:
    attributor = Attributor()
    # node-style: an interpreter running the agent's script (here python named "node" running ".../bin/gemini")
    pid = program("node", "/usr/local/lib/node_modules/@google/gemini-cli/bin/gemini")
    described = attributor.describe(pid)
    app = described.app
    assert app is not None and app.app_id == "gemini-cli", described.process
    assert app.extra["identified_by"] == "process"
    # Claude Code started from VS Code's terminal
    pid = program("claude", "--print", "hello", parent="code")
    app = attributor.describe(pid).app
    assert app is not None and app.app_id == "claude-code" and app.extra["host_app"] == "vscode"
    # nothing known
    pid = program("my-own-agent")
    assert attributor.describe(pid).app is None


class _AppsPlugin:
    @oisp.hookimpl
    def oisp_apps(self) -> list[Any]:
        return [
            {"app_id": "acme-agent", "name": "Acme Agent", "vendor": "Acme", "category": "dev_tools", "type": "cli",
             "match": {"user_agent": ["^AcmeAgent/(?P<version>[0-9.]+)"], "process_names": ["acme-agent"]}},
            AppSignature.from_mapping({"app_id": "acme-ide", "name": "Acme IDE", "is_ai_host": True,
                                       "match": {"headers": {"x-acme-ide": "."}}}),
            {"app_id": "broken", "match": {}},  # no name: logged and skipped
        ]


def test_plugins_add_apps_through_the_hook(caplog: pytest.LogCaptureFixture) -> None:
    plugins = create_plugin_manager(entrypoints=False)
    plugins.register(_AppsPlugin(), "acme-apps")
    table = AppTable.from_plugins(plugins)
    app = table.for_request(Headers([("user-agent", "AcmeAgent/1.2.3 (linux)")]))
    assert app is not None and app.app_id == "acme-agent" and app.version == "1.2.3"
    host = table.for_request(Headers([("x-acme-ide", "7")]))
    assert host is not None and host.is_ai_host is True
    assert table.for_process(ProcessInfo(name="acme-agent")) is not None
    assert table.for_request(Headers([("user-agent", "claude-cli/2.0.1 (external, cli)")])) is not None  # built-ins
    assert "broken" in caplog.text and "acme-apps" in caplog.text


def test_bad_entries_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="app_id and name"):
        AppSignature.from_mapping({"name": "x"})
    with pytest.raises(ValueError, match="invalid pattern"):
        AppSignature.from_mapping({"app_id": "x", "name": "x", "match": {"user_agent": ["("]}})
    with pytest.raises(ValueError, match="list of strings"):
        AppSignature.from_mapping({"app_id": "x", "name": "x", "match": {"process_names": "x"}})


def test_the_builtin_table_is_valid_and_ids_are_unique() -> None:
    ids = [s.app_id for s in TABLE.signatures]
    assert len(ids) == len(set(ids)) >= 20
    assert os.path.basename(__file__)  # the table loads from package data (importlib.resources)
