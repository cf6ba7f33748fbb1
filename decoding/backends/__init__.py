"""Verifier backends that run elsewhere: the vLLM client and the split-inference edge."""
