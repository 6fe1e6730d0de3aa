"""The toy world: column addition with worked steps, a character tokenizer and tiny Qwen2 models.

It exists so that every stage runs for real on a laptop in minutes: prompts are generated,
answers are checked exactly, the teacher is a real Qwen2 trained by ``train_toy_teacher``
(shipped under ``distill_llm/assets/toy-teacher``) and the student is a smaller, untrained
Qwen2 built on demand. Everything goes through the same loading code as hub models.

Build the shipped teacher again with ``python -m distill_llm.toy --out distill_llm/assets/toy-teacher``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import string
import time
from pathlib import Path
from typing import Any

from . import registry

TEACHER_ASSET = Path(__file__).parent / "assets" / "toy-teacher"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
THINK_TOKENS = ["<think>", "</think>"]  # added tokens, not special: they stay in decoded text
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]
VOCAB_SIZE = 128  # embedding rows; the tokenizer uses fewer (like Qwen's padded embeddings)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Model shapes: head_dim 64 because vLLM's CPU attention rejects 16 and 32.
TEACHER_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1)
STUDENT_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                     num_key_value_heads=1)
# The quickstart's student: the teacher's width on half its depth. The narrow STUDENT_SHAPE above learns
# the task only partly in the quickstart's time; the tests keep it because it is cheaper.
WIDE_STUDENT_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1)

MAX_OPERAND = 999
EVAL_FRACTION = 10  # one problem in ten is held out of training, by a hash of the operands


# ---------------------------------------------------------------- the task


def _is_eval(a: int, b: int) -> bool:
    return int(hashlib.sha1(f"{a}+{b}".encode()).hexdigest(), 16) % EVAL_FRACTION == 0


def problem(a: int, b: int) -> dict[str, str]:
    """Prompt, worked solution (right to left, with carries) and answer for ``a + b``."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    answer = str(a + b)
    return {
        "prompt": f"What is {a}+{b}?",
        "solution": "<think>" + "\n".join(steps) + "</think>" + answer,
        "answer": answer,
    }


def make_problems(split: str, n: int, seed: int | None = None) -> list[dict[str, str]]:
    """``n`` distinct problems of a split; 'eval' problems never appear in 'train'."""
    if split not in ("train", "eval"):
        raise ValueError(f"toy split must be 'train' or 'eval', not {split!r}")
    rng = random.Random(seed if seed is not None else (0 if split == "train" else 1))
    seen, out = set(), []
    limit = (MAX_OPERAND + 1) ** 2 // (1 if split == "train" else EVAL_FRACTION) // 2
    if n > limit:
        raise ValueError(f"toy:{split} has at most {limit} distinct problems, asked for {n}")
    while len(out) < n:
        a = rng.randint(0, 10 ** rng.randint(1, 3) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, 3) - 1)
        if (a, b) in seen or _is_eval(a, b) != (split == "eval"):
            continue
        seen.add((a, b))
        out.append(problem(a, b))
    return out


_LAST_INT = re.compile(r"-?\d+")


def final_answer(text: str) -> str | None:
    """The last integer after ``</think>`` (or in the whole text when there is no think block)."""
    tail = text.rsplit("</think>", 1)[-1]
    found = _LAST_INT.findall(tail)
    return found[-1] if found else None


def check_answer(completion: str, answer: str) -> bool:
    got = final_answer(completion)
    return got is not None and got.lstrip("0") == str(answer).strip().lstrip("0")


# ---------------------------------------------------------------- tokenizer and models


