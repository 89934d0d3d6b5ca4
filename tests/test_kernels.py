"""The C row kernels of the int8 backend (engine/kernels.c): built here, equal to the torch steps they
replace (bit for bit where promised), batch-independent, and a lean forward through them that matches the
same forward in torch ops. Where they cannot be built, the engine says why and runs torch ops.

The lossless tests of tests/test_int8_lean.py run on whichever path the machine gets; the CI machine has
a C compiler, so there they run through the kernels.
"""

import shutil

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.int8 import int_mm_exact, quantize_int8, quantize_rows
from engine.kv import new_cache
from engine.lean import LeanForward, _rotate, attach_lean
from engine.tree import make_tree
from engine.verify import target_forward, tree_attention_mask
from tests.tiny import tiny_model

needs_compiler = pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def rows():
    if kernels._compiler() is None:
        pytest.skip("no C compiler on this machine")
    built = kernels.row_kernels()
    assert built is not None, kernels.kernel_status()  # a compiler is here: the build must succeed
    return built


def test_quantize_and_rescale_equal_the_torch_steps_bit_for_bit(rows):
    torch.manual_seed(0)
    x = torch.randn(7, 576) * torch.logspace(-3, 3, 7)[:, None]
    x[3] = 0.0  # an all-zero row takes the 1e-12 floor of the scale
    q, scale = rows.quantize(x)
    want_q, want_scale = quantize_rows(x)
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    acc = torch.randint(-(2**20), 2**20, (7, 300), dtype=torch.int32)
    wscale, bias = torch.rand(1, 300), torch.randn(300)
    for b in (None, bias):
        want = acc.float().mul_(wscale).mul_(scale)
        want = want if b is None else want.add_(b)
        assert torch.equal(rows.rescale(acc, wscale, scale, b), want)


def test_rms_norm_matches_torch_to_rounding(rows):
    torch.manual_seed(1)
    x, weight = torch.randn(5, 576) * 4, torch.rand(576) + 0.5
    torch.testing.assert_close(rows.rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5), atol=0, rtol=1e-6)
    q, scale = rows.rms_quantize(x, weight, 1e-5)
    assert torch.equal((q, scale)[0], rows.quantize(rows.rms_norm(x, weight, 1e-5))[0])


def test_residual_and_rotary_steps(rows):
    torch.manual_seed(2)
    n, heads, kv_heads, hd, capacity, past = 3, 4, 2, 16, 12, 5
    width = (heads + 2 * kv_heads) * hd
    acc = torch.randint(-5000, 5000, (n, width), dtype=torch.int32)
    wscale, xscale, bias = torch.rand(1, width) / 100, torch.rand(n, 1), torch.randn(width)
    cos, sin = torch.rand(n, hd), torch.rand(n, hd)
    keys = torch.zeros(kv_heads, capacity, hd)
    values = torch.zeros_like(keys)
    q = rows.qkv_rotate_store(acc, wscale, xscale, bias, cos, sin, heads, kv_heads, hd, keys, values, past)
    y = acc.float().mul_(wscale).mul_(xscale).add_(bias).view(n, heads + 2 * kv_heads, hd).transpose(0, 1)
    rotated = _rotate(y[None], cos, sin)[0]  # (heads + 2 kv_heads, n, hd): the torch path's float32 rotation
    assert torch.equal(q, rotated[:heads])
    assert torch.equal(keys[:, past : past + n], rotated[heads : heads + kv_heads])
    assert torch.equal(values[:, past : past + n], y[heads + kv_heads :])
    assert (keys[:, :past] == 0).all() and (keys[:, past + n :] == 0).all()  # nothing else written
    # the residual add, then the next norm's quantized input
    x = torch.randn(n, 64)
    acc, wscale = torch.randint(-5000, 5000, (n, 64), dtype=torch.int32), torch.rand(1, 64) / 100
    want = x + acc.float().mul_(wscale).mul_(xscale)
    weight = torch.rand(64) + 0.5
    q, scale = rows.residual_rms_quantize(acc, wscale, xscale, None, x, weight, 1e-6)
    assert torch.equal(x, want)
    assert torch.equal(q, rows.rms_quantize(want, weight, 1e-6)[0])


