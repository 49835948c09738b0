"""stories260K conversion: the HF models and tokenizer must reproduce llama2.c exactly.

The references below are written from llama2.c's file formats and run.c's math, independently of
tasks/language/models.py, so a wrong rotary permutation, GQA mapping, norm or merge rule shows up as a mismatch.
"""

from __future__ import annotations

import json
import random
import struct
import time

import numpy as np
import pytest
import torch

from eva_bench.assets import MissingAssetError, OfflineHubError, asset
from tasks.language.models import from_hub, greedy_continuation, load_llama2c_tokenizer, stories260k

CHECKPOINT = "models/stories260K/stories260K.bin"
TOKENIZER = "models/stories260K/tok512.bin"
# karpathy/llama2.c doc/stories260K.md, temperature 0.
DOCUMENTED = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)


@pytest.fixture(scope="module")
def models():
    return {arch: stories260k(architecture=arch)[0] for arch in ("llama", "mistral")}


@pytest.fixture(scope="module")
def tokenizer():
    return load_llama2c_tokenizer(asset(TOKENIZER))


# ----------------------------------------------------------------------------------------- reference forward (run.c)


def reference_logits(path, tokens: list[int]) -> np.ndarray:
    """llama2.c run.c's forward pass over ``tokens`` in float64 numpy, one position at a time with a KV cache."""
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hs = dim // n_heads
    kv_dim = n_kv * hs
    w = np.frombuffer(raw, "<f4", offset=28).astype(np.float64)
    pos = 0

    def read(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = w[pos : pos + n].reshape(shape)
        pos += n
        return out

    emb = read(vocab, dim)
    rms_att = read(n_layers, dim)
    wq, wk, wv, wo = read(n_layers, dim, dim), read(n_layers, kv_dim, dim), read(n_layers, kv_dim, dim), read(n_layers, dim, dim)
    rms_ffn = read(n_layers, dim)
    w1, w2, w3 = read(n_layers, hidden, dim), read(n_layers, dim, hidden), read(n_layers, hidden, dim)
    rms_final = read(dim)
    read(seq_len, hs // 2)
    read(seq_len, hs // 2)
    wcls = emb if shared else read(vocab, dim)

    def rmsnorm(x, weight):
        return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))

    key_cache = np.zeros((n_layers, len(tokens), kv_dim))
    value_cache = np.zeros((n_layers, len(tokens), kv_dim))
    all_logits = []
    for p, token in enumerate(tokens):
        x = emb[token].copy()
        for layer in range(n_layers):
            xb = rmsnorm(x, rms_att[layer])
            q, k, v = wq[layer] @ xb, wk[layer] @ xb, wv[layer] @ xb
            for i in range(0, dim, 2):  # rotate consecutive pairs, as run.c does
                freq = 1.0 / 10000.0 ** ((i % hs) / hs)
                c, s = np.cos(p * freq), np.sin(p * freq)
                for vec in ((q, k) if i < kv_dim else (q,)):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * c - v1 * s, v0 * s + v1 * c
            key_cache[layer, p], value_cache[layer, p] = k, v
            out = np.zeros(dim)
            for h in range(n_heads):
                kvh = h // (n_heads // n_kv)  # grouped-query attention
                qh = q[h * hs : (h + 1) * hs]
                keys = key_cache[layer, : p + 1, kvh * hs : (kvh + 1) * hs]
                scores = keys @ qh / np.sqrt(hs)
                att = np.exp(scores - scores.max())
                att /= att.sum()
                out[h * hs : (h + 1) * hs] = att @ value_cache[layer, : p + 1, kvh * hs : (kvh + 1) * hs]
            x = x + wo[layer] @ out
            xb = rmsnorm(x, rms_ffn[layer])
            h1, h3 = w1[layer] @ xb, w3[layer] @ xb
            x = x + w2[layer] @ (h1 / (1.0 + np.exp(-h1)) * h3)
        all_logits.append(wcls @ rmsnorm(x, rms_final))
    return np.stack(all_logits)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_logits_match_llama2c_reference(models, tokenizer, arch):
    tokens = tokenizer("Once upon a time, there was a big dog. It liked to run and jump!").input_ids
    assert len(tokens) > 10
    expected = reference_logits(asset(CHECKPOINT), tokens)
    with torch.no_grad():
        got = models[arch](torch.tensor([tokens])).logits[0].double().numpy()
    assert got.shape == expected.shape == (len(tokens), 512)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_continuation_is_the_documented_story(models, tokenizer, arch):
    text = greedy_continuation(models[arch], tokenizer, "Once upon a time", max_new_tokens=60)
    assert text.startswith(DOCUMENTED), text


def test_model_config(models):
    llama, mistral = models["llama"], models["mistral"]
    assert type(llama).__name__ == "LlamaForCausalLM" and type(mistral).__name__ == "MistralForCausalLM"
    assert not llama.training
    assert llama.config.num_key_value_heads == 4 and llama.config.num_attention_heads == 8
    assert llama.config.max_position_embeddings == 512 and llama.config.bos_token_id == 1
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()  # shared classifier
    assert mistral.config.sliding_window is None


# ----------------------------------------------------------------------------------------- reference tokenizer (run.c)


def llama2c_encode(vocab: dict[str, int], scores: list[float], text: str) -> list[int]:
    """run.c's encode(text, bos=1, eos=0): dummy-prefix space, per-character lookup or byte fallback, then merge the
    highest-scoring adjacent pair (first one on ties) until none is in the vocabulary."""
    ids = [1]
    if text:
        ids.append(vocab[" "])
    for ch in text:
        if ch in vocab:
            ids.append(vocab[ch])
        else:
            ids.extend(b + 3 for b in ch.encode("utf-8"))
    strings = {i: s for s, i in vocab.items()}
    body = ids[1:]
    while True:
        best, best_score = -1, -1e10
        for i in range(len(body) - 1):
            merged = vocab.get(strings[body[i]] + strings[body[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best, best_score = i, scores[merged]
        if best < 0:
            return ids[:1] + body
        body[best : best + 2] = [vocab[strings[body[best]] + strings[body[best + 1]]]]


def read_raw_vocab(path):
    raw = open(path, "rb").read()
    pos, vocab, scores = 4, {}, []
    while pos < len(raw):
        score, n = struct.unpack("<fi", raw[pos : pos + 8])
        vocab[raw[pos + 8 : pos + 8 + n].decode("utf-8")] = len(scores)
        scores.append(score)
        pos += 8 + n
    return vocab, scores


def sample_texts() -> list[str]:
    texts = [
        "Once upon a time",
        "Once upon a time, there was a little girl named Lily.",
        "",
        " ",
        "  leading and trailing  ",
        "a",
        "The cat sat.\nThe dog ran!\n\nThe end.",
        "\ttabs\tand\r\nwindows newlines",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
        "#### 72",
        "What is $\\frac{1}{2} + \\sqrt{3}$? The answer is $\\boxed{\\frac{5}{6}}$.",
        "Let $f(x) = 3x^2 - 5x + 7$. Find $f(-2)$.",
        "x_{n+1} = x_n^2 % 7 | y ~ [0, 1] & z < 4 > 3 = 3 @ # ^ * ( ) + = ;",
        "Café naïve résumé — “quoted” ‘single’ … ™ €5 ñ",
        "日本語のテキスト, 中文, Ελληνικά, русский, עברית, 😀🎉 emoji",
        "\u00a0non-breaking\u00a0space and\u200ahair space",
        "ÿþý 1234567890 0.5 3,000,000 1e-5",
        "Lily's mom said, \"Lily, let's go to the park.\"",
        "aaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbb    theeeee",
        "the the the thethethe inin ing ingingi",
    ]
    rng = random.Random(0)
    words = "the a little girl named Lily Tom played happy big red ball dog cat sun said . , ! ? \" ' 7 $ \\boxed{ } 42 % é 😀 日".split()
    for _ in range(200):
        pieces = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        seps = [rng.choice([" ", " ", " ", "", "  ", "\n"]) for _ in pieces]
        texts.append("".join(p + s for p, s in zip(pieces, seps)))
    for _ in range(60):  # arbitrary printable and non-ASCII characters, glued together
        chars = (chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF)])) for _ in range(rng.randint(1, 20)))
        texts.append("".join(chars).replace("\u2581", "_"))  # a literal "▁" reads as a space (documented)
    # Real benchmark text, truncated to keep the quadratic reference encoder fast.
    for rel, key in (("gsm8k/test.jsonl", "question"), ("math/test.jsonl", "problem")):
        try:
            lines = asset(rel).read_text().splitlines()[:50]
        except MissingAssetError:
            continue
        texts.extend(json.loads(line)[key][:200] for line in lines)
    return texts


