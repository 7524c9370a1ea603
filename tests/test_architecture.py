"""The module graph: layers only import downwards, no library module imports configs/, and the graph drawn in
docs/architecture.md is the one the code has."""

import os
import textwrap

from par_jax import architecture


def test_no_import_points_sideways_or_upwards():
    assert architecture.violations() == []


def test_a_planted_upward_import_is_caught(tmp_path):
    """The checker itself: a fake package whose model imports training (inside a function) and configs."""
    root = tmp_path / "par_jax"
    for unit in ("core", "model", "training"):
        (root / unit).mkdir(parents=True)
        (root / unit / "__init__.py").write_text("")
    (root / "model" / "layer.py").write_text(textwrap.dedent("""
        from par_jax.core import mesh
        def f():
            from par_jax.training import train
            from configs import par
    """))
    (root / "training" / "train.py").write_text("from ..model import layer\n")
    bad = architecture.violations(str(root))
    assert any("par_jax.model (layer 2) imports par_jax.training (layer 4)" in b for b in bad), bad
    assert any("par_jax.model.layer imports configs/" in b for b in bad), bad
    assert ("training", "model") in architecture.edges(str(root))  # relative imports are followed
    assert not any(b.startswith("par_jax.training") for b in bad)


def test_docs_show_the_generated_graph():
    text = open(architecture.DOC, encoding="utf-8").read()
    assert architecture.generated_section() in text, "run: python -m par_jax.architecture"
    assert os.path.exists(architecture.DOC)
