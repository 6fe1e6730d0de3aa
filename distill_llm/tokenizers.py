"""Tokenizer identity (fingerprint, vocabulary check) and the token ids of prompts and completions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary, added tokens and the chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    # transformers rebuilds both properties on every access: read each once (per token it was minutes at 129k)
    added_tokens = getattr(tokenizer, "added_tokens_encoder", {})
    special = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = sorted((t, t in special) for t, _ in vocab if t in added_tokens)
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
    if not _round_trips(tokenizer):
        # A class named in tokenizer_config.json may rebuild the pipeline tokenizer.json describes: transformers 5
        # loads DeepSeek's byte-level tokenizers (tokenizer_class LlamaTokenizerFast) with a Metaspace
        # pre-tokenizer that drops every space. tokenizer.json read as it is encodes as the model was trained.
        from transformers import PreTrainedTokenizerFast

        try:
            as_is = PreTrainedTokenizerFast.from_pretrained(path, revision=revision)
        except (OSError, ValueError):
            as_is = None
        if as_is is not None and _round_trips(as_is):
            tokenizer = as_is
    # transformers builds an empty tokenizer from a model folder without tokenizer files instead of failing;
    # it would encode every text to nothing and training would silently skip every row.
    if len(tokenizer.get_vocab()) < 2 or not tokenizer("a", add_special_tokens=False)["input_ids"]:
        from .config import ConfigError

        raise ConfigError(f"{path} has no usable tokenizer ({len(tokenizer.get_vocab())} token(s) loaded): copy "
                          "tokenizer.json (or vocab.json and merges.txt) and tokenizer_config.json from its base model")
    return tokenizer


ROUND_TRIP_PROBE = "Hello world, 12 + 30 = 42.\n"


def _round_trips(tokenizer) -> bool:
    """Whether a plain sentence decodes back to itself (spaces and newline included)."""
    try:
        ids = tokenizer(ROUND_TRIP_PROBE, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids, skip_special_tokens=True).strip() == ROUND_TRIP_PROBE.strip()
    except Exception:  # noqa: BLE001 - a tokenizer that cannot even encode this is judged by the caller's check
        return True


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer, text: str, finish_reason: str | None) -> list[int]:
    """Re-tokenise a completion for a student with another vocabulary; an EOS closes stopped samples."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if finish_reason == "stop" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


# ---------------------------------------------------------------- the teacher/student tokenizer router
#
# Token-level KD reads the teacher's stored token ids (completion targets and top-k) as the student's.
# The router decides once, from the two tokenizers and the two models' embedding rows, how they translate:
#   identical      the student reads the teacher's ids as they are;
#   padded_rows    same tokens, the student has fewer embedding rows (Qwen2.5 0.5B-3B: 151,936 rows under
#                  7B+'s 152,064): teacher ids at or beyond the student's rows are dropped from the top-k;
#   special_remap  same byte-level vocabulary, special tokens at other ids or with other names (DeepSeek's
#                  R1-Distill-Qwen tokenizers): an explicit teacher -> student id map for them;
#   different      another vocabulary: sequence-level KD on the re-tokenised text (train.alpha = 0) only.
# In every token-level case an id the student cannot read is dropped and counted, never gathered.

CASES = ("identical", "padded_rows", "special_remap", "different")
# The teacher's log-prob put on a top-k entry dropped by the route: exp() of it is exactly 0 in float32, and
# unlike -inf it keeps 0 * (log p - log q) finite in the divergences.
DROPPED_LOGPROB = -1.0e4


