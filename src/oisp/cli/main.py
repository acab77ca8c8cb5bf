"""``oisp`` command line: ``run``, ``demo``, ``ca``, ``replay``, ``plugins``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from oisp._version import __version__
from oisp.config import Config, load_config
from oisp.errors import ConfigurationError, OispError
from oisp.hookspecs import EndpointSpec
from oisp.proxy import ProxyMode

__all__ = ["main"]

logger = logging.getLogger("oisp.cli")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's own (whose usage a mistake in its flags should show)."""
    parser = argparse.ArgumentParser(prog="oisp", description="See every AI API call this machine makes.")
    parser.add_argument("--version", action="version", version=f"oisp {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    # -v is accepted after the subcommand too (oisp run -v), adding to any given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (-vv: debug)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the proxy and write events", parents=[common],
                              description="Flags override the configuration file (oisp.toml).")
    run.add_argument("--config", type=Path, help="configuration file (default: oisp.toml in the config directory)")
    run.add_argument("--mode", choices=[m.value for m in ProxyMode])
    run.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8080)")
    run.add_argument("--confdir", type=Path, help="where the CA lives (default: the per-user config directory)")
    run.add_argument("--output", type=Path, help="append events to this JSONL file (created 0600)")
    run.add_argument("--sink", action="append", metavar="KIND[:KEY=VALUE,...]",
                     help="also send events to a sink, as a [[sinks]] table would (repeatable), e.g. "
                          "--sink jsonl:path=events.jsonl,rotate_bytes=1000000")
    run.add_argument("--stdout", choices=["live", "line", "json", "none"],
                     help="terminal output: a live view (default on a terminal), one line per event (default "
                          "otherwise), JSON lines, or nothing")
    run.add_argument("--upstream-ca", type=Path, help="extra CA bundle trusted for upstream servers")
    run.add_argument("--insecure-upstream", action="store_true", default=None,
                     help="do not verify upstream certificates (dangerous)")
    run.add_argument("--resolve", action="append", metavar="HOST:PORT:ADDR[:PORT]",
                     help="connect to ADDR when the upstream is HOST:PORT (like curl --resolve/--connect-to)")
    run.add_argument("--reverse-target", help="reverse mode: the upstream base URL, e.g. https://api.openai.com")
    run.add_argument("--redaction", choices=["default", "metadata-only"])
    run.add_argument("--body-cap", type=int, help="bytes of each body kept for decoding (default 16 MiB)")
    run.add_argument("--decoder", choices=["process", "inline"],
                     help="decode in a separate process (default: the relay never waits for decoding) or inline "
                          "in the proxy's event loop")
    run.add_argument("--pricing", type=Path, help="OISP spec bundle with model pricing, for costs in USD")
    run.add_argument("--add-endpoint", action="append", metavar="PROVIDER=HOST[:PORT]",
                     help="also intercept HOST as PROVIDER (mcp=HOST for an MCP server; PROVIDER=http://HOST:PORT "
                          "for a plain-HTTP one)")
    run.add_argument("--remove-endpoint", action="append", metavar="HOST", help="do not intercept HOST")
    run.add_argument("--interface", action="append", metavar="NAME",
                     help="transparent mode: divert on this interface (repeatable; default: the real interfaces)")
    run.add_argument("--activity", action=argparse.BooleanOptionalAction, default=None,
                     help="observe the processes and files of AI-calling programs (default: on in transparent mode)")
    run.add_argument("--name-constrained-ca", action="store_true", default=None,
                     help="use a CA that can only vouch for the AI endpoints (install it instead of the full one)")

    replay = commands.add_parser("replay", help="re-emit recorded events (JSONL) to sinks", parents=[common])
    replay.add_argument("file", type=Path)
    replay.add_argument("--config", type=Path, help="configuration file whose [[sinks]] receive the events")
    replay.add_argument("--output", type=Path, help="write the events to this JSONL file")
    replay.add_argument("--stdout", choices=["line", "json", "none"], default=None)

    plugins = commands.add_parser("plugins", help="list the loaded provider and sink plugins", parents=[common])
    plugins.add_argument("--json", action="store_true")

    demo = commands.add_parser("demo", help="prove the pipeline offline: real proxy, local provider, real SDKs",
                               parents=[common])
    demo.add_argument("--output", type=Path, help="also write the demo's events to this JSONL file")
    demo.add_argument("--json", action="store_true", help="print events as JSON lines")

    from oisp.cli.ca import configure_parser as configure_ca

    ca = commands.add_parser("ca", help="the oisp CA: show, export, install into trust stores, client env",
                             parents=[common])
    configure_ca(ca)
    return parser, {"run": run, "replay": replay, "plugins": plugins, "demo": demo, "ca": ca}


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbosity == 0:
        logging.getLogger("oisp.cli").setLevel(logging.INFO)
        logging.getLogger("oisp.cli.run").setLevel(logging.INFO)


