"""Checkpoints: quantized models written to files and read back.

``hf`` saves and loads through transformers (safetensors, via torchao's flattening) and
``torch.save`` state dicts, with corrupt or mismatched files reported as ``BabaiError``.
Serving formats (compressed-tensors for vLLM, GGUF for llama.cpp) belong here, one module
each. Imports from ``ao`` (the tensor classes) and ``formats``.

``gguf`` writes GGUF files for llama.cpp: our codes as Q4_0/Q4_1/Q8_0 blocks, bit-exact.
"""