@dataclass
class TokenizerRoute:
    """How the teacher's token ids reach the student (one of ``CASES``); JSON-able through ``record()``."""

    case: str
    teacher: str
    student: str
    teacher_tokens: int
    student_tokens: int
    teacher_rows: int | None = None  # embedding rows (config.json vocab_size); None: not known here
    student_rows: int | None = None
    id_map: dict[int, int] = field(default_factory=dict)  # teacher id -> student id, for differing specials
    unmapped: list[int] = field(default_factory=list)  # teacher specials the student lacks (only in prompts)
    spare_row: int | None = None  # a student embedding row no student token uses (see ``lookup``)
    reprompt: bool = False  # prompts rendered again with the student's chat template
    detail: str = ""

    @property
    def token_level(self) -> bool:
        return self.case != "different"

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["id_map"] = {str(k): v for k, v in self.id_map.items()}
        return out

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "TokenizerRoute":
        known = {f.name for f in fields(cls)}  # a record may carry more (train adds what it counted)
        return cls(**{k: v for k, v in rec.items() if k in known and k != "id_map"},
                   id_map={int(k): v for k, v in rec.get("id_map", {}).items()})

    def describe(self) -> str:
        """One paragraph for the console, the run record and the model card."""
        rows = lambda r: f"{r:,} rows" if r else "rows unknown"  # noqa: E731
        head = (f"tokenizers: {self.case} (teacher {self.teacher}: {self.teacher_tokens:,} tokens, "
                f"{rows(self.teacher_rows)}; student {self.student}: {self.student_tokens:,} tokens, "
                f"{rows(self.student_rows)})")
        parts = [self.detail] if self.detail else []
        if self.id_map:
            parts.append("id map " + ", ".join(f"{t}->{s}" for t, s in sorted(self.id_map.items())))
        if self.unmapped:
            parts.append(f"teacher specials without a student token (rows carrying them are skipped): {self.unmapped}")
        if self.reprompt:
            parts.append("prompts rendered with the student's chat template")
        return head + (": " + "; ".join(parts) if parts else "")

    def lookup(self):
        """numpy teacher id -> student id (-1: dropped), or None when every id is read as it is.

        Ids at or beyond the student's rows, and teacher specials without a student counterpart, map to -1;
        ids beyond the table are dropped too.
        """
        import numpy as np

        if self.case == "different":
            return None
        size = max(self.teacher_rows or 0, self.teacher_tokens, self.student_rows or 0,
                   max(self.id_map, default=-1) + 1, max(self.unmapped, default=-1) + 1)
        lut = np.arange(size, dtype=np.int64)
        if self.student_rows:
            lut[self.student_rows:] = -1
        lut[list(self.unmapped)] = -1
        for t, s in self.id_map.items():
            lut[t] = s
        return lut


def _is_special(tokenizer, token_id: int) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return bool(added is not None and getattr(added, "special", True))


# Texts that exercise what splits text besides the vocabulary (merges, normalizer, pre-tokenizer): spaces,
# digits, punctuation, newlines, code, accents and other scripts; no added token (those are compared by id).
ENCODING_PROBES = (
    "Hello world, 12 + 30 = 42.\n", "  two  spaces\tand a tab\r\n\n", "def f(x):\n    return x**2  # done",
    "Ünïcödé café naïve 東京 Привет мир 🙂", "Let me add 123456789 and 987654321.\n\n\\boxed{42}",
    "I'm sure they'll've; it's 3.14159 -- «quoted» 'single' \"double\"",
)


def _encodes_alike(teacher, student) -> bool:
    """Whether both tokenizers split the probe texts into the same ids (their vocabularies being equal)."""
    return all(teacher(t, add_special_tokens=False)["input_ids"] == student(t, add_special_tokens=False)["input_ids"]
               for t in ENCODING_PROBES)


def _name(tokenizer, fallback: str) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or fallback)


