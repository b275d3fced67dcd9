"""The torch and torchao layer: the ``babai::`` ops, the tensor subclasses and the configs.

``ops`` defines the custom ops (``babai::linear``, ``dequantize``, ``hptq_linear``,
``embedding``, ``babai::experts``) that compile and export see whole, and registers the
device kernels of ``babai_ao.kernels``. ``tensor`` (``BabaiQuantizedTensor``) and ``hptq_tensor``
(``HuffmanQuantizedTensor``) are ``TorchAOBaseTensor`` subclasses holding the stored formats
and dispatching to those ops; ``config`` is ``BabaiConfig`` for ``quantize_`` (``observe``
records Hessians for its observe/convert flow), ``embedding`` the config for embedding
tables; ``experts`` (``BabaiExperts``) the module holding a fused MoE layer's packed experts;
``reference`` the float model holding a quantized model's dequantized weights; ``integration`` adds all of them to torchao's and transformers' allow-lists, and
``integrity`` writes a digest of each quantized tensor into checkpoints and checks it when
torchao or ``torch.load`` rebuilds the tensor.

Imports from ``lattice`` and ``formats``; nothing is imported here at package import, so
``babai_ao.ao.ops`` (torch only) loads without torchao.
"""
