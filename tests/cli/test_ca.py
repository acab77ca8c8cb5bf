"""``oisp ca`` as a user runs it (subprocesses): path, show, export, install/uninstall into a throwaway trust
directory, and env. The system's own trust store is only ever read, never changed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from tests.cli.conftest import OISP

from oisp.tls import CertificateAuthority
from oisp.tls._trust_common import pem_certificates

TIMEOUT = 20.0
#: Variables that would change which roots the child processes trust, or route them through a proxy.
_TRUST_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                    "AWS_CA_BUNDLE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "NODE_OPTIONS")
needs_update_ca_certificates = pytest.mark.skipif(
    shutil.which("update-ca-certificates", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
    reason="needs Debian's update-ca-certificates (apt-get install ca-certificates)",
)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TRUST_VARIABLES and not k.lower().endswith("_proxy")}
    env["XDG_CONFIG_HOME"] = "/nonexistent/oisp-test-config"  # no user oisp.toml decides which CA is meant
    return env


def oisp_ca(*args: str | Path, check: int | None = 0,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    """Run ``oisp ca ...``; asserts the exit code (unless ``check`` is None) and that no traceback escaped."""
    result = subprocess.run([*prefix, *OISP, "ca", *map(str, args)], capture_output=True, env=clean_env(),
                            timeout=120, check=False)
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    if check is not None:
        assert result.returncode == check, stderr + result.stdout.decode(errors="replace")
    return result


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    return tmp_path / "conf"


@pytest.fixture
def ca(confdir: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(confdir)


# -- a loopback HTTPS server presenting an oisp leaf -------------------------------------------------------------


@contextlib.contextmanager
def https_server(context: ssl.SSLContext) -> Iterator[int]:
    """Serve ``200 ok`` over TLS on 127.0.0.1 to any number of connections; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def handle(connection: socket.socket) -> None:
        with contextlib.suppress(OSError), connection:
            connection.settimeout(TIMEOUT)
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(TIMEOUT)