def classify(teacher, student, teacher_rows: int | None = None, student_rows: int | None = None,
             teacher_name: str | None = None, student_name: str | None = None) -> TokenizerRoute:
    """The route for a (teacher, student) pair of loaded tokenizers and their models' embedding rows."""
    tv, sv = teacher.get_vocab(), student.get_vocab()
    s_by_id = {i: t for t, i in sv.items()}
    t_added = set(getattr(teacher, "added_tokens_decoder", {}))
    s_added = set(getattr(student, "added_tokens_decoder", {}))
    base = ({t: i for t, i in tv.items() if i not in t_added}, {t: i for t, i in sv.items() if i not in s_added})
    route = TokenizerRoute("identical", teacher_name or _name(teacher, "teacher"),
                           student_name or _name(student, "student"), len(tv), len(sv), teacher_rows, student_rows)
    if student_rows and student_rows > len(sv) and max(sv.values(), default=0) < student_rows - 1:
        route.spare_row = student_rows - 1
    if base[0] != base[1] or not _encodes_alike(teacher, student):
        route.case = "different"
        route.detail = (first_vocab_mismatch(teacher, student) if base[0] != base[1] else None) or \
            "the two vocabularies agree but the tokenizers split text differently (merges or pre-tokenizers)"
        return route
    text_only = []  # teacher tokens that are part of the text it writes (not special) and the student lacks
    for tid in sorted(t_added):
        content = teacher.convert_ids_to_tokens(tid)
        if s_by_id.get(tid) == content:
            continue
        sid = sv.get(content)
        if sid is None and tid == teacher.eos_token_id:  # the EOS by role: <｜end▁of▁sentence｜> -> <|im_end|>
            sid = student.eos_token_id
        if sid is not None:
            route.id_map[tid] = sid
        elif _is_special(teacher, tid):
            route.unmapped.append(tid)
        else:
            text_only.append(f"{content!r} (id {tid})")
    if teacher.eos_token_id is not None and student.eos_token_id is not None and \
            teacher.eos_token_id != student.eos_token_id and teacher.eos_token_id not in route.id_map:
        route.id_map[teacher.eos_token_id] = student.eos_token_id  # same vocabulary, another EOS
    if text_only:
        route.case = "different"
        route.detail = (f"the teacher writes {', '.join(text_only)}, which the student's tokenizer does not have "
                        "as a token")
        return route
    templates_differ = getattr(teacher, "chat_template", None) != getattr(student, "chat_template", None)
    if route.id_map or route.unmapped:
        route.case, route.reprompt = "special_remap", True
        route.detail = "same byte-level vocabulary, special tokens differ"
    elif teacher_rows and student_rows and teacher_rows > student_rows:
        route.case = "padded_rows"
        route.detail = (f"teacher ids {student_rows:,}-{teacher_rows - 1:,} (embedding padding) are dropped from "
                        "the top-k and counted")
    route.reprompt = route.reprompt or templates_differ
    if templates_differ and route.case != "special_remap":
        route.detail = "; ".join(filter(None, [route.detail, "chat templates differ"]))
    return route


def refusal(route: TokenizerRoute, alpha: float) -> str | None:
    """The sentence refusing token-level KD (train.alpha > 0) across different tokenizers, else None."""
    if route.token_level or alpha <= 0:
        return None
    size = lambda n: f", {n:,} tokens" if n else ""  # noqa: E731 - unknown (0) for a family-table refusal
    return (f"train.alpha={alpha} asks for token-level KD, but the teacher's tokenizer ({route.teacher}"
            f"{size(route.teacher_tokens)}) and the student's ({route.student}{size(route.student_tokens)}) "
            f"are different tokenizers: {route.detail}. Ways forward: train.alpha=0 (sequence-level KD on the "
            "teacher's text, re-tokenised for the student), a student that shares the teacher's tokenizer, or "
            "token-level KD across tokenizers (Universal Logit Distillation), which distill-llm does not build yet")


