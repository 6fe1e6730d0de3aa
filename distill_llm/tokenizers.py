"""Tokenizer identity (fingerprint, vocabulary check) and the token ids of prompts and completions."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary, added tokens and the chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    added = sorted((t, bool(getattr(tokenizer, "all_special_tokens", None) and t in tokenizer.all_special_tokens))
                   for t in tokenizer.get_vocab() if t in getattr(tokenizer, "added_tokens_encoder", {}))
    blob = json.dumps({"vocab": vocab, "added": added, "eos": tokenizer.eos_token,
                       "template": getattr(tokenizer, "chat_template", None)}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def first_vocab_mismatch(teacher, student) -> str | None:
    """None when both tokenizers map every token to the same id, else a sentence naming the first difference."""
    tv, sv = teacher.get_vocab(), student.get_vocab()
    for token, tid in sorted(tv.items(), key=lambda kv: kv[1]):
        sid = sv.get(token)
        if sid != tid:
            return f"token {token!r} is id {tid} for the teacher but {sid} for the student"
    for token, sid in sorted(sv.items(), key=lambda kv: kv[1]):
        if token not in tv:
            return f"token {token!r} (id {sid}) exists only in the student's vocabulary"
    for name in ("eos_token", "pad_token", "bos_token"):
        if getattr(teacher, name, None) != getattr(student, name, None):
            return f"{name} differs: teacher {getattr(teacher, name)!r}, student {getattr(student, name)!r}"
    return None


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    # transformers builds an empty tokenizer from a model folder without tokenizer files instead of failing;
    # it would encode every text to nothing and training would silently skip every row.
    if len(tokenizer.get_vocab()) < 2 or not tokenizer("a", add_special_tokens=False)["input_ids"]:
        from .config import ConfigError

        raise ConfigError(f"{path} has no usable tokenizer ({len(tokenizer.get_vocab())} token(s) loaded): copy "
                          "tokenizer.json (or vocab.json and merges.txt) and tokenizer_config.json from its base model")
    return tokenizer


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer, text: str, finish_reason: str | None) -> list[int]:
    """Re-tokenise a completion for a student with another vocabulary; an EOS closes stopped samples."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if finish_reason == "stop" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
