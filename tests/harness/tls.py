"""A throwaway certificate authority and a server certificate for 127.0.0.1, per test.

Made with the openssl command line (Debian's `openssl`, which curl and nginx
pull in), in the test's own folder; nothing is installed into a trust store:
clients are pointed at `ca` (curl --cacert, an ssl context) or, for Chromium,
pinned to the server key's SPKI hash.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """An ssl context that trusts only this CA."""
        return ssl.create_default_context(cafile=str(self.ca))

    def spki_sha256(self) -> str:
        """base64 SHA-256 of the server key (Chromium's --ignore-certificate-errors-spki-list)."""
        pem = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-noout", "-pubkey"],
            capture_output=True, check=True, timeout=30,
        ).stdout
        der = subprocess.run(
            ["openssl", "pkey", "-pubin", "-outform", "der"],
            input=pem, capture_output=True, check=True, timeout=30,
        ).stdout
        return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr}")


def make_throwaway_ca(folder: Path) -> TlsFiles:
    """A CA valid for two days and a leaf for 127.0.0.1 / localhost it signed (EC P-256)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = folder / "ca.key", folder / "ca.pem"
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    ext = folder / "server.ext"
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *curve, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", "/CN=dualcast throwaway test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", *curve, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return TlsFiles(ca=ca, cert=cert, key=key)
