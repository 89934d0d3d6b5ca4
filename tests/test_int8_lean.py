"""The int8 CPU backend and the lean forward: exactness where promised, losslessness on top of them.

- `Int8Linear` rows do not depend on their batch (bit for bit), and stay close to the float layer.
- The lean forward reproduces transformers' forward of the same model (float: to rounding; int8: the
  fused products are exact concatenations) for Llama, Qwen2 and Qwen3, and its cache commit equals a
  sequential prefill.
- EAGLE-2 and EAGLE-1 on an int8 target, through the lean forward, give vanilla's greedy tokens of that
  same int8 target, over seeds and tree shapes; sampling keeps its distribution (χ²).
"""

import copy

import pytest
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.int8 import Int8Linear, is_int8, quantize_int8, quantize_rows
from engine.kv import commit_path, new_cache
from engine.lean import LeanCache, RotaryTable, attach_lean, unsupported_reason
from engine.models import backend_name
from engine.tree import make_tree
from engine.verify import target_forward, tree_attention_mask
from tests.test_sampling import exact_tail, gof_pvalue, sample_tail
from tests.tiny import model_and_head, oracle_head, perturbed, tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "the cat sat on", "Why is the sky blue?"]
TREES = [TreeConfig(60, 6, 10), TreeConfig(8, 3, 2), TreeConfig(30, 8, 4), TreeConfig(16, 2, 8), TreeConfig(1, 1, 1)]


def tiny_qwen3(seed: int = 0):
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def build(arch: str, seed: int = 0, layers: int = 2):
    return tiny_qwen3(seed) if arch == "qwen3" else tiny_model(arch, layers=layers, seed=seed)


def test_quantize_rows_roundtrip():
    x = torch.randn(5, 33) * torch.tensor([0.01, 1.0, 100.0, 3.0, 1e-3])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses its full range
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-7).all()


@pytest.mark.parametrize("bias", [False, True])
def test_int8_rows_do_not_depend_on_the_batch(bias):
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(96, 40, bias=bias))
    x = torch.randn(23, 96)
    x[7] *= 50.0  # one large row: with a scale per call it would coarsen every other row
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    assert torch.equal(together, alone)


