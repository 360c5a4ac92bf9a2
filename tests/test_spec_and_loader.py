"""The public entry points `loads`/`load`, the YAML dialect the loader reads, diagnostics and the schema."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

import lossgraph
import lossgraph.spec.models
import lossgraph.spec.nodes
from lossgraph import ConfigError, Diagnostic, LossGraphError, LossGraphSpec, LossGraphWarning, SourceFileError
from lossgraph.kinds import loss_kinds, source_kinds
from lossgraph.spec.models import json_schema

ROOT = Path(__file__).resolve().parents[1]

DISTILL = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels, weight: 0.5}
  distill: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}
"""

INVALID = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
losses:
  distill: {type: forward_kl, heads: [nxt], target: teacher}
"""


def dump(diagnostics: list[Diagnostic]) -> str:
    return "\n".join(d.format() for d in diagnostics) or "(no diagnostics)"


# --------------------------------------------------------------------------------------------------
# loads / load
# --------------------------------------------------------------------------------------------------


def test_loads_returns_a_spec():
    spec = lossgraph.loads(DISTILL)
    assert isinstance(spec, LossGraphSpec)
    assert list(spec.heads) == ["next"]
    assert spec.losses["distill"].temperature == 2.0
    assert spec.losses["distill"].target == "teacher"
    assert spec.sources["labels"].ignore_index == -100  # defaults are filled in
    assert spec.source_map.file is None


def test_loads_records_where_each_node_was_written():
    spec = lossgraph.loads(DISTILL, "distill.yaml")
    assert spec.source_map.file == "distill.yaml"
    assert spec.source_map.locate(("losses", "distill", "target")) == (10, 54)
    assert spec.source_map.locate(("losses", "distill"), key=True) == (10, 3)


def test_load_reads_a_file(tmp_path: Path):
    path = tmp_path / "graph.yaml"
    path.write_text(DISTILL, encoding="utf-8")
    for argument in (path, str(path)):
        spec = lossgraph.load(argument)
        assert isinstance(spec, LossGraphSpec)
        assert spec.source_map.file == str(path)


def test_loads_raises_config_error_with_every_diagnostic():
    with pytest.raises(ConfigError) as info:
        lossgraph.loads(INVALID, "bad.yaml")
    error = info.value
    assert isinstance(error, LossGraphError)
    assert [(d.line, d.path) for d in error.diagnostics] == [
        (6, "losses.distill.heads[0]"),
        (6, "losses.distill.target"),
    ], dump(error.diagnostics)
    assert all(d.severity == "error" and d.file == "bad.yaml" for d in error.diagnostics)
    message = str(error)
    assert message.splitlines()[0] == "invalid loss graph (2 errors)"
    assert "bad.yaml:6:39: losses.distill.heads[0]: unknown head 'nxt'; did you mean 'next'?" in message


def test_load_raises_config_error_naming_the_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(INVALID, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        lossgraph.load(path)
    assert {d.file for d in info.value.diagnostics} == {str(path)}


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda tmp: tmp / "missing.yaml", "no such file"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: (tmp / "latin1.yaml", (tmp / "latin1.yaml").write_bytes(b"version: 1 # caf\xe9\n"))[0], "UTF-8"),
    ],
    ids=["missing", "directory", "not-utf8"],
)
def test_load_unreadable_file_raises_source_file_error(tmp_path: Path, make, phrase: str):
    path = make(tmp_path)
    with pytest.raises(SourceFileError, match=phrase) as info:
        lossgraph.load(path)
    assert isinstance(info.value, LossGraphError)
    assert str(path) in str(info.value)


def test_loads_warns_and_still_returns_the_spec():
    text = DISTILL + "  unused_extra: {type: z_loss, heads: [next]}\n"
    text = text.replace("  teacher: {type: teacher}\n", "  teacher: {type: teacher}\n  spare: {type: teacher}\n")
    with pytest.warns(LossGraphWarning) as record:
        spec = lossgraph.loads(text, "w.yaml")
    assert isinstance(spec, LossGraphSpec)
    messages = [str(w.message) for w in record]
    assert messages == ["w.yaml:8:3: warning: sources.spare: source 'spare' is not used by any loss"]
    assert record[0].filename == __file__, "the warning should point at the caller of loads"


MASKING_LABELS = """
version: 1
vocab_size: 8
heads: {next: {}}
sources:
  labels: {type: labels, ignore_index: -1}
  teacher: {type: teacher}