def _byte_level(char: str) -> str:
    """GPT-2/Qwen byte-level alphabet: printable bytes map to themselves, others to U+0100 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    b = char.encode()[0]
    if b in printable:
        return chr(b)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(b))


def build_tokenizer(out_dir: str | Path | None = None):
    """A Qwen2 tokenizer with one token per character: byte-level BPE without merges.

    It is a real ``Qwen2Tokenizer`` (the class AutoTokenizer picks for a qwen2 model), so the
    tokenizer built here, the one reloaded from disk and the one vLLM loads encode alike.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + THINK_TOKENS + [_byte_level(c) for c in CHARS])}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<unk>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=512)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def qwen2_config(shape: dict[str, int], tokenizer) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB_SIZE, max_position_embeddings=512, tie_word_embeddings=True, head_dim=64,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0, **shape,
    )


def build_model(shape: dict[str, int], out_dir: str | Path, seed: int = 0):
    """Save a randomly initialised tiny Qwen2 with the toy tokenizer; returns the model."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(shape, tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return model


def toy_student_path(seed: int = 0, shape: dict[str, int] | None = None, name: str = "toy-student-v1") -> Path:
    """An untrained toy student (``STUDENT_SHAPE`` unless ``shape``), built once per cache dir (it is
    random, so cheap to make)."""
    from .paths import cache_dir

    path = cache_dir() / f"{name}-seed{seed}"
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + f".tmp{time.time_ns()}")
        build_model(shape or STUDENT_SHAPE, tmp, seed=seed)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _student_config(shape: dict[str, int] = STUDENT_SHAPE):
    return qwen2_config(shape, build_tokenizer())


# The toy world is a plug-in (registry.py): these names exist once this module is imported, which the
# registry does through the package's ``distill_llm.plugins`` entry point.
registry.register_model("toy-teacher", lambda: str(TEACHER_ASSET))
registry.register_model("toy-student", lambda: str(toy_student_path()), _student_config)
registry.register_model("toy-student-wide",
                        lambda: str(toy_student_path(shape=WIDE_STUDENT_SHAPE, name="toy-student-wide-v1")),
                        lambda: _student_config(WIDE_STUDENT_SHAPE))
registry.register_checker("toy", check_answer)
registry.register_prompt_source("toy", lambda split, limit: make_problems(split, limit or 256))


# ---------------------------------------------------------------- the teacher's training


def _encode(tokenizer, item: dict[str, str]) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}],
                                           add_generation_prompt=True, tokenize=False)
    ids_prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids_done = tokenizer(item["solution"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return ids_prompt + ids_done, len(ids_prompt)


def train_toy_teacher(out_dir: str | Path, steps: int = 2500, batch_size: int = 64, lr: float = 3e-3,
                      seed: int = 0, log_every: int = 100) -> dict[str, float]:
    """Train the toy teacher on worked solutions (plain next-token loss on the answer part)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    out = Path(out_dir)
    model = build_model(TEACHER_SHAPE, out, seed=seed)
    tokenizer = build_tokenizer()
    data = [_encode(tokenizer, p) for p in make_problems("train", 50_000, seed=seed + 100)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    rng = random.Random(seed)
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        batch = rng.sample(data, batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        for row, (seq, n_prompt) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, n_prompt: len(seq)] = torch.tensor(seq[n_prompt:])
        logits = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id)).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    accuracy = greedy_accuracy(model, tokenizer, make_problems("eval", 200))
    (out / "toy_training.json").write_text(json.dumps(
        {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "final_loss": loss.item(),
         "eval_accuracy_greedy": accuracy, "seconds": round(time.time() - start, 1)}, indent=2))
    return {"loss": loss.item(), "accuracy": accuracy}


def greedy_accuracy(model, tokenizer, problems: list[dict[str, str]], max_new_tokens: int = 64) -> float:
    """Exact-match accuracy of greedy decoding with transformers (used to vet the toy teacher)."""
    import torch

    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                             add_generation_prompt=True, tokenize=False) for p in problems]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(check_answer(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the toy teacher that ships with distill-llm.")
    parser.add_argument("--out", default=str(TEACHER_ASSET))
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(train_toy_teacher(args.out, steps=args.steps, seed=args.seed))


if __name__ == "__main__":
    main()