def handshake(cafile: Path, port: int, host: str = "api.openai.com") -> None:
    """A verifying TLS client trusting only ``cafile``; raises ssl.SSLCertVerificationError when it rejects."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nhost: " + host.encode() + b"\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200")


def snapshot(directory: Path) -> dict[str, str]:
    """What a trust directory holds: symlink targets and file digests by relative path."""
    state = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            state[name] = "-> " + os.readlink(path)
        elif path.is_file():
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


# -- path, export, show ------------------------------------------------------------------------------------------


def test_path_creates_the_ca_and_prints_its_certificate_file(confdir: Path) -> None:
    result = oisp_ca("path", "--confdir", confdir)
    assert Path(out(result).strip()) == confdir / "oisp-ca.pem"
    x509.load_pem_x509_certificate((confdir / "oisp-ca.pem").read_bytes())


def test_export_pem_der_and_p12_all_hold_the_ca_certificate_and_never_the_key(tmp_path: Path, confdir: Path,
                                                                             ca: CertificateAuthority) -> None:
    pem = oisp_ca("export", "--confdir", confdir).stdout
    assert x509.load_pem_x509_certificate(pem) == ca.certificate
    assert b"PRIVATE KEY" not in pem
    der = oisp_ca("export", "--confdir", confdir, "--format", "der").stdout
    assert x509.load_der_x509_certificate(der) == ca.certificate
    target = tmp_path / "oisp.p12"
    result = oisp_ca("export", "--confdir", confdir, "--format", "p12", "--out", target)
    assert out(result).strip() == str(target)
    loaded = pkcs12.load_pkcs12(target.read_bytes(), None)
    assert loaded.key is None
    assert [c.certificate for c in loaded.additional_certs] == [ca.certificate]


def test_show_lists_subject_fingerprint_validity_constraints_key_mode_and_where_it_is_trusted(
        confdir: Path, ca: CertificateAuthority) -> None:
    text = out(oisp_ca("show", "--confdir", confdir))
    assert ca.fingerprint_sha256 in text
    assert ca.certificate.subject.rfc4514_string() in text
    assert f"{ca.certificate.not_valid_after_utc:%Y-%m-%d}" in text and "days left" in text
    assert re.search(r"^constraints +none", text, re.MULTILINE)
    assert f"{ca.key_path} (mode 0600)" in text
    assert "installed in" in text and ": no" in text  # this CA is in no store
    assert str(confdir / "trust-bundle.pem") in text


def test_show_an_expired_ca_still_shows_it_and_exits_2(confdir: Path) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=4000)
    expired = CertificateAuthority.load_or_create(confdir, clock=lambda: long_ago)
    result = oisp_ca("show", "--confdir", confdir, check=2)
    assert "EXPIRED" in out(result) and expired.fingerprint_sha256 in out(result)
    assert "problem" in out(result) and "expired" in out(result)


def test_the_name_constrained_ca_is_chosen_like_oisp_run_chooses_it(tmp_path: Path, confdir: Path,
                                                                   ca: CertificateAuthority) -> None:
    config = tmp_path / "oisp.toml"
    config.write_text(f'[proxy]\nconfdir = "{confdir}"\n\n[ca]\nname_constrained = true\n'
                      'extra_domains = ["llm.corp.example"]\n')
    shown = out(oisp_ca("show", "--config", config))
    constraints = next(line for line in shown.splitlines() if line.startswith("constraints"))
    for permitted in ("api.openai.com", "api.anthropic.com", "llm.corp.example", "127.0.0.0/8"):
        assert permitted in constraints
    assert ca.fingerprint_sha256 not in shown  # not the unconstrained CA of the same confdir
    path = Path(out(oisp_ca("path", "--config", config)).strip())
    assert path.parent == confdir and path.name.startswith("oisp-ca-nc-")
    flagged = Path(out(oisp_ca("path", "--confdir", confdir, "--name-constrained-ca")).strip())
    assert flagged.name.startswith("oisp-ca-nc-")  # the built-in endpoints only: another constrained CA
    assert out(oisp_ca("path", "--confdir", confdir)).strip() == str(ca.cert_path)


# -- install / uninstall with a trust directory -----------------------------------------------------------------


@needs_update_ca_certificates
def test_install_and_uninstall_in_a_trust_dir_decide_what_an_ssl_client_accepts(
        tmp_path: Path, confdir: Path, ca: CertificateAuthority) -> None:
    trust = tmp_path / "trust"
    bundle = trust / "certs" / "ca-certificates.crt"
    # The store as it is before oisp touches it: the system's root list refreshed into the directory.
    (trust / "local").mkdir(parents=True)
    (trust / "certs").mkdir()
    shutil.copy("/etc/ca-certificates.conf", trust / "ca-certificates.conf")
    subprocess.run([shutil.which("update-ca-certificates", path=os.environ["PATH"] + ":/usr/sbin:/sbin") or "",
                    "--certsconf", trust / "ca-certificates.conf", "--localcertsdir", trust / "local",
                    "--etccertsdir", trust / "certs", "--hooksdir", trust / "hooks"],
                   check=True, capture_output=True, timeout=120)
    before = snapshot(trust)

    with https_server(ca.server_context("api.openai.com", None)) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(bundle, port)

        installed = oisp_ca("install", "--confdir", confdir, "--trust-dir", trust)
        assert "installed the oisp CA" in out(installed) and ca.fingerprint_sha256 in out(installed)
        assert ca.cert_der in _ders(bundle)
        handshake(bundle, port)
        assert "already in the" in out(oisp_ca("install", "--confdir", confdir, "--trust-dir", trust))
        assert f"trust directory {trust}" in out(oisp_ca("show", "--confdir", confdir, "--trust-dir", trust))

        removed = oisp_ca("uninstall", "--confdir", confdir, "--trust-dir", trust)
        assert "removed the oisp CA" in out(removed)
        assert ca.cert_der not in _ders(bundle)
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(bundle, port)

    assert snapshot(trust) == before  # exactly what install added is gone, nothing else changed
    again = oisp_ca("uninstall", "--confdir", confdir, "--trust-dir", trust)
    assert "is not in the" in out(again) and "nothing to do" in out(again)


def _ders(bundle: Path) -> list[bytes]:
    return [der for _, der in pem_certificates(bundle.read_bytes())]


@needs_update_ca_certificates
def test_uninstall_removes_whichever_oisp_ca_of_the_confdir_was_installed(tmp_path: Path, confdir: Path,
                                                                          ca: CertificateAuthority) -> None:
    trust = tmp_path / "trust"
    installed = oisp_ca("install", "--confdir", confdir, "--name-constrained-ca", "--trust-dir", trust)
    constrained = re.search(r"\(([0-9A-F:]{95})\)", out(installed))
    assert constrained is not None and constrained.group(1) != ca.fingerprint_sha256
    removed = out(oisp_ca("uninstall", "--confdir", confdir, "--trust-dir", trust))
    assert f"removed the oisp CA ({constrained.group(1)})" in removed
    assert f"the oisp CA ({ca.fingerprint_sha256}) is not in the" in removed
    fingerprints = {hashlib.sha256(der).hexdigest() for der in _ders(trust / "certs" / "ca-certificates.crt")}
    assert constrained.group(1).replace(":", "").lower() not in fingerprints


@needs_update_ca_certificates
def test_uninstall_by_fingerprint_after_the_confdir_is_gone(tmp_path: Path, confdir: Path,
                                                            ca: CertificateAuthority) -> None:
    trust = tmp_path / "trust"
    oisp_ca("install", "--confdir", confdir, "--trust-dir", trust)
    shutil.rmtree(confdir)
    refused = oisp_ca("uninstall", "--confdir", confdir, "--trust-dir", trust, check=2)
    assert "--fingerprint" in err(refused) and "no oisp CA in" in err(refused)
    assert not confdir.exists(), "uninstall must not create a CA"
    oisp_ca("uninstall", "--confdir", confdir, "--trust-dir", trust, "--fingerprint", ca.fingerprint_sha256)
    assert ca.cert_der not in _ders(trust / "certs" / "ca-certificates.crt")


def _without_write_permission() -> tuple[str, ...]:
    """A prefix that runs the child without the power to ignore file modes (root would write anyway)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is missing: a read-only directory cannot stop root")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all", "--")