def model_rows(path: str, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """Embedding rows (config.json vocab_size) of a model folder or hub id; None when its config cannot be read."""
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(getattr(conf, "text_config", conf), "vocab_size", None)


def route_models(teacher: dict[str, Any], student: dict[str, Any]) -> TokenizerRoute:
    """Load both tokenizers and model configs and classify them. Each side: name, path, tokenizer (path or
    None for the model's own), revision, trust_remote_code. Raises what loading raises."""
    toks, rows = [], []
    for side in (teacher, student):
        toks.append(load_tokenizer(side.get("tokenizer") or side["path"], side.get("revision"),
                                   side.get("trust_remote_code", False)))
        rows.append(model_rows(side["path"], side.get("revision"), side.get("trust_remote_code", False)))
    return classify(toks[0], toks[1], rows[0], rows[1], teacher["name"], student["name"])


def pair_route(cfg) -> tuple[TokenizerRoute | None, str | None]:
    """(route of ``cfg``'s teacher and student, None) or (None, why they could not be loaded here)."""
    from .paths import resolve_model

    t, s = cfg.teacher, cfg.student
    try:
        return route_models(
            {"name": t.model, "path": resolve_model(t.model), "tokenizer": t.tokenizer, "revision": t.revision,
             "trust_remote_code": t.trust_remote_code},
            {"name": s.model, "path": resolve_model(s.model), "revision": s.revision,
             "trust_remote_code": s.trust_remote_code}), None
    except Exception as err:  # noqa: BLE001 - any loading failure: unchecked here, said so, checked at train
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# Tokenizer families of well-known hub models, for `plan` when the hub cannot be reached (like its table of
# model shapes): name prefix -> family. qwen2.5: 151,665 tokens; qwen-think: the same plus <tool_response>,
# </tool_response>, <think>, </think> at 151665-151668; r1-distill-qwen: qwen2.5's with 151643-151649 renamed
# (<think>/</think> at 151648/151649); deepseek-v3: another vocabulary (128,815 tokens).
KNOWN_FAMILIES = {
    "Qwen/Qwen2.5-": "qwen2.5", "Qwen/QwQ-32B": "qwen-think", "Qwen/Qwen3-": "qwen-think",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-": "r1-distill-qwen", "deepseek-ai/DeepSeek-R1": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3": "deepseek-v3",
}
THINK_WRITERS = {"qwen-think": "'</think>' (id 151668)", "r1-distill-qwen": "'</think>' (id 151649)"}


def known_family(name: str) -> str | None:
    """The family of a well-known hub model (longest matching prefix), or None."""
    hits = [p for p in KNOWN_FAMILIES if name.startswith(p)]
    return KNOWN_FAMILIES[max(hits, key=len)] if hits else None


def family_refusal(teacher: str, student: str, alpha: float) -> str | None:
    """``refusal`` for two well-known hub models from their families alone (no files), else None."""
    tf, sf = known_family(teacher), known_family(student)
    if alpha <= 0 or tf is None or sf is None or tf == sf:
        return None
    if "deepseek-v3" in (tf, sf):
        detail = "DeepSeek-V3's 128,815-token vocabulary is not Qwen's"
    elif sf == "qwen2.5" and tf in THINK_WRITERS:
        detail = f"the teacher writes {THINK_WRITERS[tf]}, which the student's tokenizer does not have as a token"
    else:
        return None
    route = TokenizerRoute("different", teacher, student, 0, 0, detail=detail)
    return refusal(route, alpha)


def is_hub_id(name: str) -> bool:
    """A model name the hub would be asked for: not a built-in, a local folder or a URL."""
    import os

    from . import registry

    return registry.model(name) is None and not os.path.isdir(os.path.expanduser(name)) and "://" not in name


def check_pair(cfg, where: str, hub_offline=None) -> TokenizerRoute | None:
    """The route of ``cfg``'s teacher and student, refused (ConfigError) when train.alpha > 0 cannot work.

    ``where`` names the command in messages. Returns None, with a printed warning, when a tokenizer cannot
    be loaded here (a hub model without network: ``hub_offline()`` says why, before slow retries):
    ``train`` checks again against the shards.
    """
    from .config import ConfigError

    hub = [m for m in (cfg.teacher.tokenizer or cfg.teacher.model, cfg.student.model) if is_hub_id(m)]
    offline = hub_offline() if hub and hub_offline is not None else None
    route, unloaded = (None, offline) if offline else pair_route(cfg)
    if route is None:
        print(f"{where}: warning: teacher/student tokenizers not checked ({unloaded}); train checks them against "
              "the shards", flush=True)
        return None
    why = refusal(route, cfg.train.alpha)
    if why:
        raise ConfigError(why)
    print(f"{where}: {route.describe()}", flush=True)
    return route
