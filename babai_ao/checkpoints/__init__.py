"""Checkpoints: quantized models written to files and read back.

``hf`` saves and loads through transformers (safetensors, via torchao's flattening) and
``torch.save`` state dicts, with corrupt or mismatched files reported as ``BabaiError``.
Serving formats (compressed-tensors for vLLM, GGUF for llama.cpp) belong here, one module
each. Imports from ``ao`` (the tensor classes) and ``formats``.
"""