losses:
  jsd: {type: jsd, heads: [next], target: teacher}
"""


def test_a_labels_source_that_only_masks_is_used():
    """JSD against a teacher with an ignore index reads the labels only to mask positions: no warning
    (a teacher no loss reads is still reported)."""
    report = lossgraph.check_text(MASKING_LABELS, "m.yaml")
    assert report.ok and not report.warnings, report.warnings
    spare = MASKING_LABELS.replace(
        "  teacher: {type: teacher}\n", "  teacher: {type: teacher}\n  spare: {type: teacher}\n"
    )
    messages = [w.message for w in lossgraph.check_text(spare, "m.yaml").warnings]
    assert messages == ["source 'spare' is not used by any loss"]


def test_check_text_never_raises():
    report = lossgraph.check_text("version: [", "x.yaml")
    assert not report.ok and report.spec is None
    assert report.errors[0].message.startswith("YAML syntax error")


# --------------------------------------------------------------------------------------------------
# The YAML dialect
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "value"),
    [("1e-4", 1e-4), ("1.0e-4", 1e-4), ("5E-1", 0.5), ("+2e+0", 2.0), (".5e1", 5.0), ("3", 3.0), ("0.25", 0.25)],
)
def test_yaml_1_2_floats_are_numbers(written: str, value: float):
    text = f"""\
version: 1
vocab_size: 32000
heads:
  next: {{offset: 1}}
losses:
  z: {{type: z_loss, heads: [next], weight: {written}}}
"""
    spec = lossgraph.loads(text)
    assert spec.losses["z"].weight == pytest.approx(value)
    assert isinstance(spec.losses["z"].weight, float)


def test_exponent_is_not_an_integer():
    report = lossgraph.check_text(
        "version: 1\nvocab_size: 3e4\nheads: {n: {}}\nlosses: {z: {type: z_loss, heads: [n]}}\n"
    )
    assert [(d.path, d.message) for d in report.errors] == [("vocab_size", "expected an integer, got float 30000.0")], (
        dump(report.diagnostics)
    )


def test_merge_keys_and_anchors():
    text = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
  mtp2: {offset: 2}
sources:
  labels: {type: labels}
losses:
  lm: &lm
    type: cross_entropy
    heads: [next]
    target: labels
    weight: 0.5
  lm_mtp:
    <<: *lm
    heads: [mtp2]
    weight: 0.25
"""
    spec = lossgraph.loads(text)
    assert spec.losses["lm_mtp"].type == "cross_entropy"
    assert spec.losses["lm_mtp"].target == "labels"
    assert spec.losses["lm_mtp"].heads == ["mtp2"]
    assert spec.losses["lm_mtp"].weight == 0.25
    assert spec.losses["lm"].heads == ["next"]


@pytest.mark.parametrize("written", ["2024-01-01", "2001-12-14t21:59:43.10-05:00", "2024-13-45", "="])
def test_dates_and_lone_equals_signs_are_text(written: str):
    # YAML 1.1 reads these as a date (which fails for month 13) or a "value" key; a loss graph means text.
    spec = lossgraph.loads(
        f"version: 1\ndescription: {written}\nvocab_size: 8\nheads: {{n: {{}}}}\n"
        "losses: {z: {type: z_loss, heads: [n]}}\n"
    )
    assert spec.description == written


def test_merge_keys_and_anchors_are_bounded():
    # Anchors work, but what aliases add is counted while the document is composed (see
    # test_hostile_documents.py): a merge bomb is refused at the alias that crosses the limit.
    lines = ["version: 1", "base: &m0 {a: 1, b: 2, c: 3}"]
    lines += [f"l{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}" for i in range(1, 8)]
    report = lossgraph.check_text("\n".join(lines) + "\n", "bomb.yaml")
    assert [d.format()[:40] for d in report.errors] == ["bomb.yaml:6:15: with alias *m3, aliases "]


