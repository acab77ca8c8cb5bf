"""Developer tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``bench``, ``demo``."""

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


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library."""
    session.install("-e", ".[demo,validate,otlp]", "certifi", "mypy>=1.11")
    session.run("mypy", "--strict", "src/oisp")


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
def demo(session: nox.Session) -> None:
    """Install oisp and run the embedded default main job: ``oisp demo``."""
    session.install("-e", ".[demo]")
    session.run("oisp", "demo", *session.posargs)
