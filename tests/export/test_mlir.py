"""MLIR export: every dialect of ``tiny`` (static shapes) parses back with torch-mlir's bindings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ds4c.cli import app
from ds4c.errors import ConfigError
from ds4c.export import open_source
from ds4c.export.mlir import OUTPUT_TYPES, mlir_texts, parse_mlir

# the op each dialect's text must show (so a silent fallback to another dialect fails the test)
MARKERS = {"mlir-torch": "torch.aten.", "mlir-linalg": "linalg.generic", "stablehlo": "stablehlo.", "tosa": "tosa."}


def test_each_dialect_parses_back(tiny_cpu):
    texts = mlir_texts(open_source(tiny_cpu), list(OUTPUT_TYPES), entry="prefill", batch=1, seq=8)
    for dialect, text in texts.items():
        module = parse_mlir(text)
        body = str(module)
        assert MARKERS[dialect] in body, dialect
        assert "func.func @prefill" in body and "?" not in body.split("func.func @prefill")[1].split("{")[0], dialect
        if dialect != "mlir-torch":
            assert "torch.aten." not in body and "tm_tensor." not in body, dialect
        assert "// arguments: input_ids" in text and "layers.1.compressed_kv" in text


def test_unknown_format_and_dialect_are_named(tiny_cpu, tmp_path):
    res = CliRunner().invoke(app, ["export", str(tiny_cpu), "--format", "mlir-gpu", "-o", str(tmp_path / "x.mlir")])
    assert res.exit_code == 2 and "unknown export format 'mlir-gpu'" in res.output
    with pytest.raises(ConfigError, match="unknown MLIR dialect 'hlo'"):
        mlir_texts(open_source(tiny_cpu), ["hlo"])
    assert not list(tmp_path.iterdir())
