"""Everything that crosses the wire: the tensor/dataclass <-> protobuf codec and gRPC plumbing.

The generated messages live in :mod:`tapestry.consortium.v1` (``scripts/gen-protos``).
"""
