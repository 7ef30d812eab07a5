"""Tiny random Hugging Face dual encoders (CLIP, SigLIP) saved to a folder as a hub repo holds
one: model, image processor and a tokenizer that loads offline (a word-level vocabulary, no
downloads)."""

from pathlib import Path

WORDS = ["a", "red", "car", "cat", "on", "sofa", "dog", "beach", "photo", "of", "the"]
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
# eos must not be 2: CLIP's text model then takes the highest id as the end (its legacy rule)
SPECIAL = {PAD: 0, UNK: 1, BOS: 4, EOS: 5}
CONTEXT = 16


def vocabulary() -> dict[str, int]:
    vocab = dict(SPECIAL)
    free = (i for i in range(64) if i not in vocab.values())
    vocab.update((word, next(free)) for word in WORDS)
    return vocab


def make_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, model_max_length=CONTEXT)


TEXT = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": CONTEXT,
        "pad_token_id": SPECIAL[PAD], "bos_token_id": SPECIAL[BOS], "eos_token_id": SPECIAL[EOS]}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def save_tiny_clip(folder: Path, seed: int = 3):
    """Writes the repo folder; returns the model (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model


def save_tiny_siglip(folder: Path, seed: int = 4):
    """As save_tiny_clip, a SigLIP (no projection: its vision head's output is the
    embedding; a squashing image processor)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    # no projection: the text head must land in the vision width
    text = {**TEXT, "projection_size": VISION["hidden_size"]}
    config = transformers.SiglipConfig(text_config=text, vision_config=VISION)
    model = transformers.SiglipModel(config).eval()
    model.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model
