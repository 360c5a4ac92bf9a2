"""The kinds: one module per loss kind (`losses/`) and per source kind (`sources/`), registered here in
the order the docs list them.

Each module holds everything lossgraph knows about its kind (see `loss.LossKind` and
`source.SourceKind`). Code elsewhere looks a kind up by name (`loss_kind(term.kind)`,
`source_kind(source.type)`) and calls its methods; it never branches on the name. A plugin or a test
adds a kind with `register_loss_kind` or `register_source_kind`; installed packages add theirs through
the `lossgraph.kinds` entry-point group, loaded before the registries are first read (`plugins`).
"""

from . import plugins
from .form import FormInputs, LeafForm
from .loss import LossKind, TargetFacts
from .losses import cross_entropy, entropy, forward_kl, jsd, kl_estimate, policy_gradient, reverse_kl, tvd, z_loss
from .registry import (
    before_first_read,
    hooks_deferred,
    kind_origin,
    leaf_form,
    loss_kind,
    loss_kinds,
    on_kinds_changed,
    register_leaf_form,
    register_loss_kind,
    register_source_kind,
    registering_as,
    source_kind,
    source_kinds,
    unregister_leaf_form,
    unregister_loss_kind,
    unregister_source_kind,
)
from .source import Member, SourceKind, Target
from .sources import label_smoothing, labels, mixture, rollout, teacher, topk_teacher

with registering_as(plugins.BUILT_IN):
    for _module in (labels, teacher, topk_teacher, label_smoothing, mixture, rollout):
        register_source_kind(_module.KIND)
    for _module in (labels, teacher, topk_teacher, rollout):
        register_leaf_form(_module.FORM)
    for _module in (cross_entropy, z_loss, forward_kl, reverse_kl, jsd, tvd, entropy, policy_gradient, kl_estimate):
        register_loss_kind(_module.KIND)
before_first_read(plugins.load_installed)

__all__ = [
    "FormInputs",
    "LeafForm",
    "LossKind",
    "Member",
    "SourceKind",
    "Target",
    "TargetFacts",
    "hooks_deferred",
    "kind_origin",
    "leaf_form",
    "loss_kind",
    "loss_kinds",
    "on_kinds_changed",
    "register_leaf_form",
    "register_loss_kind",
    "register_source_kind",
    "source_kind",
    "source_kinds",
    "unregister_leaf_form",
    "unregister_loss_kind",
    "unregister_source_kind",
]
