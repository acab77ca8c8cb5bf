"""Developer tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``bench``, ``fuzz``, ``demo``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
EXAMPLE_PLUGINS = ["./tests/plugins/oisp-example-sink", "./tests/plugins/oisp-example-provider"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (root-only tests run when nox runs as root; CI does)."""
    session.install("-e", ".[test]", *EXAMPLE_PLUGINS)
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "bench", "noxfile.py")


#: The type-check passes: the whole library as on Linux and again as on Windows (whose code cannot run here, so
#: the type checker is its one guard), and the macOS trust store (the one macOS-only module) with what it imports.
#: mypy evaluates ``sys.platform`` checks statically, so each pass checks the branches that run on its platform.
TYPECHECK_PLATFORMS = {
    "linux": ["src/oisp"],
    "win32": ["src/oisp"],
    "darwin": ["src/oisp/tls/trust.py", "src/oisp/tls/_trust_macos.py", "src/oisp/activity/monitor.py",
               "src/oisp/activity/polling.py", "src/oisp/activity/connections.py", "src/oisp/activity/flow.py",
               "src/oisp/activity/sockpoll.py", "src/oisp/activity/watcher.py"],
}


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library, for Linux, Windows (--platform win32) and the macOS trust store."""
    # pytest: oisp.testing; watch: the directory watcher's watchdog
    session.install("-e", ".[demo,validate,otlp,kafka,watch]", "certifi", "pytest>=8", "mypy>=1.11")
    for platform, paths in TYPECHECK_PLATFORMS.items():
        # One cache per platform: the platform is part of mypy's cache key, so a shared one is rebuilt every pass.
        session.run("mypy", "--strict", "--platform", platform, "--cache-dir", f".mypy_cache/{platform}", *paths)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation with mkdocs --strict."""
    session.install("-e", ".", "mkdocs>=1.6")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run every benchmark script under bench/ and print their tables."""
    session.install("-e", ".[test]")
    import pathlib

    for script in sorted(pathlib.Path("bench").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """The long fuzzing tier: coverage-guided (atheris) runs of every network parser; ``-- --seconds N target``."""
    session.install("-e", ".[test]", "atheris>=2.3")
    session.run("python", "tests/fuzz/run.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Install oisp and run the embedded default main job: ``oisp demo``."""
    session.install("-e", ".[demo]")
    session.run("oisp", "demo", *session.posargs)