def test_int8_is_close_to_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(9, 256)
    want, got = linear(x), Int8Linear(linear)(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02


def test_quantize_int8_swaps_every_linear_and_keeps_tied_weight():
    model = tiny_model("llama", layers=2)
    float_head = model.lm_head.weight
    quantize_int8(model)
    assert is_int8(model) and backend_name(model) == "int8"
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.lm_head.weight is float_head  # readers of lm_head.weight still get the float weight


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("int8", [False, True])
def test_lean_forward_matches_transformers(arch, int8):
    model = build(arch)
    if int8:
        quantize_int8(model)
    assert unsupported_reason(model) is None
    attach_lean(model)
    ids = torch.randint(1, 64, (30,))
    hf, lean = DynamicCache(config=model.config), new_cache(model)
    assert isinstance(lean, LeanCache)
    want_f, want = target_forward(model, ids[:20], torch.arange(20), None, hf)
    got_f, got = target_forward(model, ids[:20], torch.arange(20), None, lean)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # a 6-node tree after the prompt: mask + positions, both paths
    parents = torch.tensor([-1, 0, 0, 1, 1, 3])
    depths = torch.tensor([0, 1, 1, 2, 2, 3])
    tree = make_tree(ids[20:26], parents, depths, torch.zeros(6), max_depth=3)
    mask = tree_attention_mask(tree, 20, torch.float32)
    _, want = target_forward(model, tree.tokens, 20 + tree.depths, mask, hf)
    _, got = target_forward(model, tree.tokens, 20 + tree.depths, mask, lean)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert lean.get_seq_length() == hf.get_seq_length() == 26


def test_lean_cache_commit_equals_sequential_prefill():
    model = tiny_model("llama", layers=2)
    quantize_int8(model)
    attach_lean(model)
    ids = torch.randint(1, 64, (12,))
    cache = new_cache(model)
    target_forward(model, ids[:8], torch.arange(8), None, cache)
    parents = torch.tensor([-1, 0, 0, 2, 2])
    depths = torch.tensor([0, 1, 1, 2, 2])
    tokens = torch.tensor([ids[8], 5, ids[9], 7, ids[10]])
    tree = make_tree(tokens, parents, depths, torch.zeros(5), max_depth=2)
    target_forward(model, tree.tokens, 8 + tree.depths, tree_attention_mask(tree, 8, torch.float32), cache)
    commit_path(cache, 8, torch.tensor([0, 2, 4]))  # root, ids[9], ids[10]
    _, after = target_forward(model, ids[11:12], torch.tensor([11]), None, cache)
    fresh = new_cache(model)
    _, want = target_forward(model, ids[:12], torch.arange(12), None, fresh)
    assert torch.equal(after[0], want[-1])  # int8 products are exact; attention over the same entries
    assert cache.get_seq_length() == 12


def test_lean_cache_grows_keeping_entries():
    cache = LeanCache(2, 1, 4, torch.float32, "cpu", capacity=4)
    cache.keys[:, :, :, :3] = 1.0
    cache.length = 3
    cache.reserve(9)
    assert cache.capacity == 16 and (cache.keys[:, :, :, :3] == 1.0).all() and (cache.keys[:, :, :, 3:] == 0).all()


def test_bitsandbytes_and_other_families_fall_back():
    class Fake:
        config = type("C", (), {"model_type": "gpt2"})()

    assert "gpt2" in unsupported_reason(Fake())


def run(engine: Engine, prompt: str, **kw) -> list[int]:
    ids = engine.chat_ids([{"role": "user", "content": prompt}])
    return list(engine.generate(ids, GenerationConfig(**kw)))[-1]["output_ids"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("head_kind", ["random", "perturbed", "oracle"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_int8_greedy_matches_int8_vanilla(arch, head_kind, seed):
    model, head = model_and_head(arch, head_kind, seed)
    quantize_int8(model)
    attach_lean(model)
    engine = Engine(model, tiny_tokenizer(), head)
    accepted = 0
    for prompt in PROMPTS[seed % 3 :: 2]:
        want = run(engine, prompt, method="vanilla", max_new_tokens=40)
        for tree in TREES[seed % 2 :: 2] + [TREES[0]]:
            for method in ("eagle2", "eagle1"):
                got = run(engine, prompt, method=method, max_new_tokens=40, tree=tree)
                assert got == want, (method, tree, prompt)
                accepted += len(got)
    assert accepted > 0


def test_int8_oracle_head_is_accepted():
    """The check above must see drafts accepted, or equality would be trivial."""
    model = tiny_model("llama", layers=1, seed=0)
    head = oracle_head(model)
    quantize_int8(model)
    attach_lean(model)
    engine = Engine(model, tiny_tokenizer(), head)
    ids = engine.chat_ids([{"role": "user", "content": "hello there"}])
    events = list(engine.generate(ids, GenerationConfig(method="eagle2", max_new_tokens=40, tree=TreeConfig(8, 3, 2))))
    assert events[-1]["totals"]["tau"] > 1.5


@pytest.fixture(scope="module")
def int8_sampling_setup():
    from tests.test_sampling import VOCAB

    model = tiny_model("llama", vocab_size=VOCAB, layers=1, seed=11)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.15)
    head = perturbed(oracle_head(model), 1.0, seed=1)
    reference = copy.deepcopy(model)
    quantize_int8(model)
    attach_lean(model)
    quantize_int8(reference)  # the exact distribution is the int8 target's, through transformers' forward
    engine = Engine(model, tiny_tokenizer(VOCAB), head)
    return engine, Engine(reference, tiny_tokenizer(VOCAB), None), [5, 6, 7, 8]


def test_int8_sampling_matches_int8_target(int8_sampling_setup):
    """3 N replies: six disjoint blocks of N seeds gave p-values from 4e-4 to 0.74 on this target
    (0.37 over all six), so a single block is too thin a sample to fail on only where it should."""
    from tests.test_sampling import N

    engine, reference, prompt = int8_sampling_setup
    sampling = SamplingConfig(temperature=1.0)
    counts, accept_rate = sample_tail(engine, prompt, "eagle2", sampling, n=3 * N)
    assert accept_rate > 0.3
    assert gof_pvalue(counts, exact_tail(reference, prompt, sampling)) > 1e-3


# --- the real default model -----------------------------------------------------------------------

REAL_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
]


@pytest.mark.slow
def test_real_model_int8_eagle2_equals_int8_vanilla(default_model_dir):
    """The promise on the app's CPU backend: EAGLE-2 (with the lookup branch, tuned-size and paper trees)
    writes the int8 model's own greedy reply, token for token, and accepts drafts doing it; also when it
    starts from the KV cache the run before it kept."""
    from engine.checkpoint import load_head
    from engine.models import ModelSpec, default_head_path, load_target

    spec = ModelSpec(model=str(default_model_dir), device="cpu", quantization="int8")
    model, tokenizer = load_target(spec, progress=False)
    assert is_int8(model) and model.lean is not None
    engine = Engine(model, tokenizer, load_head(default_head_path(), model))
    taus = []
    for prompt in REAL_PROMPTS:
        want = run(engine, prompt, method="vanilla", max_new_tokens=64)
        for tree in (TreeConfig(8, 4, 4, lookup=10), TreeConfig(60, 6, 10)):
            ids = engine.chat_ids([{"role": "user", "content": prompt}])
            end = list(engine.generate(ids, GenerationConfig(method="eagle2", max_new_tokens=64, tree=tree)))[-1]
            assert end["output_ids"] == want, (prompt, tree)
            assert end["totals"]["cached_tokens"] == len(ids) - 1  # started from the last run's kept cache
            taus.append(end["totals"]["tau"])
    assert sum(taus) / len(taus) > 1.5


def test_rotary_table_gives_the_modules_rows_and_grows():
    rotary = build("llama").model.rotary_emb
    table = RotaryTable(rotary)
    x = torch.randn(3, 8)
    for positions in (torch.tensor([0, 5, 5, 6]), torch.tensor([700, 3]), torch.tensor([1500])):  # the last two grow it
        cos, sin = table(x, positions)
        want_cos, want_sin = rotary(x, positions[None])
        torch.testing.assert_close(cos, want_cos[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, want_sin[0], atol=1e-6, rtol=0)
    assert table.cos.shape[0] >= 1501
    rotary.rope_type = "dynamic"  # frequencies that follow the length: the module answers every call
    dynamic = RotaryTable(rotary)
    dynamic(x, torch.tensor([4]))
    assert not dynamic.fixed and dynamic.cos is None
