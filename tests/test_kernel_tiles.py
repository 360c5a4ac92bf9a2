"""The tile vocabulary of the generator (kernels/tiles.py): a tile body that reads the label's column is
written twice under a per-tile branch, one that does not is written once; every name a part of the
kernel shares comes from kernels/names.py."""

from __future__ import annotations

import re

from lossgraph.kernels import names
from lossgraph.kernels.codegen import KernelGenerator
from lossgraph.kernels.layout import kernel_layout
from lossgraph.kernels.signature import KernelSpec, KernelTerm
from lossgraph.kernels.tiles import Tiles

from lossgraph.kinds import loss_kind
from lossgraph.kinds.sources.labels import KLabels

SPEC = KernelSpec(terms=(KernelTerm(loss_kind("cross_entropy").fragments, KLabels(), 0),), slot_is_one=(True,))


def tiles() -> Tiles:
    return Tiles(SPEC, "single", kernel_layout(SPEC))


def test_a_tile_body_without_the_label_is_written_once():
    k = tiles()
    with k.tile_loop():
        k.tile_body(lambda tile: tile.emit(f"grad = {tile.q(0)}"))
    text = k.src.text()
    assert "if (" not in text and "else:" not in text
    assert text.count(f"{names.student_max(0)}") == 1  # q is written once, from the slot's state


def test_a_tile_body_reading_the_label_branches_on_the_labels_tile():
    k = tiles()
    with k.tile_loop():
        k.tile_body(lambda tile: tile.emit(f"grad = tl.where({tile.onehot()}, {tile.q(0)} - 1.0, {tile.q(0)})"))
    lines = [line.strip() for line in k.src.lines]
    branch = lines.index(f"if ({names.LABEL_COLUMN} >= start) & ({names.LABEL_COLUMN} < start + BLOCK_V):")
    other = lines.index("else:")
    label_copy, other_copy = lines[branch + 1 : other], lines[other + 1 :]
    assert f"{names.IS_LABEL} = offs == {names.LABEL_COLUMN}" in label_copy
    assert any(line.startswith("grad = tl.where(False,") for line in other_copy)
    assert not any(names.IS_LABEL in line for line in other_copy)
    # each copy writes the tile's q itself: neither reads a variable only the other one defines
    assert sum(line.startswith("q_0 = ") for line in label_copy) == 1
    assert sum(line.startswith("q_0 = ") for line in other_copy) == 1


def test_no_part_of_the_generator_spells_an_old_short_name():
    """The statistics and arguments the parts share are named by kernels/names.py (student_max_0, ...)."""
    source = KernelGenerator(SPEC).source()
    for old in (r"\bm_s\d", r"\bsum_s\d", r"\binv_t\d", r"\bgw\d", r"\bvs\d", r"\blw\d", r"\bloss\d", r"\by_col\b"):
        assert not re.search(old, source), old
    for name in (names.student_max(0), names.student_log_sum(0), names.gradient_weight(0), names.value(0)):
        assert name in source
