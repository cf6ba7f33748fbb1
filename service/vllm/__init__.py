"""tandem inside vLLM's process: the verify route and its session contexts, the output-processor trim,
the endpoint plugin and the launcher (``tandem verifier`` = ``python -m service.vllm``).

Needs vLLM (the ``tandem[vllm]`` extra); the client side (``decoding.backends.vllm_client``)
never imports this package. The wire format both sides share lives in ``decoding.protocol``.
"""
