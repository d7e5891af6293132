"""`WeightEntry` (one parameter, ours ↔ transformers') and `Table` (a component's entries)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bidirlm_jax.io.layouts import HEAD, TEXT, Component


@dataclass(frozen=True)
class WeightEntry:
    """One parameter: its path in our module and its component-relative transformers key. Our parameters
    keep transformers' `[out, in]` order (heads split out, patches flattened), so the two layouts differ by
    a reshape (no copy); an entry needing more overrides `to_ours`/`to_hf`."""

    path: tuple
    hf_key: str  # relative to the component's prefix (see io.layouts)
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]

    def to_ours(self, array):
        return array.reshape(self.shape)

    def to_hf(self, array):
        return array.reshape(self.hf_shape)


@dataclass(frozen=True)
class Table:
    """A component's weight table: every parameter it loads, plus keys a checkpoint may hold that are not
    read (`ignored`: an LM head tied to the embedding)."""

    component: Component
    entries: tuple[WeightEntry, ...]
    ignored: frozenset[str] = frozenset()

    def under(self, *path) -> Table:
        """The same table for a module placed at `path` inside a larger model (a tower inside Omni)."""
        return replace(self, entries=tuple(replace(e, path=(*path, *e.path)) for e in self.entries))


def entry(path: tuple, hf_key: str, hf_shape: tuple[int, ...], shape: tuple[int, ...] | None = None) -> WeightEntry:
    """An entry whose two layouts differ by a reshape (none when `shape` is omitted)."""
    return WeightEntry(path, hf_key, tuple(hf_shape), tuple(shape or hf_shape))


def dtype_key(component: Component, hf_key: str) -> str:
    """The name a tensor's stored dtype is recorded under (`tensor_dtypes`): backbone-relative for the text
    model, as checkpoints record it; a tower's key prefixed with its component name, since a tower's
    relative keys may repeat the text model's ("layers.0.fc1.weight")."""
    return hf_key if component in (TEXT, HEAD) else f"{component.name}.{hf_key}"