def int8_llama(seed: int = 0):
    model = tiny_model("llama", layers=2, seed=seed)
    quantize_int8(model)
    attach_lean(model)
    return model


def test_lean_forward_through_kernels_matches_torch_ops(rows):
    if not int_mm_exact():
        pytest.skip("torch._int_mm saturates on this CPU (no VNNI): the torch ops compute another model")
    model = int8_llama()
    assert model.lean.kernels is not None
    torch_ops = LeanForward(model, kernels=False)
    ids = torch.randint(1, 64, (26,))
    parents, depths = torch.tensor([-1, 0, 0, 1, 1, 3]), torch.tensor([0, 1, 1, 2, 2, 3])
    tree = make_tree(ids[20:26], parents, depths, torch.zeros(6), max_depth=3)
    mask = tree_attention_mask(tree, 20, torch.float32)
    results = []
    for forward in (model.lean, torch_ops):
        model.lean = forward
        cache = new_cache(model)
        _, prompt = target_forward(model, ids[:20], torch.arange(20), None, cache)
        _, verify = target_forward(model, tree.tokens, 20 + tree.depths, mask, cache)
        results.append((prompt, verify, cache.keys[:, :, :, :26].float()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_tree_rows_equal_lone_tokens_bit_for_bit(rows):
    """The invariant the int8 promise stands on, through the kernels: each tree node's logits equal
    those of a one-token step over its own path."""
    model = int8_llama(seed=3)
    ids = torch.randint(1, 64, (12,))
    cache = new_cache(model)
    target_forward(model, ids[:8], torch.arange(8), None, cache)
    parents, depths = torch.tensor([-1, 0, 0, 2, 2]), torch.tensor([0, 1, 1, 2, 2])
    tree = make_tree(torch.tensor([ids[8], 5, ids[9], 7, ids[10]]), parents, depths, torch.zeros(5), max_depth=2)
    mask = tree_attention_mask(tree, 8, torch.float32)
    _, tree_logits = target_forward(model, tree.tokens, 8 + tree.depths, mask, cache)
    alone = new_cache(model)
    target_forward(model, ids[:8], torch.arange(8), None, alone)
    for node, position in ((0, 8), (2, 9), (4, 10)):  # the path root, ids[9], ids[10], one token at a time
        _, logits = target_forward(model, tree.tokens[node : node + 1], torch.tensor([position]), None, alone)
        assert torch.equal(logits[0], tree_logits[node])


@needs_compiler
def test_off_and_failed_builds_fall_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("EAGLE_CHAT_KERNELS", "0")
    assert kernels.load_kernels() is None and "EAGLE_CHAT_KERNELS=0" in kernels.kernel_status()
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.delenv("EAGLE_CHAT_KERNELS")
    monkeypatch.setenv("EAGLE_CHAT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "false")  # a "compiler" that fails
    assert kernels.load_kernels() is None and "not built" in kernels.kernel_status()
    assert kernels.row_kernels() is None
    model = int8_llama()  # built while the kernels are unavailable: torch ops, same interface
    assert model.lean.kernels is None
    _, logits = target_forward(model, torch.tensor([1, 2, 3]), torch.arange(3), None, new_cache(model))
    assert logits.shape == (3, 64)


def exact_products(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """q (M, K) int8 @ weight (N, K)^T in exact integers (float64 holds these sums exactly)."""
    return (q.double() @ weight.double().t()).to(torch.int32)


class _Layer:  # what RowKernels.int_mm reads from an Int8Linear
    def __init__(self, weight: torch.Tensor):
        self.qweight_t = weight.t()


def _products_case(seed: int, n: int, k: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    weight[0], q[0] = 127, -127  # the extremes: int16 pair sums of 2 * 127 * 127 must not saturate
    return q, weight


def test_int8_products_are_exact_for_every_row_count_and_thread_count(rows):
    if rows.gemm_rows == 0:
        pytest.skip(f"no C int8 products on this CPU ({kernels.kernel_status()})")
    threads = torch.get_num_threads()
    try:
        for n, k in ((960, 576), (50, 64), (17, 8)):  # 50 and 17: channels that fill no whole block
            for m in (1, 2, 5, 7, 13):
                q, weight = _products_case(n + m, n, k, m)
                layer = _Layer(weight)
                for t in (1, 2):
                    torch.set_num_threads(t)
                    assert torch.equal(rows.int_mm(q, layer), exact_products(q, weight)), (n, k, m, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_the_avx2_and_plain_builds_compute_the_same_products(tmp_path, march):
    """The AVX2 kernel (and the build without SIMD products) on this machine, compiled for an older
    CPU: exact where it runs, and it says so where it does not."""
    import platform
    import subprocess

    if platform.machine() not in ("x86_64", "AMD64") or kernels._compiler() is None:
        pytest.skip("needs an x86-64 CPU and a C compiler")
    from engine.hardware import cpu_description

    if march == "haswell" and "avx2" not in cpu_description()[1]:
        pytest.skip("this CPU has no AVX2")
    flags = [f if f != "-march=native" else f"-march={march}" for f in kernels.FLAGS]
    path = tmp_path / f"{march}.so"
    subprocess.run([kernels._compiler(), *flags, kernels.OPENMP, "-o", str(path), str(kernels.SOURCE), "-lm"],
                   check=True, capture_output=True)  # fmt: skip
    lib = kernels.ctypes.CDLL(str(path))
    for name, args in kernels.SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    lib.gemm_isa.restype, lib.gemm_lanes.restype = kernels.ctypes.c_int, kernels.ctypes.c_long
    built = kernels.RowKernels(lib)
    if march == "x86-64":
        assert lib.gemm_isa() == 0 and built.gemm_rows == 0  # torch._int_mm runs the products
        return
    assert lib.gemm_isa() == 1 and built.gemm_rows > 4096  # AVX2: every product, oneDNN's is not exact
    for n, k, m in ((960, 576, 1), (960, 576, 6), (33, 1536, 9), (17, 8, 3)):
        q, weight = _products_case(m, n, k, m)
        assert torch.equal(built.int_mm(q, _Layer(weight)), exact_products(q, weight)), (n, k, m)


def test_the_one_call_forward_equals_the_per_call_path_bit_for_bit(rows):
    """Small batches run all layers in one C call, others (and captured streams) layer by layer; a token
    must get the same bits either way, or EAGLE-2 would stop reproducing vanilla decoding."""
    model = int8_llama(seed=5)
    ids = torch.randint(1, 64, (14,))
    parents, depths = torch.tensor([-1, 0, 0, 1, 3]), torch.tensor([0, 1, 1, 2, 3])
    tree = make_tree(ids[9:14], parents, depths, torch.zeros(5), max_depth=3)
    mask = tree_attention_mask(tree, 9, torch.float32)
    results = []
    for capture in ((), (1,)):  # () runs the one call where the products are the C ones; (1,) layer by layer
        cache = new_cache(model)
        first, _ = model.lean.forward(ids[:9], torch.arange(9), None, cache, capture)
        node, _ = model.lean.forward(tree.tokens, 9 + tree.depths, mask, cache, capture)
        results.append((first, node, cache.keys[:, :, :, :14].clone(), cache.values[:, :, :, :14].clone()))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_an_int8_target_drafts_through_the_heads_int8_copy(rows):
    """The head's int8 copy in the kernels (engine/draft.py RowsHead) computes what the float head does,
    to int8 rounding, over committed pairs and over a draft level's scratch entries."""
    from engine.draft import Drafter
    from tests.tiny import random_head

    model = tiny_model("llama", layers=1, seed=7)
    head = random_head(model, seed=7)
    quantize_int8(model)
    outputs = []
    for rows_head in (True, False):
        drafter = Drafter(head, model.get_input_embeddings(), model.lm_head, 64)
        if rows_head:
            assert drafter.rows_head is not None  # an int8 target on a CPU with the kernels
        else:
            drafter.rows_head = None
        torch.manual_seed(0)
        tokens, features = torch.randint(1, 64, (12,)), torch.randn(12, model.config.hidden_size)
        hidden = drafter.extend(tokens, features)
        scratch = torch.tensor([[True, False], [False, True]])  # two siblings, each sees itself
        level, _ = drafter._run(tokens[:2], features[:2], torch.tensor([12, 12]), scratch)
        outputs.append((hidden, level, drafter.cache.keys[:, :, :14].clone()))
    for got, want in zip(*outputs):  # int8 rounding: about 1% of the norm here
        assert (got - want).norm() < 0.03 * want.norm()


def test_a_draft_step_in_one_call_matches_the_step_by_step_path(rows):
    """`RowsHead.step` (engine/kernels.c draft_rows, draft_scores: embedding rows, fc, the head's layer,
    scores over a draft vocabulary, top-k) gives the per-call path's hidden rows, cache entries, scores
    and token ids bit for bit: over committed pairs (causal) and over a draft level's scratch entries."""
    from engine.draft import Drafter, RowsHead
    from tests.tiny import random_head

    model = tiny_model("llama", layers=1, seed=8)
    head = random_head(model, seed=8)
    head.draft_vocab = torch.tensor([1, 3, 4, 9, 17, 20, 31, 40, 41, 50, 63])  # target ids of the draft rows
    quantize_int8(model)
    embed = model.get_input_embeddings()
    torch.manual_seed(1)
    tokens, features = torch.randint(1, 64, (9,)), torch.randn(9, model.config.hidden_size)
    scratch = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    results = []
    for one_call in (True, False):
        drafter = Drafter(head, embed, model.lm_head, 32)
        rows_head = drafter.rows_head
        assert isinstance(rows_head, RowsHead)
        if one_call:
            root, _ = drafter._run(tokens[:6], features[:6], torch.arange(6), None)
            drafter.cache.commit()
            level, (scores, ids) = drafter._run(tokens[6:], features[6:], torch.full((3,), 6), scratch, 4)
        else:  # the same steps call by call: RowsHead.run, then the int8 lm_head, log-softmax and top-k
            causal = torch.ones(6, 6, dtype=torch.bool).tril()
            root = rows_head.run(embed(tokens[:6]), features[:6], torch.arange(6), causal, drafter.cache)
            drafter.cache.commit()
            mask = torch.cat([torch.ones(3, 6, dtype=torch.bool), scratch], dim=1)
            level = rows_head.run(embed(tokens[6:]), features[6:], torch.full((3,), 6), mask, drafter.cache)
            scores, idx = rows.top_logsoftmax(drafter.lm_int8(level), 4)
            ids = drafter.vocab_ids[idx]
        results.append((root, level, scores, ids, drafter.cache.keys[:, :, :9].clone()))
        assert drafter.cache.used == 9
    for got, want in zip(*results):
        assert torch.equal(got, want)
    assert set(results[0][3].flatten().tolist()) <= set(head.draft_vocab.tolist())


def test_token_choice_kernels_match_torch(rows):
    """The greedy draw (argmax, the first index among ties) and the draft's top-k log-softmax."""
    torch.manual_seed(4)
    for n, v, k in ((3, 8192, 10), (2, 49152, 1), (2, 100, 3), (1, 7, 7)):
        x = torch.randn(n, v) * 3
        x[0, 2] = x[0, 5] = x[0].max() + 1  # a tie at the top: the first index wins
        x[-1, -1] = x[-1].max() + 2  # the largest value past the last whole chunk
        assert torch.equal(rows.argmax(x), x.argmax(-1))
        values, idx = rows.top_logsoftmax(x, k)
        want_values, want_idx = torch.log_softmax(x, -1).topk(k, -1)
        assert torch.equal(idx[1:], want_idx[1:])  # row 0's tie may come in either order from torch
        assert set(idx[0].tolist()) == set(want_idx[0].tolist())
        torch.testing.assert_close(values, want_values, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "total,depth,k,prune", [(4, 3, 4, True), (10, 4, 3, True), (10, 4, 3, False), (30, 5, 4, True), (3, 6, 2, True)]
)
def test_a_dynamic_tree_in_one_call_is_the_step_by_step_tree(rows, total, depth, k, prune):
    """`Drafter.dynamic_tree` through engine/kernels.c draft_tree (levels, frontier, early stop and rerank
    in one call) builds the tree `_grow` builds step by step in tensor ops: the same nodes, parents,
    depths, scores, masks and paths, and the same scratch entries in the draft cache."""
    from engine.config import TreeConfig
    from engine.draft import Drafter
    from tests.tiny import random_head

    model = tiny_model("llama", layers=1, seed=9)
    head = random_head(model, seed=9)
    head.draft_vocab = torch.arange(1, 64, 2)  # a draft vocabulary of 32 odd ids
    quantize_int8(model)
    cfg = TreeConfig(total_tokens=total, depth=depth, top_k=k)
    torch.manual_seed(2)
    tokens, features = torch.randint(1, 64, (10,)), torch.randn(10, model.config.hidden_size) * 3
    built = []
    for one_call in (True, False):
        drafter = Drafter(head, model.get_input_embeddings(), model.lm_head, 64, prune=prune)
        root_hidden = drafter.extend(tokens, features)
        if one_call:
            tree = drafter.dynamic_tree(tokens[-1], root_hidden, cfg)
        else:
            drafter.cache.truncate(drafter.cache.length)
            tree = drafter._grow(tokens[-1], root_hidden, cfg)
        used = drafter.cache.used
        built.append((tree, used, drafter.cache.keys[:, :, :used].clone()))
    (got, got_used, got_keys), (want, want_used, want_keys) = built
    for name in ("tokens", "parents", "depths", "scores", "ancestors", "paths"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got_used == want_used and torch.equal(got_keys, want_keys)
    assert got.size == min(total, k + (depth - 1) * k * k) + 1
    assert set(got.tokens[1:].tolist()) <= set(head.draft_vocab.tolist())


def test_acceptance_in_c_is_the_tensor_acceptance(rows):
    """engine/kernels.c accept_path picks the node `accept_tensors` picks (the first of the deepest
    matching ones) on random trees and draws over a small vocabulary, padded trees included."""
    from engine.tree import make_tree, padded
    from engine.verify import accept, accept_tensors

    g = torch.Generator().manual_seed(3)
    picked_deeper = 0
    for trial in range(300):
        n = int(torch.randint(2, 40, (1,), generator=g))
        parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)])
        depths = torch.zeros(n, dtype=torch.long)
        for i in range(1, n):
            depths[i] = depths[parents[i]] + 1
        tokens = torch.randint(0, 3, (n,), generator=g)
        tree = make_tree(tokens, parents, depths, torch.zeros(n), int(depths.max()))
        if trial % 3 == 0:
            tree = padded(tree, n + 5)
        drawn = torch.randint(0, 3, (tree.size,), generator=g)
        got, want = accept(tree, drawn), accept_tensors(tree, drawn)
        assert got.shape == () and int(got) == int(want)
        picked_deeper += int(tree.depths[got]) >= 2
    assert picked_deeper > 30  # the trials reach past the first level
