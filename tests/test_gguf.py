"""GGUF export (``babai_ao.checkpoints.gguf``): our codes as llama.cpp blocks, bit-exact.

Every quantized tensor written is read back with gguf-py's own reader and dequantizer and
must equal our dequantized weight bit for bit (float32), after undoing llama.cpp's q/k row
permutation; SmolLM2 is also loaded back through transformers' GGUF loader.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from babai_ao import babai_config, quantize_model
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.checkpoints import gguf as G
from babai_ao.errors import BabaiError
from babai_ao.lattice.quantize import quantize_weight

pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")  # exact references

gguf = pytest.importorskip("gguf")


def tiny_llama(seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def quantized_tiny(hidden: int = 64, **kwargs):
    model = tiny_llama(hidden=hidden)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(model, babai_config(group_size=32, **kwargs), calib, progress=False)
    return model


def hf_to_gguf_names(model) -> dict[str, str]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    return {names.get_name(n, try_suffixes=(".weight",)): n for n, _ in model.named_parameters()}


def assert_bit_exact(model, path) -> int:
    """Every tensor of the file decodes (gguf-py) to exactly the model's float32 weight;
    returns how many quantized tensors were checked."""
    reader = gguf.GGUFReader(path)
    params = dict(model.named_parameters())
    by_gguf = hf_to_gguf_names(model)
    assert set(by_gguf) == {t.name for t in reader.tensors}
    quantized = 0
    for t in reader.tensors:
        ours = params[by_gguf[t.name]].detach()
        if isinstance(ours, BabaiQuantizedTensor):
            quantized += 1
            ours = ours.dequantize(torch.float32)
        ours = ours.to(torch.float32).numpy()
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        heads = G._heads_of(t.name, model.config)
        if heads is not None:
            theirs = G.llama_unpermute(theirs, heads)
        assert theirs.dtype == np.float32
        assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)), t.name
    return quantized


@pytest.mark.parametrize(("mode", "bits", "symmetric", "qtype"), [
    ("q4_0", 4, True, "Q4_0"), ("q4_1", 4, False, "Q4_1"), ("q4_1", 4, True, "Q4_1"),
    ("q8_0", 8, True, "Q8_0"), ("auto", 4, False, "Q4_1"), ("auto", 8, True, "Q8_0")])
def test_tiny_llama_bit_exact(tmp_path, mode, bits, symmetric, qtype):
    model = quantized_tiny(bits=bits, symmetric=symmetric, exact_offset=not symmetric)
    path = G.save_gguf(model, tmp_path / "m.gguf", mode=mode, require_tokenizer=False)
    assert assert_bit_exact(model, path) == 14
    reader = gguf.GGUFReader(path)
    kinds = {t.tensor_type.name for t in reader.tensors if ".attn_" in t.name and "norm" not in t.name}
    assert kinds == {qtype}
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2


def test_f32_mode_writes_our_dequantized_weights(tmp_path):
    """``mode="f32"``: every tensor F32, quantized ones our dequantized weights; a float
    model (nothing quantized) is written too."""
    model = quantized_tiny(bits=4, symmetric=True)
    for m in (model, tiny_llama()):
        path = G.save_gguf(m, tmp_path / "m.gguf", mode="f32", require_tokenizer=False)
        assert assert_bit_exact(m, path) == (14 if m is model else 0)
        reader = gguf.GGUFReader(path)
        assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
        assert reader.fields["general.file_type"].contents() == 0


def test_q8_0_writes_code_minus_128(tmp_path):
    """Symmetric 8-bit codes reach 0 (w = −128·s): Q8_0 holds them as int8 −128, exactly."""
    from babai_ao.formats.packing import pack

    model = tiny_llama()
    lin = model.model.layers[0].mlp.down_proj
    weight = BabaiQuantizedTensor.from_hp(lin.weight.detach(), 8, 32, symmetric=True)
    codes = weight.codes()
    codes[0, 0] = 0  # w = −128·s: the grid's lowest point, reachable by Babai's updates
    lin.weight = torch.nn.Parameter(weight._with(qdata=pack(codes, 8)), requires_grad=False)
    assert int(lin.weight.codes()[0, 0]) == 0
    path = G.save_gguf(model, tmp_path / "m.gguf", mode="q8_0", require_tokenizer=False)
    assert assert_bit_exact(model, path) == 1
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    assert t.data[0, 2:34].view(np.int8)[0] == -128


def test_permutation_matches_transformers():
    """transformers' GGUF loader undoes our q/k permutation (q: all heads, k: kv heads)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(16 * 4, dtype=np.float32).reshape(16, 4)
    loader = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, heads in (("blk.0.attn_q.weight", 4), ("blk.0.attn_k.weight", 2)):
        permuted = G.llama_permute(rows, heads)
        assert not np.array_equal(permuted, rows)
        assert np.array_equal(loader.process(permuted, name).weights, rows)
        assert np.array_equal(G.llama_unpermute(permuted, heads), rows)
    # within a head, llama.cpp interleaves the two rotary halves: rows 0, 4, 1, 5, …
    assert G.llama_permute(rows, 2)[:8, 0].tolist() == [0, 16, 4, 20, 8, 24, 12, 28]