def _config_with_flags(args: argparse.Namespace) -> Config:
    """The configuration file's values, overridden by every flag that was given."""
    config = load_config(args.config)
    changes: dict[str, Any] = {}
    for flag, field in (("mode", "mode"), ("listen", "listen"), ("confdir", "confdir"),
                        ("upstream_ca", "upstream_ca"), ("insecure_upstream", "upstream_insecure"),
                        ("reverse_target", "reverse_target"), ("redaction", "redaction_profile"),
                        ("body_cap", "body_cap"), ("pricing", "pricing_bundle"), ("decoder", "decoder"),
                        ("name_constrained_ca", "ca_name_constrained"), ("activity", "activity")):
        value = getattr(args, flag, None)
        if value is not None:
            changes[field] = value
    if getattr(args, "resolve", None):
        changes["resolve"] = (*config.resolve, *args.resolve)
    if getattr(args, "add_endpoint", None):
        changes["endpoints_add"] = (*config.endpoints_add, *(_endpoint_flag(v) for v in args.add_endpoint))
    if getattr(args, "interface", None):
        changes["interfaces"] = tuple(args.interface)
    if getattr(args, "remove_endpoint", None):
        changes["endpoints_remove"] = (*config.endpoints_remove, *args.remove_endpoint)
    if args.body_cap is not None and args.body_cap <= 0:
        raise ConfigurationError(f"--body-cap: {args.body_cap} must be a positive number of bytes")
    sinks = list(config.sinks)
    sinks += (_sink_flag(text) for text in getattr(args, "sink", None) or ())
    if args.output is not None:
        sinks.append({"kind": "jsonl", "path": str(args.output)})
    if args.stdout in ("line", "json", "live", "none"):  # the flag replaces any stdout sink of the file
        sinks = [s for s in sinks if s.get("kind") != "stdout"]
    if args.stdout in ("line", "json"):
        sinks.append({"kind": "stdout", "format": args.stdout})
    changes["sinks"] = tuple(sinks)
    return attrs.evolve(config, **changes)


def _sink_flag(text: str) -> dict[str, Any]:
    """``--sink KIND[:KEY=VALUE,...]`` as the ``[[sinks]]`` table it stands for; values are read as TOML values
    where they parse as one (numbers, true/false, quoted strings), else taken as plain strings."""
    import tomllib

    kind, _, rest = text.partition(":")
    if not kind:
        raise ConfigurationError(f"--sink: {text!r} is not KIND[:KEY=VALUE,...]")
    table: dict[str, Any] = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--sink {kind}: {item!r} is not KEY=VALUE")
        try:
            table[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = value
    return table


def _endpoint_flag(text: str) -> EndpointSpec:
    provider, sep, target = text.partition("=")
    if not sep or not provider or not target:
        raise ConfigurationError(f"--add-endpoint: {text!r} is not PROVIDER=HOST[:PORT]")
    scheme, has_scheme, rest = target.partition("://")  # http://HOST:PORT: a plain-HTTP server (a local MCP server)
    tls = not has_scheme or scheme.lower() != "http"
    if has_scheme:
        if scheme.lower() not in ("http", "https"):
            raise ConfigurationError(f"--add-endpoint: {text!r}: only http:// or https:// may precede HOST")
        target = rest.rstrip("/")
    host, _, port = target.rpartition(":") if target.count(":") == 1 else (target, "", "")
    try:
        return EndpointSpec(provider, host or target, int(port) if port else 443 if tls else 80, tls)
    except ValueError:
        raise ConfigurationError(f"--add-endpoint: {text!r} has an invalid port") from None


def _cmd_run(args: argparse.Namespace) -> int:
    from oisp.cli.run import run

    config = _config_with_flags(args)
    view = args.stdout or ("live" if sys.stdout.isatty() else "line")
    if view == "line" and not any(s.get("kind") == "stdout" for s in config.sinks):
        config = attrs.evolve(config, sinks=(*config.sinks, {"kind": "stdout", "format": "line"}))
    if view == "live":
        from oisp.cli.live import LiveView

        with LiveView() as live:
            summary = anyio.run(functools.partial(run, config, on_event=live))
    else:
        summary = anyio.run(functools.partial(run, config))
    _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    pipeline, proxy = summary["pipeline"], summary["proxy"]
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(proxy["decisions"].items())) or "none"
    decoder = summary.get("decoder_process")
    shards = (decoder or {}).get("shards") or []
    # the first decoder process's pipeline has the final count of its own drops; the others' are theirs (and their
    # events that could not reach the first)
    dropped = pipeline.get("dropped_total", 0) + sum(shard["dropped_events"] for shard in shards[1:])
    line = (f"oisp: {proxy['connections']} connections ({decisions}); {pipeline.get('processed', 0)} events; "
            f"{dropped} dropped")
    if len(shards) > 1:
        line += "; per decoder process (events dropped / connections not decoded to the end): " + ", ".join(
            f"{index}: {pipeline.get('dropped_total', 0) if index == 0 else shard['dropped_events']}"
            f"/{shard['overflowed_connections'] + shard['lost_connections']}" for index, shard in enumerate(shards))
    if decoder is not None:
        if decoder["overflowed_connections"] or decoder["lost_connections"]:
            line += (f"; decoding stopped early on {decoder['overflowed_connections']} connection(s) (the decoder "
                     f"process fell behind) and missed {decoder['lost_connections']}")
        if not pipeline:
            line += f"; the decoder process ended without a summary (exit code {decoder['exit_code']})"
        if decoder.get("gave_up"):
            line += f"; DECODING WAS OFF from some point on: {decoder['gave_up']}"
    if proxy.get("pinned"):
        line += f"; pinned (passed through uninspected): {', '.join(proxy['pinned'])}"
    print(line, file=sys.stderr)
    for name, stats in (pipeline.get("sinks") or {}).items():
        reported = stats.get("reported") if isinstance(stats, dict) else None
        if reported:  # what sinks that deliver in the background (kafka, webhook) really delivered
            print(f"oisp: sink {name}: " + ", ".join(f"{key} {value}" for key, value in reported.items()),
                  file=sys.stderr)