@needs_update_ca_certificates
def test_a_read_only_trust_dir_gives_a_clear_error_with_the_command_to_run(
        tmp_path: Path, confdir: Path, ca: CertificateAuthority) -> None:
    prefix = _without_write_permission()
    trust = tmp_path / "trust"
    trust.mkdir()
    trust.chmod(0o555)
    try:
        failed = oisp_ca("install", "--confdir", confdir, "--trust-dir", trust, check=2, prefix=prefix)
        message = err(failed)
        assert "Permission denied" in message and "needs root" in message
        assert "Run: sudo " in message
        assert f"ca install --confdir {confdir} --trust-dir {trust}" in message
        assert os.listdir(trust) == []

        trust.chmod(0o755)
        oisp_ca("install", "--confdir", confdir, "--trust-dir", trust)
        before = snapshot(trust)
        for directory in (trust, trust / "local", trust / "certs"):
            directory.chmod(0o555)
        failed = oisp_ca("uninstall", "--confdir", confdir, "--trust-dir", trust, check=2, prefix=prefix)
        assert "needs root" in err(failed)
        assert f"ca uninstall --confdir {confdir} --trust-dir {trust}" in err(failed)
        assert snapshot(trust) == before
    finally:
        for directory in (trust, trust / "local", trust / "certs"):
            if directory.exists():
                directory.chmod(0o755)


# -- env ---------------------------------------------------------------------------------------------------------

