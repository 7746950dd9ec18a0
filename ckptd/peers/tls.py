"""TLS credentials of the peer port, both sides (optional: ``peers.tls_cert`` / ``tls_key`` /
``tls_ca``). With a CA, both sides verify each other against it (mutual TLS); without one, the job
shares one self-signed certificate, which is then the only trusted root. Under TLS the shard bytes
stay inside the gRPC stream (peer_bulk.py's raw connections are plaintext and are not offered).
"""

from __future__ import annotations

import grpc

from ckptd.core.config.peers import TlsFiles


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """With a CA: verify peers against it and present our certificate (mutual TLS). Without: the
    job shares one self-signed certificate, which is then the only trusted root."""
    cert = tls.cert.read_bytes()
    if tls.ca is None:
        return grpc.ssl_channel_credentials(root_certificates=cert)
    return grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes(),
                                        private_key=tls.key.read_bytes(), certificate_chain=cert)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS for the peer port; with a CA, peers must also present a certificate it signed."""
    ca = tls.ca.read_bytes() if tls.ca else None
    return grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)
