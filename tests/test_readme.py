from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in command and command in (ROOT / "README.md").read_text()


def test_readme_main_command_runs_the_quickstart():
    text = (ROOT / "README.md").read_text()
    assert "distill-llm run configs/quickstart.yaml" in text


def catalogue_rows(text: str) -> list[tuple[str, list[str]]]:
    """(input, [test ids]) for each row of the README's bad-input table."""
    import re

    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    return [(row.split("|")[1].strip(), re.findall(r"`(tests/[\w/]+\.py::\w+)`", row.split("|")[-2]))
            for row in rows]


def defined_tests(path: Path) -> set[str]:
    import ast

    return {n.name for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}


def test_every_bad_input_in_the_catalogue_names_an_existing_test():
    rows = catalogue_rows((ROOT / "README.md").read_text())
    assert len(rows) >= 20
    for name, tests in rows:
        assert tests, f"bad-input row {name!r} names no test"
        for test in tests:
            file, func = test.split("::")
            assert func in defined_tests(ROOT / file), f"bad-input row {name!r}: {test} does not exist"


def test_catalogue_check_can_fail():
    rows = catalogue_rows("## Bad input\n| input | sees | test |\n|---|---|---|\n| x | y | `tests/test_readme.py::test_nope` |\n")
    assert rows == [("x", ["tests/test_readme.py::test_nope"])]
    assert "test_nope" not in defined_tests(ROOT / "tests" / "test_readme.py")
