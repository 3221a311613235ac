"""The models a consortium can train: the one spec every member builds from (:mod:`.spec`,
torch-free), the canonical model state (:mod:`.state`) and the architectures
(:mod:`.tiny`, :mod:`.gpt`, :mod:`.hf_causal_lm`). Imports nothing itself."""
