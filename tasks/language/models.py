"""Language models for the benchmark: llama2.c's tiny stories260K (offline) and Hugging Face hub models.

stories260K is a real pretrained 260K-parameter Llama shipped in llama2.c's own binary formats. We convert both the
checkpoint and the tokenizer into ordinary transformers objects, so every downstream piece (PEFT, EVA init,
generation, evaluation) runs on exactly the code path a hub model would take -- only much smaller.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from eva_bench.assets import asset, local_folder, require_hub

# llama2.c hard-codes these; they are not stored in its files.
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
N_BYTE_TOKENS = 256  # ids 3..258 are <0x00>..<0xFF>
SPIECE_SPACE = "\u2581"  # sentencepiece's visible space "▁"

STORIES260K_HINT = (
    "stories260K ships in the offline data root (models/stories260K/, see SOURCES.md); upstream it is "
    "karpathy/tinyllamas' stories260K/{stories260K.bin,tok512.bin}."
)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Hydra passes dtypes as strings ("float32", "bfloat16"); accept both forms."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return value


# --------------------------------------------------------------------------------------------------------- tokenizer


def read_llama2c_tokenizer(path: str | Path) -> tuple[list[str], list[float]]:
    """Raw (token strings, scores) of a llama2.c tokenizer file, in id order.

    Layout: int32 max_token_length, then per token float32 score, int32 byte length, the bytes. llama2.c's exporter
    already turned sentencepiece's "▁" into a plain space and wrapped bos/eos as "\\n<s>\\n" / "\\n</s>\\n".
    """
    data = Path(path).read_bytes()
    offset = 4  # skip max_token_length: only llama2.c's C buffers need it
    tokens, scores = [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        tokens.append(data[offset : offset + length].decode("utf-8"))
        scores.append(score)
        offset += length
    return tokens, scores


def load_llama2c_tokenizer(path: str | Path):
    """A Hugging Face fast tokenizer that encodes exactly like llama2.c's ``encode`` for ``path`` (e.g. tok512.bin).

    llama2.c encodes by (1) prepending a space (sentencepiece's dummy prefix), (2) splitting into UTF-8 characters,
    each either a vocabulary token or its bytes as <0xXX> tokens, and (3) repeatedly merging the adjacent pair whose
    concatenation is the highest-scoring vocabulary token. A `tokenizers` BPE model does (3) when its merge list is
    ranked by the score of the merged token, and does (2) with ``byte_fallback``.

    Special tokens: 0 ``<unk>``, 1 ``<s>`` (bos, added in front of every encoding), 2 ``</s>`` (eos).
    The pad token is ``<unk>``: byte fallback means it never occurs in real text, so padding can never be mistaken
    for a real token, whereas eos must stay a learnable target when fine-tuning. Padding side stays the default
    (right); generation code switches to left padding itself.

    Known, deliberate differences from llama2.c, all on text the benchmark never contains: a literal "<s>", "</s>"
    or "<unk>" in the text becomes the special token, and a literal "▁" reads as a space.
    """
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    raw_tokens, scores = read_llama2c_tokenizer(path)
    # Back to sentencepiece's spelling, which is what HF Llama tokenizers (and their decoders) expect.
    tokens = [t.replace(" ", SPIECE_SPACE) for t in raw_tokens]
    tokens[UNK_ID], tokens[BOS_ID], tokens[EOS_ID] = "<unk>", "<s>", "</s>"
    expected_bytes = [f"<0x{b:02X}>" for b in range(N_BYTE_TOKENS)]
    if tokens[3 : 3 + N_BYTE_TOKENS] != expected_bytes:
        raise ValueError(f"{path}: ids 3..258 are not the 256 byte tokens; not a llama2.c sentencepiece tokenizer")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: duplicate token strings")

    # Merge list: every way to write a (non-special, non-byte) token as the concatenation of two vocabulary tokens,
    # ranked by that token's score, best first -- llama2.c's "merge the highest-scoring pair" rule as BPE ranks.
    # Within one token the splits are ordered left to right; llama2.c would break such rare ties by position instead.
    first_regular = 3 + N_BYTE_TOKENS
    merges = []
    for i in sorted(range(first_regular, len(tokens)), key=lambda i: (-scores[i], i)):
        token = tokens[i]
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if vocab.get(left, -1) >= first_regular and vocab.get(right, -1) >= first_regular:
                merges.append((left, right))

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Sentencepiece whitespace: a dummy-prefix space (Prepend skips empty text, as llama2.c does), spaces as "▁".
    # No pre-tokenizer: like llama2.c, merges may cross word boundaries only where the vocabulary allows it.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)]
    )
    # Undo it: "▁" -> " ", <0xXX> runs -> UTF-8 text, join, drop the dummy-prefix space.
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # add_bos_token=True makes transformers install a TemplateProcessing post-processor "<s> $A" and keeps the
    # flag truthful, so callers can switch it off with `tokenizer.add_bos_token = False`.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,  # would rewrite " ." to "." and break decode(encode(s)) == s
        model_max_length=int(1e30),
    )


# --------------------------------------------------------------------------------------------------------- checkpoint


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair rotary (Meta, llama2.c) to HF's rotate-half layout.

    Meta rotates dimension pairs (0,1), (2,3), ... of each head; HF rotates (i, i + head_dim/2). Moving each head's
    even rows to its first half and odd rows to its second half makes both compute the same attention scores.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def load_llama2c(checkpoint: str | Path, architecture: str = "llama", dtype: str | torch.dtype = torch.float32):
    """A llama2.c checkpoint (legacy version-0 format) as an eval-mode ``LlamaForCausalLM`` or ``MistralForCausalLM``.

    Mistral is the same network as Llama when its sliding window is off; loading both lets the suite exercise two
    model classes (different module names in PEFT target lists) from one tiny offline checkpoint.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    data = Path(checkpoint).read_bytes()
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack_from("<7i", data, 0)
    shared_classifier = vocab_size > 0  # llama2.c's convention: negative vocab_size = separate classifier weights
    vocab_size = abs(vocab_size)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim

    weights = np.frombuffer(data, dtype="<f4", offset=7 * 4)
    cursor = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal cursor
        n = int(np.prod(shape))
        if cursor + n > weights.size:
            raise ValueError(f"{checkpoint}: truncated llama2.c checkpoint")
        out = torch.from_numpy(weights[cursor : cursor + n].copy()).view(*shape)
        cursor += n
        return out

    embed = take(vocab_size, dim)
    attn_norm = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1 = take(n_layers, hidden_dim, dim)
    w2 = take(n_layers, dim, hidden_dim)
    w3 = take(n_layers, hidden_dim, dim)
    final_norm = take(dim)
    take(seq_len, head_dim // 2)  # freq_cis_real: recomputed by the model
    take(seq_len, head_dim // 2)  # freq_cis_imag
    classifier = embed if shared_classifier else take(vocab_size, dim)
    if cursor != weights.size:
        raise ValueError(f"{checkpoint}: {weights.size - cursor} unread floats; header and file disagree")

    common = dict(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=shared_classifier,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=UNK_ID,  # matches the tokenizer's pad token
    )
    if architecture == "llama":
        config, model_cls = LlamaConfig(**common, attention_bias=False, mlp_bias=False), LlamaForCausalLM
    elif architecture == "mistral":
        config, model_cls = MistralConfig(**common, sliding_window=None), MistralForCausalLM
    else:
        raise ValueError(f"architecture must be 'llama' or 'mistral', got {architecture!r}")

    state = {"model.embed_tokens.weight": embed, "model.norm.weight": final_norm, "lm_head.weight": classifier}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": attn_norm[i],
            p + "self_attn.q_proj.weight": _unpermute_rotary(wq[i], n_heads),
            p + "self_attn.k_proj.weight": _unpermute_rotary(wk[i], n_kv_heads),  # k has n_kv_heads heads (GQA)
            p + "self_attn.v_proj.weight": wv[i],
            p + "self_attn.o_proj.weight": wo[i],
            p + "post_attention_layernorm.weight": ffn_norm[i],
            p + "mlp.gate_proj.weight": w1[i],  # llama2.c: w2(silu(w1 x) * w3 x)
            p + "mlp.up_proj.weight": w3[i],
            p + "mlp.down_proj.weight": w2[i],
        }

    model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight is the embedding itself, so it may be reported either way; nothing else.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"llama2.c conversion mismatch: missing {missing}, unexpected {unexpected}")
    if shared_classifier:
        model.tie_weights()
    return model.to(_torch_dtype(dtype)).eval()


# --------------------------------------------------------------------------------------------------------- Hydra targets


def stories260k(
    checkpoint: str = "models/stories260K/stories260K.bin",
    tokenizer: str = "models/stories260K/tok512.bin",
    architecture: str = "llama",
    dtype: str = "float32",
):
    """(model, tokenizer) for llama2.c's stories260K, from the offline data root. Hydra target."""
    checkpoint_path = asset(checkpoint, STORIES260K_HINT)
    tokenizer_path = asset(tokenizer, STORIES260K_HINT)
    return load_llama2c(checkpoint_path, architecture, dtype), load_llama2c_tokenizer(tokenizer_path)


def from_hub(name: str, revision: str | None = None, dtype: str = "bfloat16", attn_implementation: str = "sdpa"):
    """(model, tokenizer) for a Hugging Face hub id at a pinned revision, or a local folder (``save_pretrained``'s
    output: model and tokenizer). Hydra target.

    For a hub id ``require_hub`` runs first, so that an offline machine gets one clear error instead of a failure
    (or a long retry loop) deep inside transformers; a folder loads offline.
    """
    folder = local_folder(name)
    if folder is not None:
        name, revision = str(folder), None  # a folder has no revisions; ~ expanded for transformers
    else:
        require_hub(name, revision)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        name, revision=revision, dtype=_torch_dtype(dtype), attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    if tokenizer.pad_token is None:
        # Llama-style hub tokenizers ship without one; batching needs some id, and the attention mask hides it.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The prompt followed by the model's greedy (temperature 0) continuation, decoded as text.

    The prompt is included, as llama2.c's ``run`` prints it, so the result reads as one story.
    """
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(
        **inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)
