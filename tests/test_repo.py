"""The project's promises about itself: CI runs exactly the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l.startswith("pip install")]
    assert len(ci) == 1, ".ci/run must hold exactly one install-and-test line"
    readme_commands = [l.strip() for l in (ROOT / "README.md").read_text().splitlines()]
    assert ci[0] in readme_commands, f"README.md does not show .ci/run's command: {ci[0]}"
