"""``oisp ca``: show, export, install and uninstall the oisp CA, and print the environment that makes clients trust it.

The CA is the one ``oisp run`` would use: ``--config`` (default: ``oisp.toml`` in the per-user configuration
directory, when it exists) decides ``confdir`` and ``[ca] name_constrained``, and ``--confdir`` and
``--name-constrained-ca`` override it. ``uninstall`` removes every oisp CA of the configuration directory that
is in the store, so it needs neither. Errors are raised as :class:`~oisp.errors.OispError` and printed by
``oisp.cli.main`` (exit code 2); a trust store that needs root or an administrator says so with the exact command
to run.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import NameOID

from oisp.errors import CertificateError, ConfigurationError, OispError

if TYPE_CHECKING:
    from oisp.tls import CertificateAuthority

__all__ = ["configure_parser", "run_ca"]

# The file names oisp.tls.ca documents: the unconstrained CA, and the name-constrained ones
# (oisp-ca-nc-<id>.pem); read directly where a CA must not be created or validated (uninstalling, or showing
# an expired or damaged CA).
_CERT_FILE = "oisp-ca.pem"
_KEY_FILE = "oisp-ca-key.pem"
_CONSTRAINED_CERT_GLOB = "oisp-ca-nc-*.pem"
#: The system roots plus the oisp CA, written by ``oisp ca env``.
_BUNDLE_FILE = "trust-bundle.pem"
_SHELLS = ("sh", "fish", "powershell", "cmd")
_APPLY = {
    "sh": 'eval "$(oisp ca env)"',
    "fish": "oisp ca env --shell fish | source",
    "powershell": "oisp ca env --shell powershell | Invoke-Expression",
    "cmd": "for /f \"delims=\" %i in ('oisp ca env --shell cmd') do %i",
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``oisp ca`` actions and their options to ``parser``."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    confdir = argparse.ArgumentParser(add_help=False)
    confdir.add_argument("--confdir", type=Path,
                         help="where the CA lives (default: from --config, else the per-user config directory)")
    confdir.add_argument("--config", type=Path,
                         help="configuration file deciding confdir and [ca] name_constrained, as for oisp run "
                              "(default: oisp.toml in the per-user config directory, if it exists)")
    common = argparse.ArgumentParser(add_help=False, parents=[confdir])
    common.add_argument("--name-constrained-ca", action="store_true", default=None,
                        help="the name-constrained CA oisp run --name-constrained-ca uses")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--machine", action="store_true",
                       help="Windows: the machine's Root store instead of the current user's (needs an "
                            "administrator); macOS: the System keychain (needs root). Linux stores are "
                            "always system-wide (need root)")
    store.add_argument("--trust-dir", type=Path, metavar="DIR",
                       help="use a Debian-layout trust store in DIR instead of the system's; its bundle is "
                            "DIR/certs/ca-certificates.crt (needs update-ca-certificates)")

    actions.add_parser("path", parents=[common], help="print where the CA certificate is (creating the CA)")
    show = actions.add_parser("show", parents=[common],
                              help="subject, fingerprint, validity, constraints, key file, where it is trusted")
    show.add_argument("--trust-dir", type=Path, metavar="DIR", help="also check the trust directory DIR")
    export = actions.add_parser("export", parents=[common], help="write the CA certificate (never the key)")
    export.add_argument("--format", choices=["pem", "der", "p12"], default="pem",
                        help="pem (default), der, or p12: PKCS#12 with the certificate only, no password, "
                             "readable by Windows, macOS and Java (as a trust store)")
    export.add_argument("--out", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    actions.add_parser("install", parents=[common, store], help="add the CA to the operating system's trust store")
    uninstall = actions.add_parser("uninstall", parents=[confdir, store],
                                   help="remove the confdir's oisp CAs, and only what install added, from the "
                                        "trust store")
    uninstall.add_argument("--fingerprint", metavar="SHA256",
                           help="remove the oisp CA with this SHA-256 fingerprint (when its confdir is gone)")
    env = actions.add_parser("env", parents=[common],
                             help="print the environment variables that make Python, curl, Node, AWS and gRPC "
                                  "clients trust the CA",
                             description="Writes <confdir>/trust-bundle.pem (the system roots plus the CA) and "
                                         "prints variables pointing at it. Use: eval \"$(oisp ca env)\"; "
                                         "fish: oisp ca env --shell fish | source; PowerShell: oisp ca env "
                                         "--shell powershell | Invoke-Expression")
    env.add_argument("--shell", choices=_SHELLS, default="sh", help="syntax of the output (default: sh)")


def run_ca(args: argparse.Namespace) -> int:
    """Run the ``oisp ca`` action in ``args``; returns the exit code."""
    from oisp.config import load_config
    from oisp.tls.ca import default_confdir

    args.loaded_config = load_config(args.config)
    # Printed paths, the environment and the suggested sudo command must work from anywhere and for anyone.
    args.confdir = (args.confdir or args.loaded_config.confdir or default_confdir()).absolute()
    action: Callable[[argparse.Namespace], int] = {
        "path": _path,
        "show": _show,
        "export": _export,
        "install": _install,
        "uninstall": _uninstall,
        "env": _env,
    }[args.action]
    return action(args)


# -- actions ---------------------------------------------------------------------------------------------------


def _path(args: argparse.Namespace) -> int:
    print(_load_ca(args).cert_path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from oisp.tls.trust import pkcs12_truststore

    ca = _load_ca(args)
    if args.format == "p12":
        data = pkcs12_truststore(ca.certificate, _common_name(ca.certificate) or "oisp CA")
    else:
        data = ca.export(args.format)
    if args.out is not None:
        try:
            args.out.write_bytes(data)
        except OSError as error:
            raise ConfigurationError(f"--out: cannot write {args.out}: {error.strerror or error}") from error
        print(args.out)
    elif args.format == "pem":
        sys.stdout.write(data.decode("ascii"))
    elif sys.stdout.isatty():
        raise ConfigurationError(f"{args.format} is binary; pass --out FILE or redirect the output to a file")
    else:
        sys.stdout.buffer.write(data)
    return 0


def _show(args: argparse.Namespace) -> int:
    problem: str | None = None
    try:
        ca = _load_ca(args)
        certificate, cert_path, key_path = ca.certificate, ca.cert_path, ca.key_path
    except CertificateError as error:
        if _name_constrained(args):
            raise
        # Still show what there is (an expired or damaged CA), as long as the certificate itself can be read.
        cert_path, key_path = args.confdir / _CERT_FILE, args.confdir / _KEY_FILE
        certificate = _read_certificate(cert_path, error)
        problem = str(error)

    fingerprint = _fingerprint(certificate)
    now = datetime.now(UTC)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if now >= end:
        state = "EXPIRED"
    elif now < start:
        state = "not valid yet"
    else:
        state = f"{(end - now).days} days left"
    rows = [
        ("certificate", str(cert_path)),
        ("subject", certificate.subject.rfc4514_string()),
        ("SHA-256", fingerprint),
        ("valid", f"{start:%Y-%m-%d %H:%M} UTC to {end:%Y-%m-%d %H:%M} UTC ({state})"),
        ("constraints", _constraints(certificate)),
        ("key", _key_description(key_path)),
    ]
    rows.extend(("installed in" if i == 0 else "", line) for i, line in enumerate(_trust_locations(
        args, fingerprint, cert_path.parent / _BUNDLE_FILE)))
    if problem is not None:
        rows.append(("problem", problem))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 2 if problem is not None else 0


def _install(args: argparse.Namespace) -> int:
    from oisp.tls.trust import system_trust_store

    ca = _load_ca(args)
    store = system_trust_store(machine=args.machine, trust_dir=args.trust_dir)
    changed = _privileged(args, functools.partial(store.install, ca.cert_pem))
    if not changed:
        print(f"the oisp CA ({ca.fingerprint_sha256}) is already in the {store.describe()}; nothing to do")
        return 0
    print(f"installed the oisp CA ({ca.fingerprint_sha256}) into the {store.describe()}")
    print("programs with their own root certificates (Node, requests/certifi, Java) also need: oisp ca env",
          file=sys.stderr)
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from oisp.tls.trust import system_trust_store

    if args.fingerprint is not None:
        fingerprints = [args.fingerprint]
    else:
        paths = sorted(args.confdir.glob(_CONSTRAINED_CERT_GLOB))
        paths = [args.confdir / _CERT_FILE, *(p for p in paths if not p.name.endswith("-key.pem"))]
        fingerprints = [_fingerprint(_read_certificate(p, None)) for p in paths if p.exists()]
        if not fingerprints:
            raise ConfigurationError(
                f"there is no oisp CA in {args.confdir}, so oisp cannot tell which certificate to remove; pass "
                "--confdir if the CA lives elsewhere, or --fingerprint with the SHA-256 fingerprint the trust "
                "store shows for the 'oisp CA' certificate"
            )
    store = system_trust_store(machine=args.machine, trust_dir=args.trust_dir)
    for fingerprint in fingerprints:
        if _privileged(args, functools.partial(store.uninstall, fingerprint)):
            print(f"removed the oisp CA ({fingerprint}) from the {store.describe()}")
        else:
            print(f"the oisp CA ({fingerprint}) is not in the {store.describe()}; nothing to do")
    return 0


def _env(args: argparse.Namespace) -> int:
    from oisp.tls.trust import client_environment, write_client_bundle

    ca = _load_ca(args)
    bundle = ca.cert_path.parent / _BUNDLE_FILE
    write_client_bundle(ca.cert_pem, bundle)
    for name, value in client_environment(bundle, ca.cert_path).items():
        print(_assignment(args.shell, name, value))
    if sys.stdout.isatty():
        print(f"apply it with: {_APPLY[args.shell]}", file=sys.stderr)
    return 0


# -- helpers ---------------------------------------------------------------------------------------------------


def _name_constrained(args: argparse.Namespace) -> bool:
    flag: bool | None = getattr(args, "name_constrained_ca", None)
    return bool(args.loaded_config.ca_name_constrained if flag is None else flag)


def _load_ca(args: argparse.Namespace) -> CertificateAuthority:
    """The CA ``oisp run`` would use with this configuration, created on first use."""
    from oisp.tls import CertificateAuthority

    if not _name_constrained(args):
        return CertificateAuthority.load_or_create(args.confdir)
    import attrs

    from oisp.cli.run import endpoint_table, load_ca
    from oisp.plugins import create_plugin_manager

    config = attrs.evolve(args.loaded_config, confdir=args.confdir, ca_name_constrained=True)
    return load_ca(config, endpoint_table(create_plugin_manager(), config))


def _privileged(args: argparse.Namespace, change: Callable[[], bool]) -> bool:
    """Run ``change``; a permission error becomes one that names the exact command to run with privileges."""
    from oisp.tls.trust import TrustStorePermissionError

    try:
        return change()
    except TrustStorePermissionError as error:
        # The CA is named explicitly: under sudo the per-user defaults would point at root's directory.
        command = [*_program(), "ca", args.action, "--confdir", str(args.confdir)]
        if args.config is not None:
            command += ["--config", str(args.config.absolute())]
        if getattr(args, "name_constrained_ca", None):
            command.append("--name-constrained-ca")
        if args.machine:
            command.append("--machine")
        if args.trust_dir is not None:
            command += ["--trust-dir", str(args.trust_dir.absolute())]
        if getattr(args, "fingerprint", None):
            command += ["--fingerprint", args.fingerprint]
        raise CertificateError(f"{error}. Run: {error.how_to_run(command)}") from error


def _program() -> list[str]:
    """How this oisp was started, so the suggested command runs the same installation (root's PATH differs)."""
    script = Path(sys.argv[0])
    if script.stem == "oisp":
        return [str(script.absolute())]
    return [sys.executable, "-m", "oisp.cli.main"]


def _trust_locations(args: argparse.Namespace, fingerprint: str, bundle: Path) -> list[str]:
    from oisp.tls._trust_common import file_holds_fingerprint, normalize_fingerprint
    from oisp.tls.trust import TrustStore, system_trust_store

    lines: list[str] = []
    stores: dict[str, TrustStore] = {}
    try:
        for machine in (False, True):
            store = system_trust_store(machine=machine)
            stores.setdefault(store.describe(), store)
    except CertificateError as error:
        lines.append(f"operating system: not supported ({error})")
    if args.trust_dir is not None:
        store = system_trust_store(trust_dir=args.trust_dir)
        stores.setdefault(store.describe(), store)
    for description, store in stores.items():
        try:
            found = "yes" if store.contains(fingerprint) else "no"
        except OispError as error:
            found = f"unknown ({error})"
        lines.append(f"{description}: {found}")
    held = file_holds_fingerprint(bundle, normalize_fingerprint(fingerprint))
    lines.append(f"client bundle {bundle} (oisp ca env): {'yes' if held else 'no'}")
    return lines


def _read_certificate(path: Path, cause: OispError | None) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as error:
        if cause is not None:
            raise cause from error
        raise CertificateError(f"cannot read the CA certificate {path}: {error}") from error


def _fingerprint(certificate: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import hashes

    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def _common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _constraints(certificate: x509.Certificate) -> str:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return "none (this CA can vouch for any host)"
    permitted = ", ".join(str(name.value) for name in constraints.permitted_subtrees or ())
    excluded = ", ".join(str(name.value) for name in constraints.excluded_subtrees or ())
    parts = [f"permitted: {permitted}" if permitted else "", f"excluded: {excluded}" if excluded else ""]
    return "; ".join(part for part in parts if part)


def _key_description(path: Path) -> str:
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as error:
        return f"{path} ({error.strerror})"
    return f"{path} (mode {mode:04o})"


def _assignment(shell: str, name: str, value: str) -> str:
    if shell == "fish":
        return f"set -gx {name} '" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if shell == "powershell":
        return f"$env:{name} = '" + value.replace("'", "''") + "'"
    if shell == "cmd":
        return f'set "{name}={value}"'
    return f"export {name}={shlex.quote(value)}"
