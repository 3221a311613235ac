"""The round: the transaction a coordinator runs over its nodes (:mod:`.coordinator`), in
stages (:mod:`.stages`), with its events, the nodes' progress relayed (:mod:`.relay`), its
result (:mod:`.result`) and the ledger of requests that makes a trigger run once
(:mod:`.ledger`)."""
