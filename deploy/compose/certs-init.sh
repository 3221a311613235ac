#!/bin/sh
# The `certs` service of docker-compose.yml: runs once, as root, before any server starts.
#
# 1. Creates the consortium's certificates in the `certs` volume (/certs/pki), unless they
#    are already there: the CA key never leaves that volume, and no other service mounts it.
# 2. Hands each member its share in a volume of its own (/out/MEMBER): ca.pem, crl.pem and
#    the member's own cert.pem and key.pem, owned by the image's `tapestry` user (uid 10001),
#    the key 0600 (servers refuse a key that group or others can read). A node's container
#    mounts only its own volume, so it never sees another node's key, nor the CA's.
#
# Idempotent: every `docker-compose up` runs it again; it keeps the certificates it finds and
# copies the shares again, so a CRL changed with `tapestry certs revoke` reaches every member
# (the servers re-read their CRL when it changes).
#
# The consortium id must equal consortium_id in consortium.toml and nodes/*.toml, and the
# node ids those files name. The coordinator is reached as `coordinator` (its service name)
# on the compose network, and as localhost / 127.0.0.1 through its published port.
set -eu

pki=/certs/pki
if [ -e "$pki/ca.pem" ]; then
  echo "certs: keeping the certificates in $pki"
else
  # Created aside and renamed into place, so $pki exists only complete.
  rm -rf "$pki.partial"
  tapestry certs init --dir "$pki.partial" --consortium tapestry-compose \
    --coordinator-host coordinator,localhost,127.0.0.1 \
    --node vietnam --node switzerland --node india \
    --operator operator
  mv "$pki.partial" "$pki"
  echo "certs: created the consortium's certificates in $pki"
fi

# put SOURCE DEST MODE: copy, owned by the tapestry user, renamed into place (a server that
# re-reads its CRL never sees half a file).
put() {
  install -m "$3" -o tapestry -g tapestry "$1" "$2.tmp"
  mv -f "$2.tmp" "$2"
}

for share in coordinator nodes/vietnam nodes/switzerland nodes/india operators/operator; do
  out=/out/${share#*/}
  [ -d "$out" ] || { echo "certs: no volume mounted at $out" >&2; exit 1; }
  put "$pki/ca.pem" "$out/ca.pem" 644
  put "$pki/crl.pem" "$out/crl.pem" 644
  put "$pki/$share/cert.pem" "$out/cert.pem" 644
  put "$pki/$share/key.pem" "$out/key.pem" 600
  echo "certs: $share -> $out"
done
