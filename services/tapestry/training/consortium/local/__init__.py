"""A node's local training: the sovereign cycle (:mod:`.node`), held-out evaluation
(:mod:`.evaluation`) and training across torchrun ranks (:mod:`.distributed`)."""
