#!/usr/bin/env python
"""Certificates and keys for a local trial of the Flower deployment runtime.

    python scripts/flower_certificates.py certs/ --node node-0 --node node-1 [--host my.server]

(the same as `hetlora flower certificates ...`)

writes ca.crt/ca.key (a CA), server.pem/server.key (the SuperLink's certificate, for
localhost and 127.0.0.1 plus every --host), and for every --node NAME an EC P-384 key pair NAME,
NAME.pub in OpenSSH format (flower-supernode --auth-supernode-private-key NAME; register
NAME.pub with `flwr supernode register NAME.pub <connection>`).
"""

import sys

from hetlora.cli import app

if __name__ == "__main__":
    sys.exit(app(["flower", "certificates", *sys.argv[1:]], prog_name="hetlora"))