def test_unsafe_tags_are_never_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    text = f'version: !!python/object/apply:os.system ["touch {marker}"]\n'
    report = lossgraph.check_text(text)
    assert not report.ok
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("diagnostic", "text"),
    [
        (
            Diagnostic("error", "losses.lm.target", "unknown source 'x'", "g.yaml", 7, 5),
            "g.yaml:7:5: losses.lm.target: unknown source 'x'",
        ),
        (
            Diagnostic("warning", "sources.t", "source 't' is not used by any loss", "g.yaml", 3, 3),
            "g.yaml:3:3: warning: sources.t: source 't' is not used by any loss",
        ),
        (
            Diagnostic("error", "heads", "needs at least 1 entry", None, 2, 8),
            "<string>:2:8: heads: needs at least 1 entry",
        ),
        (Diagnostic("error", "", "the document is empty", "g.yaml", 1, 1), "g.yaml:1:1: the document is empty"),
        (Diagnostic("error", "heads.n", "no vocab size", "g.yaml", 4), "g.yaml:4: heads.n: no vocab size"),
        (Diagnostic("error", "heads.n", "no vocab size", "g.yaml"), "g.yaml: heads.n: no vocab size"),
    ],
    ids=["full", "warning", "no-file", "no-path", "no-column", "no-line"],
)
def test_diagnostic_format(diagnostic: Diagnostic, text: str):
    assert diagnostic.format() == text


def test_diagnostic_from_a_document_formats_as_file_line_column_path_message():
    (diagnostic,) = lossgraph.check_text(INVALID.replace("nxt", "next"), "g.yaml").errors
    assert diagnostic.format() == (
        "g.yaml:6:54: losses.distill.target: unknown source 'teacher' (declared sources: none)"
    )
    assert diagnostic.to_dict() == {
        "severity": "error",
        "file": "g.yaml",
        "line": 6,
        "column": 54,
        "path": "losses.distill.target",
        "message": "unknown source 'teacher' (declared sources: none)",
    }


# --------------------------------------------------------------------------------------------------
# The schema and the models
# --------------------------------------------------------------------------------------------------


def _models() -> list[type[BaseModel]]:
    """The spec's own models and those of the registered kinds."""
    own = [
        value
        for module in (lossgraph.spec.nodes, lossgraph.spec.models)
        for _, value in inspect.getmembers(module, inspect.isclass)
        if issubclass(value, BaseModel) and value.__module__ == module.__name__
    ]
    return own + [kind.model for kind in (*source_kinds(), *loss_kinds())]


def test_every_property_of_every_schema_model_has_a_description():
    schema = json_schema()
    models = {"(root)": schema, **schema.get("$defs", {})}
    assert len(models) > 10, sorted(models)
    missing = []
    for model_name, model in models.items():
        if model.get("type") == "object" and not model.get("description"):
            missing.append(model_name)
        for name, prop in model.get("properties", {}).items():
            if not str(prop.get("description", "")).strip():
                missing.append(f"{model_name}.{name}")
    assert not missing, f"schema entries without a description: {missing}"


def test_schema_names_itself():
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "version 1" in schema["title"]
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_model_forbids_unknown_keys(model: type[BaseModel]):
    assert model.model_config.get("extra") == "forbid"


def test_models_are_found():
    names = {m.__name__ for m in _models()}
    assert {"LossGraphSpec", "Head", "TeacherSource", "MixtureSource", "CrossEntropyLoss", "LinearSchedule"} <= names


@pytest.mark.parametrize("model", [m for m in _models() if not m.__name__.startswith("_")], ids=lambda m: m.__name__)
def test_unknown_key_is_rejected_by_each_model(model: type[BaseModel]):
    with pytest.raises(ValidationError) as info:
        model.model_validate({"surely_not_a_field": 1})
    assert "surely_not_a_field" in str(info.value)


def test_light_modules_do_not_import_torch_or_triton():
    code = textwrap.dedent(
        """
        import sys
        import lossgraph.spec.models, lossgraph.spec.loader, lossgraph.document, lossgraph.cli.app
        import lossgraph
        lossgraph.check_text(open("examples/every_loss.yaml").read())
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton"))
        print(",".join(heavy))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"