def test_q4_1_needs_exact_offsets(tmp_path):
    model = quantized_tiny(bits=4, symmetric=False)  # plain min-max grid: s·z rounds in fp16
    with pytest.raises(BabaiError, match="exact_offset=True") as e:
        G.save_gguf(model, tmp_path / "m.gguf", mode="q4_1", require_tokenizer=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(("kwargs", "mode", "match"), [
    (dict(bits=3), "q4_1", "4-bit codes in groups of 32"),
    (dict(bits=4, group_size=64, symmetric=True), "q4_0", "group_size=32"),
    (dict(bits=4, symmetric=False, exact_offset=True), "q4_0", "symmetric=True"),
    (dict(bits=8, symmetric=False), "q8_0", "symmetric=True"),
    (dict(bits=4, clip="ssqr", outlier_density=0.05), "q4_1", "SSQR outliers"),
    (dict(bits=4, clip="hptq", target_bits=4.0), "q4_0", "HPTQ"),
])
def test_bad_inputs_one_line(tmp_path, kwargs, mode, match):
    kwargs.setdefault("group_size", 32)
    model = tiny_llama(hidden=128)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(model, babai_config(**kwargs), calib, progress=False)
    with pytest.raises(BabaiError, match=match) as e:
        G.save_gguf(model, tmp_path / "m.gguf", mode=mode, require_tokenizer=False)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_needs_a_tokenizer_source(tmp_path):
    model = quantized_tiny(bits=4, symmetric=True)
    with pytest.raises(BabaiError, match="source="):
        G.save_gguf(model, tmp_path / "m.gguf")


def test_exact_offset_grid_is_fp16_exact():
    from babai_ao import quantize_weight

    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(256, 128)
    plain = quantize_weight(w, x.T @ x, bits=4, group_size=32, order="act")
    exact = quantize_weight(w, x.T @ x, bits=4, group_size=32, order="act", exact_offset=True)
    assert not bool(G.fp16_exact(plain.scales.double() * plain.zeros).all())
    assert bool(G.fp16_exact(exact.scales.double() * exact.zeros).all())
    rel = (exact.scales.float() / plain.scales.float() - 1).abs().max()
    assert float(rel) < 2**-6  # a few fp16 ulps
    assert exact.certificate.error <= 1.05 * plain.certificate.error


@pytest.mark.model
@pytest.mark.parametrize("symmetric", [True, False])
def test_smollm2_gguf_loads_in_transformers(tmp_path, smollm2_small, calibration_small,
                                            symmetric):
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(smollm2_small[0])
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    quantize_model(model, babai_config(bits=4, group_size=32, symmetric=symmetric,
                                       exact_offset=not symmetric),
                   calibration_small[:2, :64], progress=False)
    path = G.save_gguf(model, tmp_path / "smol.gguf")  # source found: the bundled GGUF
    assert assert_bit_exact(model, path) == 7
    reader = gguf.GGUFReader(path)
    source = gguf.GGUFReader(G.default_source(model))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.chat_template", "llama.rope.freq_base"):
        assert reader.fields[key].contents() == source.fields[key].contents(), key
    assert reader.fields["llama.block_count"].contents() == 1
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0"  # the source's bytes, copied
    assert types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == ("Q4_0" if symmetric else "Q4_1")

    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                dtype=torch.float32).eval()
    ids = calibration_small[:1, :48]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = back(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    """``babai-ao quantize smollm2`` (1 block, RTN, 4 bit g32, exact offsets): a Q4_1 run."""
    from babai_ao import cli

    run = tmp_path_factory.mktemp("gguf") / "rtn-w4g32"
    assert cli.main(["quantize", "smollm2", "--num-layers", "1", "--mode", "rtn", "--bits",
                     "4", "--group-size", "32", "--exact-offset", "--out", str(run),
                     "--no-progress"]) == 0
    return run


@pytest.mark.model
def test_cli_export_gguf(capsys, gguf_run):
    import re

    from babai_ao import cli

    capsys.readouterr()
    code = cli.main(["export", str(gguf_run), "--format", "gguf", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = gguf_run / "model.gguf"
    diff = float(re.search(r"max \|logits - eager\| = ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4
    reader = gguf.GGUFReader(path)
    linears = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "attn_q.weight")
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith(linears)} == {"Q4_1"}
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152


@pytest.mark.model
@pytest.mark.parametrize(("argv", "needle"), [
    (["--mode", "q4_0"], "symmetric=True"),        # an asymmetric run as Q4_0
    (["--mode", "q5_0"], "--mode q5_0"),           # no such mode
    (["--out", "m.bin"], "does not end in .gguf"),
    (["--mode", "q4_k"], "calibrates the float model"),  # q4_k takes the float model
])
def test_cli_export_gguf_errors(capsys, gguf_run, tmp_path, argv, needle):
    from babai_ao import cli

    argv = [a if a != "m.bin" else str(tmp_path / a) for a in argv]
    capsys.readouterr()
    code = cli.main(["export", str(gguf_run), "--format", "gguf", "--out",
                     str(tmp_path / "x.gguf"), *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("babai-ao")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "x.gguf").exists()


# ---- Q4_K: Babai's codes on llama.cpp's super-block grid --------------------------------
def correlated_hessian(k: int, seed: int = 0) -> torch.Tensor:
    """``XᵀX`` of inputs with strongly correlated neighbouring features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g, dtype=torch.float64)
    x = x + 0.9 * torch.roll(x, 1, dims=1) + 0.5 * torch.randn(4 * k, 1, generator=g,
                                                                dtype=torch.float64)
    return x.T @ x


def test_q4_k_packing_round_trips_every_6_bit_value():
    """Random scales/mins over all of 0..63 and random codes: gguf-py decodes our bytes to
    ``(d·sc)·q − dmin·m`` bit for bit."""
    from babai_ao.checkpoints import gguf_q4k as K

    g = torch.Generator().manual_seed(3)
    n, k = 5, 512
    grid = K.Q4KGrid(d=torch.rand(n, k // 256, generator=g).half() * 0.01,
                     dmin=torch.rand(n, k // 256, generator=g).half() * 0.01,
                     sc=torch.randint(0, 64, (n, k // 32), generator=g),
                     m=torch.randint(0, 64, (n, k // 32), generator=g))
    q = K.Q4KWeight(torch.randint(0, 16, (n, k), generator=g), grid, 0.0, 0)
    blocks = K.encode_q4_k(q)
    assert blocks.shape == (n, 2 * 144)
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K).reshape(n, k)
    assert np.array_equal(theirs.view(np.uint32), q.dequantize().numpy().view(np.uint32))


def test_q4_k_babai_bit_exact_and_beats_rtn():
    """A tiny Llama's q_proj (hidden 256: one super-block per row): Babai on the fitted Q4_K
    grid decodes (gguf-py) to exactly our weight, and its output error is below RTN's on
    the same grid for a correlated Hessian."""
    from babai_ao.checkpoints import gguf_q4k as K

    w = tiny_llama(hidden=256).model.layers[0].self_attn.q_proj.weight.detach()
    h = correlated_hessian(w.shape[1])
    grid = K.fit_q4_k(w)
    babai = K.quantize_q4_k(w, h, grid=grid)
    rtn = K.quantize_q4_k(w, None, grid=grid)
    assert int(babai.codes.min()) >= 0 and int(babai.codes.max()) <= 15
    for q in (babai, rtn):
        theirs = gguf.quants.dequantize(K.encode_q4_k(q), gguf.GGMLQuantizationType.Q4_K)
        ours = q.dequantize().numpy()
        assert np.array_equal(theirs.reshape(ours.shape).view(np.uint32), ours.view(np.uint32))
    diff = w.double() - rtn.dequantize().double()
    rtn_error = float(((diff @ h) * diff).sum())
    assert rtn.error == pytest.approx(float(diff.pow(2).sum()))  # H = I for RTN's own
    assert babai.error < 0.8 * rtn_error, (babai.error, rtn_error)


def test_q4_k_fit_and_errors():
    """The fitted grid holds each sub-block's min-max range up to the 6-bit rounding; K must
    be a multiple of 256."""
    from babai_ao.checkpoints import gguf_q4k as K

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(4))
    grid = K.fit_q4_k(w)
    assert int(grid.sc.min()) >= 1 and int(grid.sc.max()) == 63
    rtn = K.quantize_q4_k(w)
    sub = w.reshape(8, 8, 32)
    step = (sub.amax(-1).clamp(min=0) - sub.amin(-1).clamp(max=0)) / 15
    err = (w - rtn.dequantize()).abs().reshape(8, 8, 32).amax(-1)
    assert bool((err <= 1.1 * step).all())  # half a step, plus the 6-bit scale rounding
    with pytest.raises(BabaiError, match="multiple of 256"):
        K.fit_q4_k(torch.randn(4, 128))


# ---- whole-model Q4_K (gguf_model): Q4_K where rows allow, llama.cpp's Q5_0 fallback ------
def mixed_llama(seed: int = 0):
    """hidden 96 (not a multiple of 256: Q5_0, as llama.cpp falls back), intermediate 256
    (``down_proj`` reads 256 features: Q4_K)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_q5_0_packing_round_trips_every_code():
    """Every code 0..31 at every position, random fp16 scales: gguf-py decodes our Q5_0
    bytes to ``d·(q − 16)`` bit for bit."""
    from babai_ao.checkpoints import gguf_model as M

    g = torch.Generator().manual_seed(5)
    codes = torch.stack([torch.randperm(32, generator=g) for _ in range(12)]).reshape(3, 128)
    scale = (torch.rand(3, 4, generator=g) * 0.1).half()
    blocks = M.encode_q5_0(codes, scale)
    assert blocks.shape == (3, 4 * 22)
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q5_0).reshape(3, 128)
    ours = scale.float().repeat_interleave(32, dim=1) * (codes - 16).float()
    assert np.array_equal(theirs.view(np.uint32), ours.numpy().view(np.uint32))
    with pytest.raises(BabaiError, match="outside 0..31"):
        M.encode_q5_0(codes + 1, scale)


def test_q5_0_babai_beats_rtn_on_the_same_grid():
    from babai_ao.checkpoints import gguf_model as M

    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(6))
    h = correlated_hessian(96)
    babai, q_b = M.quantize_block_weight(w, h)
    rtn, q_r = M.quantize_block_weight(w, None)
    assert babai.ggml_type == rtn.ggml_type == "Q5_0" and babai.bits_per_weight == 5.5

    def err(q):
        d = w.double() - q.double()
        return float(((d @ h) * d).sum())
    assert err(q_b) < 0.8 * err(q_r)
    assert babai.certificate.error_undamped == pytest.approx(err(q_b), rel=1e-3)


def uneven_layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few outlier columns and a Hessian whose columns differ in energy by
    orders of magnitude (where a range-based grid wastes steps on columns that matter little)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[:, ::37] *= 6
    x = torch.randn(2048, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))
    return w, (x.T @ x).double()


@pytest.mark.parametrize("k", [256, 96])  # Q4_K, Q5_0
def test_weighted_grid_fit_lowers_the_weighted_rounding_error(k):
    """``gguf_fit``'s grids round with less ``diag H``-weighted error than the min-max grids
    (the candidates include min-max itself), and their scales are what GGUF stores."""
    from babai_ao.checkpoints import gguf_fit as F
    from babai_ao.checkpoints import gguf_model as M
    from babai_ao.checkpoints.gguf_q4k import fit_q4_k, quantize_q4_k

    w, h = uneven_layer(32, k, seed=11)
    a = F.importance(h)

    def werr(q: torch.Tensor) -> float:
        return float(((w.double() - q.double()) ** 2 * a).sum())
    if k % 256 == 0:
        minmax = quantize_q4_k(w, None, grid=fit_q4_k(w)).dequantize()
        weighted = quantize_q4_k(w, None, grid=F.fit_q4_k_weighted(w, a)).dequantize()
    else:
        grid = M.BlockGrid(bits=5, symmetric=True, clip=True, scale_dtype=torch.float16)
        minmax = quantize_weight(w, None, group_size=32, grid=grid).dequantize()
        d = F.fit_q5_0(w, a)
        assert torch.equal(d, d.half().float()) and bool((d > 0).all())  # fp16 d, positive
        weighted = quantize_weight(w, None, group_size=32, grid=grid, scales=d,
                                   zeros=torch.full_like(d, 16)).dequantize()
    assert werr(weighted) < 0.9 * werr(minmax)
    with pytest.raises(BabaiError, match="one weight per input column"):
        F.fit_q5_0(w, a[1:])


@pytest.mark.parametrize("k", [256, 96])
def test_best_grid_fit_keeps_the_lower_output_error(k):
    """``grid_fit="best"`` = the minmax or weighted result, whichever leaves the lower
    ``tr((W−Q) H (W−Q)ᵀ)``; both are Babai on their grid (checked against the float error)."""
    from babai_ao.checkpoints import gguf_model as M

    w, h = uneven_layer(16, k, seed=12)
    runs = {fit: M.quantize_block_weight(w, h, grid_fit=fit) for fit in M.GRID_FITS}
    errs = {}
    for fit, (blocks, q) in runs.items():
        d = w.double() - q.double()
        errs[fit] = float(((d @ h) * d).sum())
        assert blocks.certificate.error_undamped == pytest.approx(errs[fit], rel=1e-3)
    assert errs["best"] == min(errs["minmax"], errs["weighted"])
    assert errs["weighted"] != errs["minmax"]  # the two grids differ here
    with pytest.raises(BabaiError, match="needs the layer's Hessian"):
        M.quantize_block_weight(w, None, grid_fit="weighted")
    with pytest.raises(BabaiError, match="grid_fit='nope' is unknown"):
        M.quantize_block_weight(w, h, grid_fit="nope")


@pytest.mark.parametrize("k", [256, 96])
def test_best_grid_fit_solves_once_where_the_grids_coincide(k, monkeypatch):
    """Where the weighted fit gives the min-max grid, ``"best"`` solves once (that result);
    without a Hessian it is min-max (nothing to weight by); it is the default."""
    import inspect

    from babai_ao.checkpoints import gguf_model as M

    w, h = uneven_layer(16, k, seed=13)
    assert inspect.signature(M.quantize_block_weight).parameters["grid_fit"].default == "best"
    minmax = M.quantize_block_weight(w, h, grid_fit="minmax")
    fit, solve, solves = M._fit_grid, M._solve_on_grid, []
    monkeypatch.setattr(M, "_fit_grid", lambda weight, a: fit(weight, None))
    monkeypatch.setattr(M, "_solve_on_grid", lambda *a: solves.append(1) or solve(*a))
    blocks, q = M.quantize_block_weight(w, h)
    assert len(solves) == 1
    assert np.array_equal(blocks.data, minmax[0].data) and torch.equal(q, minmax[1])
    monkeypatch.undo()
    rtn = M.quantize_block_weight(w, None)
    assert np.array_equal(rtn[0].data, M.quantize_block_weight(w, None, grid_fit="minmax")[0].data)


@pytest.mark.parametrize("grid_fit", ["minmax", "best"])
def test_q4_k_model_file_decodes_to_the_model(tmp_path, grid_fit):
    """Sequential calibration onto Q4_K/Q5_0, written as GGUF: every tensor decodes (gguf-py)
    to exactly the model's float32 weight (q/k rows unpermuted); types as llama.cpp picks."""
    from babai_ao.checkpoints import gguf_model as M

    model = mixed_llama()
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    blocks, report = M.quantize_q4_k_model(model, calib, progress=False, grid_fit=grid_fit)
    assert len(blocks) == len(report.rows) == 14
    assert {n: b.ggml_type for n, b in blocks.items() if "down_proj" in n} == {
        f"model.layers.{i}.mlp.down_proj.weight": "Q4_K" for i in range(2)}
    assert {b.ggml_type for n, b in blocks.items() if "down_proj" not in n} == {"Q5_0"}
    assert {r.bits_per_weight for r in report.rows} == {4.5, 5.5}
    path = G.save_gguf(model, tmp_path / "m.gguf", mode="q4_k", blocks=blocks,
                       require_tokenizer=False)
    assert_bit_exact(model, path)
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == "Q4_K" and kinds["blk.1.attn_q.weight"] == "Q5_0"
    assert kinds["token_embd.weight"] == "F32"
    # the file's blocks must be what the model computes with: a changed weight is refused
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    with pytest.raises(BabaiError, match="decode to"):
        G.save_gguf(model, tmp_path / "n.gguf", mode="q4_k", blocks=blocks,
                    require_tokenizer=False)
    assert not (tmp_path / "n.gguf").exists()


def test_q4_k_model_errors(tmp_path):
    from babai_ao.checkpoints import gguf_model as M

    with pytest.raises(BabaiError, match="neither Q4_K .* nor its fallback Q5_0"):
        M.block_type(100)
    model = mixed_llama()
    with pytest.raises(BabaiError, match="blocks=..."):
        G.save_gguf(model, tmp_path / "m.gguf", mode="q4_k", require_tokenizer=False)
    with pytest.raises(BabaiError, match="float32 model"):
        M.GGUFQ4KConfig().quantize_tensor(torch.randn(4, 256).half())


@pytest.mark.model
def test_cli_export_gguf_q4_k(capsys, tmp_path):
    """``babai-ao export smollm2 --format gguf --mode q4_k`` calibrates the float model and
    writes Q4_K (``down_proj``) / Q5_0 blocks that transformers reads back to exactly it."""
    import re

    from babai_ao import cli

    path = tmp_path / "q4k.gguf"
    capsys.readouterr()
    code = cli.main(["export", "smollm2", "--format", "gguf", "--mode", "q4_k", "--num-layers",
                     "1", "--calib-windows", "2", "--calib-len", "64", "--out", str(path),
                     "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "7 linears (6 Q5_0, 1 Q4_K)" in out and "5.250 stored bits/weight" in out, out
    diff = float(re.search(r"max \|logits - eager\| = ([0-9.e+-]+)", out).group(1))
    assert diff == 0.0
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.ffn_down.weight"] == "Q4_K" and kinds["blk.0.attn_v.weight"] == "Q5_0"
