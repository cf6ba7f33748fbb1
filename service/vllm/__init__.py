"""tandem inside vLLM's process: the verify route, its endpoint plugin and the launcher (``tandem verifier``). Needs the ``tandem[vllm]`` extra."""
