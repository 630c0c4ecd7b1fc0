"""Parts the tiny random-weight presets share: tokenizers built in code from in-memory
vocabularies, tiny text-encoder configs, a tiny image VAE.  Apart from `presets`, so that family
modules (`qwen`, `wan22`, `i2v`) use them without importing `presets`, which imports them."""

from __future__ import annotations

import os
import warnings


def clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = sorted(set(bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer(max_len: int):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789 .,!?\u2581"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_len)


def clip_config(tok):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                          vocab_size=len(tok), hidden_act="gelu", projection_dim=32)


def t5_config(tok, cls_name: str = "T5Config"):
    import transformers

    return getattr(transformers, cls_name)(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37,
                                           num_layers=2, num_heads=4, decoder_start_token_id=0)


def image_vae():
    """A 2-level AutoencoderKL (2x down), 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035)


def quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
