"""The torch and torchao layer: the ``babai::`` ops, the tensor subclasses and the configs.

``ops`` defines the custom ops (``babai::linear``, ``dequantize``, ``hptq_linear``,
``embedding``, ``experts``) that compile and export see whole, and registers the device
kernels of ``babai_ao.kernels``. ``tensor`` (``BabaiQuantizedTensor``) and ``hptq_tensor``
(``HuffmanQuantizedTensor``) are ``TorchAOBaseTensor`` subclasses holding the stored formats
and dispatching to those ops; ``experts`` (``BabaiExperts``) holds a fused MoE layer's
packed experts. ``cpu_layout`` keeps a CPU kernel's layout on a quantized tensor as a cache
(built on first use or by compile, carried through compile, never saved). ``config`` is ``BabaiConfig`` for ``quantize_`` (``observe`` records Hessians
for its observe/convert flow), ``embedding`` the config for embedding tables.
``integration`` adds all of them to torchao's and transformers' allow-lists and hooks;
``integrity`` writes a digest of each quantized tensor into checkpoints and checks it when
torchao or ``torch.load`` rebuilds the tensor; ``reference`` is the float model holding a
quantized model's dequantized weights, what tests and benchmarks compare against.

Imports from ``lattice`` and ``formats``; nothing is imported here at package import, so
``babai_ao.ao.ops`` (torch only) loads without torchao.
"""
