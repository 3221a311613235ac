"""The sovereign node service: one per jurisdiction; its corpus and full model stay here."""