_PYTHON_CLIENTS = """
import ssl, sys, urllib.request
import httpx, requests
url = sys.argv[1]
results = {}
for name, get in (
    ("ssl", lambda: urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=10).read()),
    ("requests", lambda: requests.get(url, timeout=10).content),
    ("httpx", lambda: httpx.get(url, timeout=10).content),
):
    try:
        results[name] = "ok" if get() == b"ok" else "wrong body"
    except Exception as error:
        results[name] = "CERTIFICATE_VERIFY_FAILED" if "CERTIFICATE_VERIFY_FAILED" in repr(error) else repr(error)
print(results)
"""

_NODE_CLIENT = """
const https = require('https');
https.get(process.argv[2], (res) => { res.resume(); res.on('end', () => console.log('ok')); })
  .on('error', (e) => console.log(e.code));
"""


def test_env_makes_python_curl_and_node_clients_trust_the_ca_and_nothing_else_does(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    confdir = tmp_path / "it's a conf dir"  # the shell output must quote
    server_ca = CertificateAuthority.load_or_create(confdir)
    script = tmp_path / "clients.py"
    script.write_text(_PYTHON_CLIENTS)
    node_script = tmp_path / "client.js"
    node_script.write_text(_NODE_CLIENT)
    env_command = shlex.join([*OISP, "ca", "env", "--confdir", str(confdir)])

    def in_shell(command: str, *, with_env: bool) -> str:
        line = (f'eval "$({env_command})" && ' if with_env else "") + command
        result = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=clean_env(),
                                timeout=120, check=False)
        assert "Traceback" not in result.stderr, result.stderr
        return result.stdout.strip() + result.stderr.strip()

    with https_server(server_ca.server_context("127.0.0.1", None)) as port:
        url = f"https://127.0.0.1:{port}/"
        python = shlex.join([sys.executable, str(script), url])
        assert in_shell(python, with_env=True) == "{'ssl': 'ok', 'requests': 'ok', 'httpx': 'ok'}"
        assert in_shell(python, with_env=False) == (
            "{'ssl': 'CERTIFICATE_VERIFY_FAILED', 'requests': 'CERTIFICATE_VERIFY_FAILED', "
            "'httpx': 'CERTIFICATE_VERIFY_FAILED'}"
        )
        if shutil.which("curl"):
            curl = f"curl --silent --show-error --noproxy '*' {url}"
            assert in_shell(curl, with_env=True) == "ok"
            assert "certificate" in in_shell(curl, with_env=False)
        if shutil.which("node"):
            node = shlex.join(["node", str(node_script), url])
            assert in_shell(node, with_env=True) == "ok"
            assert in_shell(node, with_env=False) == "SELF_SIGNED_CERT_IN_CHAIN"

    bundle = confdir / "trust-bundle.pem"
    assert len(_ders(bundle)) > 10, "the bundle must keep the system roots"
    assert ca.cert_der not in _ders(bundle)  # a different confdir's CA


