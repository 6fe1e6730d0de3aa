"""Real tokenizers (tests/fixtures/tokenizers, see its README) unpacked into folders, and tiny random models
over them with the real families' embedding rows.

Families: ``qwen3`` and ``deepseek-v3`` as shipped; ``qwen2.5`` and ``r1-distill-qwen`` derived from the Qwen3
files (README.md of the fixtures says how).
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
QWEN25_TOKENS = 151665  # Qwen2.5's tokenizer: ids 0-151664; Qwen3 added four after them
# DeepSeek's R1-Distill-Qwen tokenizers: Qwen2.5's, with these ids renamed (True: special, False: text)
R1_DISTILL_REMAP = {151643: ("<｜end▁of▁sentence｜>", True), 151644: ("<｜User｜>", True),
                    151645: ("<｜Assistant｜>", True), 151646: ("<｜begin▁of▁sentence｜>", True),
                    151647: ("<|EOT|>", True), 151648: ("<think>", False), 151649: ("</think>", False)}
# Embedding rows of the real models (config.json vocab_size)
ROWS = {"qwen-7b": 152064, "qwen-1.5b": 151936, "deepseek-v3": 129280}


def _read(family: str) -> tuple[dict, dict]:
    with lzma.open(FIXTURES / family / "tokenizer.json.xz", "rt", encoding="utf-8") as f:
        tok = json.load(f)
    return tok, json.loads((FIXTURES / family / "tokenizer_config.json").read_text(encoding="utf-8"))


def _qwen25() -> tuple[dict, dict]:
    tok, conf = _read("qwen3")
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["id"] < QWEN25_TOKENS]
    conf["added_tokens_decoder"] = {k: v for k, v in conf["added_tokens_decoder"].items() if int(k) < QWEN25_TOKENS}
    return tok, conf


def _r1_distill_qwen() -> tuple[dict, dict]:
    tok, conf = _qwen25()
    for added in tok["added_tokens"]:
        if added["id"] in R1_DISTILL_REMAP:
            added["content"], added["special"] = R1_DISTILL_REMAP[added["id"]]
    for key, entry in conf["added_tokens_decoder"].items():
        if int(key) in R1_DISTILL_REMAP:
            entry["content"], entry["special"] = R1_DISTILL_REMAP[int(key)]
    template = _read("deepseek-v3")[1]["chat_template"]
    # R1's template opens the answer with <think>, as the R1-Distill models' templates do
    template = template.replace("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    # as DeepSeek ships it: tokenizer_class LlamaTokenizerFast over Qwen's byte-level tokenizer.json
    conf.update(bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                pad_token="<｜end▁of▁sentence｜>", chat_template=template, additional_special_tokens=[],
                tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=False, legacy=True)
    return tok, conf


BUILDERS = {"qwen3": lambda: _read("qwen3"), "deepseek-v3": lambda: _read("deepseek-v3"), "qwen2.5": _qwen25,
            "r1-distill-qwen": _r1_distill_qwen}


def tokenizer_dir(family: str, out: Path) -> Path:
    """A folder with the family's tokenizer.json and tokenizer_config.json (AutoTokenizer loads it)."""
    tok, conf = BUILDERS[family]()
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(conf, ensure_ascii=False), encoding="utf-8")
    return out


def model_dir(family: str, rows: int, out: Path, weights: bool = False, seed: int = 0) -> Path:
    """The family's tokenizer with a tiny Qwen2 model config of ``rows`` embedding rows (and random weights)."""
    from transformers import AutoTokenizer, Qwen2Config

    tokenizer_dir(family, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    conf = Qwen2Config(vocab_size=rows, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if not weights:
        conf.save_pretrained(str(out))
        return out
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(conf).save_pretrained(str(out))
    return out
