"""TLS for interception: the local certificate authority, leaf certificates, and sans-io ClientHello parsing."""

from oisp.tls.ca import CertificateAuthority, Leaf, default_confdir
from oisp.tls.clienthello import ClientHello, looks_like_tls, parse_client_hello

__all__ = [
    "CertificateAuthority",
    "ClientHello",
    "Leaf",
    "default_confdir",
    "looks_like_tls",
    "parse_client_hello",
]
