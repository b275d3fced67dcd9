"""Checkpoints: quantized models written to files and read back.

``hf`` saves and loads through transformers (safetensors, via torchao's flattening) and
``torch.save`` state dicts, with corrupt or mismatched files reported as ``BabaiError``.
Serving formats belong here, one module each: ``compressed_tensors`` writes the
compressed-tensors "pack-quantized" layout (llm-compressor's; vLLM serves it, transformers
loads it) holding babai-ao's codes, scales and zeros bit for bit; ``gguf`` writes GGUF files
for llama.cpp, our codes as Q4_0/Q4_1/Q8_0 blocks, bit-exact; ``gguf_q4k`` runs Babai's
nearest plane on llama.cpp's Q4_K super-block grid (real-valued offsets) and encodes the codes
as Q4_K blocks, bit-exact; ``gguf_model`` calibrates a whole model onto the types of
llama.cpp's Q4_K file (Q4_K where rows are multiples of 256, else its Q5_0 fallback) and
hands ``gguf`` the blocks; ``gguf_fit`` fixes those grids by the ``diag H``-weighted rounding
error (llama.cpp's importance-matrix criterion) when asked. ``streamed`` writes a checkpoint block by block as a streamed
calibration finishes each block (one shard per block, the index last), the same tensors and
metadata as ``hf``'s. Imports from ``calibration`` (``gguf_model``), ``ao`` (the tensor
classes), ``formats`` and ``lattice``.
"""
