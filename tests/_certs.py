"""trustme certificates written to files, as an operator would give them
(``--certfile``/``--keyfile``, ``--ca-file``)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import attrs
import trustme


@attrs.frozen
class CertFiles:
    """A CA and a certificate it issued, on disk."""

    ca: trustme.CA
    certfile: str
    keyfile: str
    ca_file: str

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting this CA only."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def issue(directory: Path, *hosts: str, stem: str = "gateway") -> CertFiles:
    """A new CA and a certificate for ``hosts`` (default 127.0.0.1), written to
    ``directory/STEM.crt`` (the certificate then its chain) and ``STEM.key``,
    replacing files already there atomically, as certbot's renewals do; the
    CA goes to a file of its own (``STEM-ca-N.pem``)."""
    ca = trustme.CA()
    leaf = ca.issue_cert(*(hosts or ("127.0.0.1",)))
    certfile, keyfile = directory / f"{stem}.crt", directory / f"{stem}.key"
    ca_file = directory / f"{stem}-ca-{len(list(directory.glob(f'{stem}-ca-*.pem')))}.pem"
    replace(certfile, b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    replace(keyfile, leaf.private_key_pem.bytes())
    replace(ca_file, ca.cert_pem.bytes())
    return CertFiles(ca, str(certfile), str(keyfile), str(ca_file))


def replace(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a new file renamed over it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)
