"""The docs that are generated from code are current."""

from pathlib import Path

from rectflow.params import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_params_reference_is_current():
    assert (ROOT / "docs" / "params.md").read_text() == reference_markdown(), (
        "regenerate: python -c \"from rectflow.params import reference_markdown as r; "
        "open('docs/params.md', 'w').write(r())\"")


def test_contract_names_every_stage_and_command():
    from rectflow.stages import STAGES

    text = (ROOT / "docs" / "contract.md").read_text()
    for name in (*STAGES, "rectflow dvc-yaml", "rectflow params", "params.resolved.yaml", "profile"):
        assert name in text, name
