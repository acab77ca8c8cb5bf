"""``oisp`` command line: ``run``, ``demo``, ``ca``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from oisp._version import __version__
from oisp.errors import OispError
from oisp.proxy import ProxyMode

__all__ = ["main"]

logger = logging.getLogger("oisp.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oisp", description="See every AI API call this machine makes.")
    parser.add_argument("--version", action="version", version=f"oisp {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the proxy and write events")
    run.add_argument("--mode", choices=[m.value for m in ProxyMode], default="explicit")
    run.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT to listen on (default 127.0.0.1:8080)")
    run.add_argument("--confdir", type=Path, help="where the CA lives (default: the per-user config directory)")
    run.add_argument("--output", type=Path, help="append events to this JSONL file (created 0600)")
    run.add_argument("--stdout", choices=["line", "json", "none"], default="line",
                     help="print events to stdout as readable lines, JSON, or not at all")
    run.add_argument("--upstream-ca", type=Path, help="extra CA bundle trusted for upstream servers")
    run.add_argument("--insecure-upstream", action="store_true",
                     help="do not verify upstream certificates (dangerous)")
    run.add_argument("--resolve", action="append", default=[], metavar="HOST:PORT:ADDR[:PORT]",
                     help="connect to ADDR when the upstream is HOST:PORT (like curl --resolve/--connect-to)")
    run.add_argument("--reverse-target", help="reverse mode: the upstream base URL, e.g. https://api.openai.com")
    run.add_argument("--redaction", choices=["default", "metadata-only"], default="default")

    demo = commands.add_parser("demo", help="prove the pipeline offline: real proxy, local provider, real SDKs")
    demo.add_argument("--output", type=Path, help="also write the demo's events to this JSONL file")
    demo.add_argument("--json", action="store_true", help="print events as JSON lines")

    ca = commands.add_parser("ca", help="the oisp certificate authority")
    ca.add_argument("action", choices=["path", "export"])
    ca.add_argument("--confdir", type=Path)
    ca.add_argument("--format", choices=["pem", "der"], default="pem")
    ca.add_argument("--out", type=Path, help="write the export here instead of stdout")
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbosity == 0:
        logging.getLogger("oisp.cli").setLevel(logging.INFO)
        logging.getLogger("oisp.cli.run").setLevel(logging.INFO)


def _cmd_run(args: argparse.Namespace) -> int:
    from oisp.cli.run import RunOptions, parse_listen, run

    options = RunOptions(
        mode=ProxyMode(args.mode), listen=parse_listen(args.listen), confdir=args.confdir, output=args.output,
        stdout_format=None if args.stdout == "none" else args.stdout, upstream_ca=args.upstream_ca,
        upstream_insecure=args.insecure_upstream, resolve=tuple(args.resolve), reverse_target=args.reverse_target,
        redaction_profile=args.redaction,
    )
    summary = anyio.run(lambda: run(options))
    print(json.dumps({"summary": summary}), file=sys.stderr)
    return 0


def _cmd_ca(args: argparse.Namespace) -> int:
    from oisp.tls import CertificateAuthority

    ca = CertificateAuthority.load_or_create(args.confdir)
    if args.action == "path":
        print(ca.cert_path)
        return 0
    data = ca.export(args.format)
    if args.out is not None:
        args.out.write_bytes(data)
        print(args.out)
    elif args.format == "pem":
        sys.stdout.write(data.decode("ascii"))
    else:
        sys.stdout.buffer.write(data)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from oisp.cli.demo import run_demo

    return run_demo(output=args.output, json_lines=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oisp`` command."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "ca":
            return _cmd_ca(args)
        return _cmd_demo(args)
    except OispError as exc:
        print(f"oisp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
