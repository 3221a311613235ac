"""The consortium PKI: one CA per consortium, a certificate per node, coordinator and operator.

Layout of a certificate directory (``tapestry certs init --dir DIR``)::

    DIR/ca.pem                          the consortium CA certificate          0644
    DIR/ca.key                          its private key (keep it offline)      0600
    DIR/crl.pem                         revocations, signed by the CA          0644
    DIR/coordinator/{cert,key}.pem      coordinator, TLS server and client     0644 / 0600
    DIR/nodes/<node_id>/{cert,key}.pem  one per node, TLS server and client    0644 / 0600
    DIR/operators/<name>/{cert,key}.pem one per operator, TLS client only      0644 / 0600

Identity lives in a URI SAN, SPIFFE-style, so one string names a peer whatever host it runs
on: ``spiffe://<consortium>/coordinator``, ``spiffe://<consortium>/node/<node_id>``,
``spiffe://<consortium>/operator/<name>``. Servers also carry DNS or IP SANs for their
hosts, which is what a TLS client checks the address it dialled against. Keys are ECDSA
P-256, which gRPC's BoringSSL accepts on every platform.
"""
