"""The loss-graph document model (`LossGraphSpec`) and its JSON Schema.

The building blocks (ranges, schedules, heads, the fields every source and loss node has) are in
`lossgraph.spec.nodes` and re-exported here; the model of each source kind and loss kind is in the
kind's module under lossgraph/kinds/. The unions of those models follow the kind registries:
registering a kind (a plugin, or a test-only kind) rebuilds the `sources` and `losses` fields, so
that the loader, the schema and the docs see it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, PrivateAttr
from pydantic.fields import FieldInfo

from ..kinds import hooks_deferred, loss_kinds, on_kinds_changed, source_kinds
from .nodes import *  # noqa: F403 (the building blocks, re-exported)
from .nodes import Head, Name, SpecModel, VocabSize
from .sourcemap import SourceMap


def _union(kinds) -> Any:
    """The discriminated union (on `type`) of the kinds' models."""
    models = tuple(kind.model for kind in kinds)
    return Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007 (a runtime-built union)


with hooks_deferred():  # installed plugins load at the end of this module, once it is whole: they may import it
    Source = _union(source_kinds())
    LossNodes = _union(loss_kinds())


class LossGraphSpec(SpecModel):
    """A loss graph: the student's heads, the target sources and the loss nodes that bind them."""

    version: Literal[1] = Field(description="Version of the loss-graph format; only 1 exists.")
    vocab_size: VocabSize | None = Field(
        None, description="Default vocabulary size of every head and teacher that does not set its own."
    )
    normalization: Literal["tokens", "sum", "batch"] = Field(
        "tokens",
        description=(
            "How each head's summed loss is divided: `tokens` by its unmasked token count (or the "
            "caller's `num_items`), `sum` not at all, `batch` by the number of positions."
        ),
    )
    description: str | None = Field(None, description="Free text shown by `lossgraph show`.")
    heads: dict[Name, Head] = Field(min_length=1, description="The student's prediction heads, by name.")
    sources: dict[Name, Source] = Field(
        default_factory=dict, description="Where targets come from, by name; `type` picks the kind."
    )
    losses: dict[Name, LossNodes] = Field(min_length=1, description="Loss nodes, by name; `type` picks the kind.")

    # Where each node was written (file, line, column); empty for specs built in Python.
    _source_map: SourceMap = PrivateAttr(default_factory=SourceMap)

    @property
    def source_map(self) -> SourceMap:
        """Positions of the document this spec was loaded from (empty when built in Python)."""
        return self._source_map

    def head_vocab(self, head: str) -> int | None:
        """Vocabulary size of a head (its own, else the default)."""
        own = self.heads[head].vocab_size
        return own if own is not None else self.vocab_size

    def source_vocab(self, source: str) -> int | None:
        """Vocabulary size of a teacher or top-k teacher source (its own, else the default)."""
        own = getattr(self.sources[source], "vocab_size", None)
        return own if own is not None else self.vocab_size


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a loss-graph document (what `lossgraph schema` writes)."""
    schema = LossGraphSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lossgraph loss graph (version 1)"
    return schema


def _rebuild_unions() -> None:
    """Point `sources` and `losses` at the registered kinds' models (after a kind is added or removed)."""
    fields = LossGraphSpec.__pydantic_fields__
    fields["sources"] = FieldInfo.merge_field_infos(fields["sources"], annotation=dict[Name, _union(source_kinds())])
    fields["losses"] = FieldInfo.merge_field_infos(fields["losses"], annotation=dict[Name, _union(loss_kinds())])
    LossGraphSpec.model_rebuild(force=True)


on_kinds_changed(_rebuild_unions)
loss_kinds()  # the first read: installed plugins and LOSSGRAPH_PLUGINS load now, and their kinds rebuild the unions
