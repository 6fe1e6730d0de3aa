from distill_llm import toy
from distill_llm.evaluation.checkers import check, get_checker


def test_problem_solution_is_right():
    p = toy.problem(347, 285)
    assert p["answer"] == "632" and p["prompt"] == "What is 347+285?"
    assert p["solution"] == "<think>7+5+0=12\n4+8+1=13\n3+2+1=6</think>632"
    assert toy.check_answer(p["solution"], p["answer"])


def test_splits_are_disjoint_and_deterministic():
    train = toy.make_problems("train", 500)
    evals = toy.make_problems("eval", 200)
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in evals})
    assert toy.make_problems("eval", 200) == evals
    assert len({p["prompt"] for p in train}) == 500


def test_checker_reads_the_final_answer():
    assert toy.check_answer("<think>9+9+0=18</think>18", "18")
    assert not toy.check_answer("<think>1+1+0=2</think>3", "2")
    assert not toy.check_answer("<think>8+1+0=9</think>", "9"), "an answer only inside the think block does not count"
    assert toy.check_answer("the answer is 0042", "42")
    assert toy.final_answer("no digits") is None


def test_checker_registry():
    assert check(get_checker("toy"), "</think>5", "5") is True
    assert check(get_checker("exact"), "<think>x</think> 5 ", "5") is True
    assert check(get_checker("math"), "</think>The answer is $\\frac{1}{2}$", "0.5") is True
    assert check(get_checker("math"), "</think>$3$", "4") is False
    assert check(get_checker("toy"), "anything", None) is None
    assert get_checker("none") is None


def test_unknown_checker_is_a_config_error():
    import pytest

    from distill_llm.config import ConfigError

    with pytest.raises(ConfigError, match="unknown checker"):
        get_checker("regex")


def test_tokenizer_round_trips_through_disk(tmp_path):
    from transformers import AutoTokenizer

    built = toy.build_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = built.apply_chat_template([{"role": "user", "content": "What is 12+9?"}], add_generation_prompt=True,
                                     tokenize=False) + "<think>2+9+0=11\n1+0+1=2</think>21<|im_end|>"
    ids = built(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert ids.count(built.convert_tokens_to_ids("<think>")) == 1, "<think> is one token, not seven characters"
    assert loaded.decode(ids, skip_special_tokens=True).endswith("<think>2+9+0=11\n1+0+1=2</think>21")
    assert loaded.eos_token == "<|im_end|>"


def test_shipped_teacher_matches_the_tokenizer_builder():
    from transformers import AutoTokenizer

    from distill_llm.tokenizers import tokenizer_fingerprint

    shipped = AutoTokenizer.from_pretrained(toy.TEACHER_ASSET)
    assert tokenizer_fingerprint(shipped) == tokenizer_fingerprint(toy.build_tokenizer())


def test_toy_student_is_smaller_and_shares_the_vocabulary():
    import json

    from distill_llm.paths import resolve_model

    teacher = json.loads((toy.TEACHER_ASSET / "config.json").read_text())
    student_dir = resolve_model("toy-student")
    student = json.loads(open(f"{student_dir}/config.json").read())
    assert student["vocab_size"] == teacher["vocab_size"]
    assert student["hidden_size"] < teacher["hidden_size"] and student["num_hidden_layers"] < teacher["num_hidden_layers"]
    assert teacher["head_dim"] == student["head_dim"] == 64, "vLLM's CPU attention needs head_dim 64"


def test_quickstart_student_is_wide_and_shallower_than_the_teacher():
    """The quickstart's student (toy-student-wide) has the teacher's width on half its depth, its own cache
    folder (not the narrow toy-student's), and the config the planner reads matches the built folder."""
    import json

    from distill_llm import registry
    from distill_llm.paths import resolve_model

    teacher = json.loads((toy.TEACHER_ASSET / "config.json").read_text())
    wide_dir, narrow_dir = resolve_model("toy-student-wide"), resolve_model("toy-student")
    assert wide_dir != narrow_dir
    wide = json.loads(open(f"{wide_dir}/config.json").read())
    assert wide["hidden_size"] == teacher["hidden_size"]
    assert 2 * wide["num_hidden_layers"] == teacher["num_hidden_layers"]
    assert wide["vocab_size"] == teacher["vocab_size"] and wide["head_dim"] == 64
    planned = registry.MODELS["toy-student-wide"].config()
    assert (planned.hidden_size, planned.num_hidden_layers) == (wide["hidden_size"], wide["num_hidden_layers"])
