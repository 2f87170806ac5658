"""README documents every setting, and opens with the two commands that CI and people run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import StartCollector

from collector.config import env_name, settings_fields

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_with_its_environment_variable() -> None:
    for item in settings_fields():
        row = f"| `{item.name}` | `{env_name(item)}` |"
        assert row in README, f"README lacks the row for {item.name}"


def test_readme_opens_with_serve_and_test_commands() -> None:
    commands = re.findall(r"```sh\n(.+?)\n```", README, flags=re.DOTALL)
    assert commands[0].endswith("outbound-collector serve")
    assert commands[1] == "scripts/test"


def test_ci_runs_the_readmes_test_command() -> None:
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


async def test_the_readmes_rejected_event_gets_the_answer_it_shows(
    start_collector: StartCollector, tmp_path: Path
) -> None:
    """Envelope and per-event schema problems come back together, as the README shows."""
    section = README.split("Each rejected event says where every problem is", 1)[1]
    event, answer = re.findall(r"```json\n(.+?)\n```", section, flags=re.DOTALL)[:2]
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    wants_text = {"type": "object", "properties": {"total": {"type": "string"}}}
    (schemas / "renewMembership.json").write_text(json.dumps(wants_text))
    collector = await start_collector(schemas_dir=schemas)
    status, body, _ = await collector.post("/e", json.loads(event))
    assert status == 400
    assert body == json.loads(answer)