def test_env_prints_each_shells_syntax(confdir: Path) -> None:
    CertificateAuthority.load_or_create(confdir)
    bundle, cert = confdir / "trust-bundle.pem", confdir / "oisp-ca.pem"
    sh = out(oisp_ca("env", "--confdir", confdir)).splitlines()
    assert sh[0] == f"export SSL_CERT_FILE={shlex.quote(str(bundle))}"
    assert f"export NODE_EXTRA_CA_CERTS={shlex.quote(str(cert))}" in sh
    assert [line.split("=")[0] for line in sh] == [
        "export SSL_CERT_FILE", "export REQUESTS_CA_BUNDLE", "export CURL_CA_BUNDLE", "export AWS_CA_BUNDLE",
        "export GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "export NODE_EXTRA_CA_CERTS"]
    assert out(oisp_ca("env", "--confdir", confdir, "--shell", "fish")).splitlines()[0] == (
        f"set -gx SSL_CERT_FILE '{bundle}'")
    assert out(oisp_ca("env", "--confdir", confdir, "--shell", "powershell")).splitlines()[0] == (
        f"$env:SSL_CERT_FILE = '{bundle}'")
    assert out(oisp_ca("env", "--confdir", confdir, "--shell", "cmd")).splitlines()[0] == (
        f'set "SSL_CERT_FILE={bundle}"')


# -- the real Debian paths, in a private mount namespace (root only) ------------------------------------------------

_NAMESPACE_SCRIPT = r"""
set -eu
# Private copies of the store, bind-mounted over the real paths in this mount namespace only.
# (Its hooks run too: Java's records pending changes and has dpkg process its trigger, so those are copied.)
for d in /usr/local/share/ca-certificates /etc/ssl/certs /var/lib/ca-certificates-java /var/lib/dpkg; do
  if [ -d "$d" ]; then mkdir -p "$COPY$d"; cp -a "$d/." "$COPY$d/"; mount --bind "$COPY$d" "$d"; fi
done
for d in /etc/ssl/certs /var/lib/dpkg; do  # the bind mounts are in place, or stop here
  touch "$d/.oisp-test-marker"; test -e "$COPY$d/.oisp-test-marker"; rm "$d/.oisp-test-marker"
done
java_roots() {
  if command -v keytool >/dev/null && [ -f /etc/ssl/certs/java/cacerts ]; then
    keytool -list -keystore /etc/ssl/certs/java/cacerts -storepass changeit 2>/dev/null | grep -i fingerprint | sort -u
  fi
}
# Names and contents (through links): update-ca-certificates itself may turn a copied file into a link to
# the same certificate, and its Java hook may import a certificate again under its own alias: neither changes
# what a client trusts, so links are followed and Java's keystore is compared by its set of certificates.
state() { (cd /etc/ssl/certs && find . ! -path ./java/cacerts | sort | while read -r f; do
             if [ -d "$f" ]; then echo "$f/"; else echo "$f $(sha256sum < "$f")"; fi; done
           ls -a /usr/local/share/ca-certificates; java_roots) | sha256sum; }
before=$(state)
$OISP ca install --confdir "$CONFDIR"
$CLIENT && echo "installed: accepted"
java_roots | grep -qi "$FINGERPRINT" && echo "java: trusted"
$OISP ca uninstall --confdir "$CONFDIR"
$CLIENT || echo "uninstalled: rejected"
java_roots | grep -qi "$FINGERPRINT" || echo "java: not trusted"
$OISP ca uninstall --confdir "$CONFDIR"
test "$before" = "$(state)" && echo "state restored"
"""

_SYSTEM_CLIENT = """
import socket, ssl, sys
context = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="api.openai.com"):
        pass
except ssl.SSLCertVerificationError:
    sys.exit(1)
"""


@pytest.mark.root
def test_install_and_uninstall_on_the_real_debian_paths_inside_a_private_mount_namespace(
        tmp_path: Path, confdir: Path, ca: CertificateAuthority) -> None:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or not Path("/etc/ca-certificates.conf").exists():
        pytest.skip("needs root, unshare and a Debian trust store")
    if subprocess.run([unshare, "--mount", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot create a mount namespace here")
    host_bundle = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
    client = tmp_path / "client.py"
    client.write_text(_SYSTEM_CLIENT)
    with https_server(ca.server_context("api.openai.com", None)) as port:
        env = {**clean_env(), "COPY": str(tmp_path / "copy"), "CONFDIR": str(confdir),
               "OISP": shlex.join(OISP), "CLIENT": shlex.join([sys.executable, str(client), str(port)]),
               "FINGERPRINT": ca.fingerprint_sha256}
        result = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", _NAMESPACE_SCRIPT],
                                capture_output=True, text=True, env=env, timeout=300, check=False)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "Traceback" not in report
    assert "into the Debian/Ubuntu system trust store" in report
    assert "installed: accepted" in report and "uninstalled: rejected" in report
    assert "nothing to do" in report and "state restored" in report
    if Path("/etc/ca-certificates/update.d/jks-keystore").exists() and shutil.which("keytool"):
        assert "java: trusted" in report and "java: not trusted" in report
    assert Path("/etc/ssl/certs/ca-certificates.crt").read_bytes() == host_bundle
    assert not Path("/etc/ssl/certs/.oisp-test-marker").exists()
    assert not Path("/var/lib/dpkg/.oisp-test-marker").exists()