def _cmd_replay(args: argparse.Namespace) -> int:
    from oisp.cli.replay import replay

    config = load_config(args.config) if args.config else Config()
    sinks = list(config.sinks)
    if args.output is not None:
        sinks.append({"kind": "jsonl", "path": str(args.output)})
    if args.stdout != "none" and (args.stdout or not sinks):
        sinks.append({"kind": "stdout", "format": args.stdout or "line"})
    result = replay(args.file, attrs.evolve(config, sinks=tuple(sinks)))
    print(f"oisp: replayed {result.events} events from {args.file}; {len(result.errors)} invalid line(s)",
          file=sys.stderr)
    for line, error in result.errors[:20]:
        print(f"  line {line}: {error}", file=sys.stderr)
    return 0 if not result.errors else 1


def _cmd_plugins(args: argparse.Namespace) -> int:
    from oisp.plugins import create_plugin_manager

    manager = create_plugin_manager()
    rows = [attrs.asdict(p) for p in manager.plugins()]
    if args.json:
        print(json.dumps({"plugins": rows, "failures": manager.failures}, indent=2))
        return 0
    for row in rows:
        origin = "built-in" if row["builtin"] else f"{row['package']} {row['version']}"
        print(f"{row['group']:<15} {row['name']:<40} {origin}")
    for name, error in manager.failures.items():
        print(f"{'FAILED':<15} {name:<40} {error}")
    sinks = sorted(manager.sink_types())
    print(f"sink kinds: {', '.join(sinks)}")
    return 0


def _cmd_ca(args: argparse.Namespace) -> int:
    from oisp.cli.ca import run_ca

    return run_ca(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from oisp.cli.demo import run_demo

    return run_demo(output=args.output, json_lines=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oisp`` command."""
    parser, subcommands = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # shown with the subcommand's usage, whose flags the user was after
        subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    _configure_logging(args.verbose)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "ca":
            return _cmd_ca(args)
        if args.command == "replay":
            return _cmd_replay(args)
        if args.command == "plugins":
            return _cmd_plugins(args)
        return _cmd_demo(args)
    except OispError as exc:
        print(f"oisp: error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # errors raised inside the runner's task groups
        first = _first_oisp_error(group)
        if first is None:
            raise
        print(f"oisp: error: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _first_oisp_error(group: BaseExceptionGroup[BaseException]) -> OispError | None:
    for exc in group.exceptions:
        if isinstance(exc, OispError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_oisp_error(exc)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
