from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in command and command in (ROOT / "README.md").read_text()


def test_readme_main_command_runs_the_quickstart():
    text = (ROOT / "README.md").read_text()
    assert "distill-llm run configs/quickstart.yaml" in text