def test_tokenizer_matches_llama2c_encode(tokenizer):
    vocab, scores = read_raw_vocab(asset(TOKENIZER))
    texts = sample_texts()
    assert len(texts) >= 250
    mismatches = [t for t in texts if tokenizer(t).input_ids != llama2c_encode(vocab, scores, t)]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]!r}"


def test_tokenizer_round_trip(tokenizer):
    for text in sample_texts():
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens_and_padding(tokenizer):
    ids = tokenizer("Once upon a time").input_ids
    assert ids[0] == 1 and tokenizer.convert_ids_to_tokens(ids[1]) == "▁Once"
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0 and tokenizer.padding_side == "right"
    assert tokenizer.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]
    batch = tokenizer(["Hi", "Once upon a time"], padding=True)
    assert batch.input_ids[0][-1] == 0 and batch.attention_mask[0][-1] == 0
    assert tokenizer.decode([1, 403, 407]) == "<s> Once upon"  # bos shown, dummy-prefix space hidden


# ----------------------------------------------------------------------------------------- assets and hub


def test_missing_checkpoint_raises():
    with pytest.raises(MissingAssetError, match="stories260K"):
        stories260k(checkpoint="models/stories260K/no-such-file.bin")


def test_from_hub_offline_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever is local

    def must_not_load(*args, **kwargs):
        raise AssertionError("from_pretrained reached before the offline check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    start = time.monotonic()
    with pytest.raises(OfflineHubError, match="Llama-2-7b-hf"):
        from_hub("meta-llama/Llama-2-7b-hf", revision="01c7f73d771dfac7d292323805ebc428287df4f9")
    assert time.monotonic() - start < 5
