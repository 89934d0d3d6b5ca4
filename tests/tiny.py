"""Tiny random models, a character tokenizer and draft heads for CPU tests (no downloads).

`oracle_head` builds a head that predicts a 1-layer target exactly: the target's embeddings are
rescaled to unit RMS and its input layernorm weight is 1, so that layernorm is the identity, and the
head's fc passes the token embedding through; its layer is a copy of the target's. The draft output
then equals the target's pre-norm hidden state, and since the final RMSNorm (weight 1) only rescales
it, the draft's top-1 token is the target's argmax: every drafted greedy path is right.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine.decode import Engine
from engine.head import DraftHead, head_config_for

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:;'\"()-\n<>/|=+*&%$#@[]{}~^`_\\"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    """Character tokenizer: id 0 is <eos>, then one id per character of ALPHABET up to vocab_size."""
    specials = ["<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = list(ALPHABET[: vocab_size - len(specials)])
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?" if "?" in vocab else chars[-1]))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_model(
    arch: str = "llama", vocab_size: int = 64, layers: int = 2, seed: int = 0, max_len: int = 512,
    dtype=torch.float32, eos_scale: float = 0.3,
):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-12,
        tie_word_embeddings=False,
        eos_token_id=0,
        bos_token_id=None,
        pad_token_id=None,
    )
    families = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config),
        "mistral": (MistralForCausalLM, MistralConfig),
    }
    if arch not in families:
        raise ValueError(arch)
    model_class, config_class = families[arch]
    extra = {"mistral": {"sliding_window": None}, "qwen3": {"head_dim": 16}}.get(arch, {})
    model = model_class(config_class(**common, **extra, attn_implementation="sdpa"))
    with torch.no_grad():  # sharper logits than the 0.02-std init, so greedy text is not all ties
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[0].mul_(eos_scale)  # make <eos> (id 0) rarer, so replies have length
    model.generation_config.eos_token_id = 0
    return model.to(dtype).eval()


def random_head(model, seed: int = 0) -> DraftHead:
    torch.manual_seed(seed)
    head = DraftHead(head_config_for(model))
    return head.to(model.lm_head.weight.dtype).eval()


def oracle_head(model) -> DraftHead:
    """A head that predicts a 1-layer target exactly (see module docstring). Mutates `model`'s
    embeddings and input layernorm, which changes the target, not the test's claim."""
    assert model.config.num_hidden_layers == 1
    layer = model.model.layers[0]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.div_(emb.pow(2).mean(-1, keepdim=True).sqrt())  # unit RMS rows
        layer.input_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
    config = head_config_for(model, bias=False)
    qwen2 = model.config.model_type == "qwen2"
    config["attention_bias"] = bool(getattr(model.config, "attention_bias", False)) or qwen2
    head = DraftHead(config).to(model.lm_head.weight.dtype)
    h = model.config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, :h] = torch.eye(h)
        state = {k: v for k, v in layer.state_dict().items() if not k.startswith("input_layernorm")}
        if head.layers[0].self_attn.o_proj.bias is not None and "self_attn.o_proj.bias" not in state:
            state["self_attn.o_proj.bias"] = torch.zeros(h)  # Qwen2 has q/k/v biases only
        head.layers[0].load_state_dict(state, strict=True)
    return head.eval()


def perturbed(head: DraftHead, scale: float, seed: int = 0) -> DraftHead:
    """Copy of `head` with noise on its layer weights: partly right guesses."""
    torch.manual_seed(seed)
    other = DraftHead(head.config_dict).to(head.fc.weight.dtype)
    other.load_state_dict(head.state_dict())
    with torch.no_grad():
        for name, p in other.layers.named_parameters():
            if "proj" in name:
                p.add_(torch.randn_like(p) * scale * p.std())
    return other.eval()


def model_and_head(arch: str, head_kind: str, seed: int):
    """A tiny target and a head of one kind: "random" (2 layers), "oracle" or "perturbed" (1 layer)."""
    model = tiny_model(arch, layers=1 if head_kind != "random" else 2, seed=seed)
    head = random_head(model, seed) if head_kind == "random" else oracle_head(model)
    if head_kind == "perturbed":
        head = perturbed(head, 4.0, seed)
    return model, head


def tiny_engine(arch: str = "llama", head: str = "oracle", layers: int = 1, vocab_size: int = 64, **kw) -> Engine:
    model = tiny_model(arch, vocab_size=vocab_size, layers=layers, **kw)
    tokenizer = tiny_tokenizer(vocab_size)
    if head == "oracle":
        h = oracle_head(model)
    elif head == "random":
        h = random_head(model)
    elif head == "none":
        h = None
    else:
        raise ValueError(head)
    return Engine(model, tokenizer, h)
