"""An image config as imgconv writes it: read and validated, changed through methods, serialised once.

vm-to-oci starts from a config it did not write (a base image's, the one a disk carries, or a fresh one)
and changes a few fields. The fields it reads or changes are checked for the types the OCI image spec
gives them (Docker's own Go decoder refuses the same documents), so a hostile base config is a one-line
error, never a traceback; everything else in the document is kept as it was. Only JSON comes out (see
:func:`~converter.oci.model.canonical_json`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from converter.errors import ImageError
from converter.oci.model import canonical_json, load_json

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_STRING_LISTS = ("Entrypoint", "Cmd", "Env")
_OBJECTS = ("Labels", "ExposedPorts", "Volumes")


@dataclass(frozen=True)
class ConfigOverrides:
    """Changes to the run configuration (vm-to-oci's flags): None or empty leaves a field as it is."""

    entrypoint: tuple[str, ...] | None = None  # () clears it
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()  # KEY=VALUE, replacing an entry with the same KEY
    workdir: str | None = None
    user: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    expose: tuple[str, ...] = ()  # PORT/PROTO


@dataclass(frozen=True)
class HistoryEntry:
    created: str
    created_by: str
    comment: str

    def to_json(self) -> dict[str, Any]:
        return {"created": self.created, "created_by": self.created_by, "comment": self.comment}


@dataclass(frozen=True)
class ConfigFile:
    """A validated image config document; methods return changed copies."""

    doc: Mapping[str, Any]

    @classmethod
    def parse(cls, raw: bytes, what: str) -> ConfigFile:
        return cls.from_doc(load_json(raw, what), what)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], what: str) -> ConfigFile:
        section = doc.get("config")
        if section is not None and not isinstance(section, dict):
            raise ImageError(f"{what}: config must be an object")
        for key in _STRING_LISTS:
            value = (section or {}).get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ImageError(f"{what}: config.{key} must be a list of strings")
        for key in _OBJECTS:
            value = (section or {}).get(key)
            if value is not None and not isinstance(value, dict):
                raise ImageError(f"{what}: config.{key} must be an object")
        labels = (section or {}).get("Labels") or {}
        if not all(isinstance(v, str) for v in labels.values()):
            raise ImageError(f"{what}: config.Labels values must be strings")
        history = doc.get("history")
        if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
            raise ImageError(f"{what}: history must be a list of objects")
        return cls(dict(doc))

    @classmethod
    def fresh(cls, architecture: str, labels: Mapping[str, str]) -> ConfigFile:
        """A config for a disk that carries none: Docker's default PATH and a shell."""
        return cls({"architecture": architecture, "os": "linux",
                    "config": {"Env": [DEFAULT_PATH], "Cmd": ["/bin/sh"], "Labels": dict(labels)}})

    @property
    def section(self) -> dict[str, Any]:
        return dict(self.doc.get("config") or {})

    def with_overrides(self, o: ConfigOverrides) -> ConfigFile:
        cfg = self.section
        if o.entrypoint is not None:
            cfg["Entrypoint"] = list(o.entrypoint) or None
        if o.cmd is not None:
            cfg["Cmd"] = list(o.cmd) or None
        if o.env:
            env = list(cfg.get("Env") or [])
            for item in o.env:
                key = item.split("=", 1)[0]
                env = [e for e in env if e.split("=", 1)[0] != key] + [item]
            cfg["Env"] = env
        if o.workdir is not None:
            cfg["WorkingDir"] = o.workdir
        if o.user is not None:
            cfg["User"] = o.user
        if o.labels:
            cfg["Labels"] = {**(cfg.get("Labels") or {}), **dict(o.labels)}
        if o.expose:
            cfg["ExposedPorts"] = {**(cfg.get("ExposedPorts") or {}), **{p: {} for p in o.expose}}
        return ConfigFile({**self.doc, "config": cfg})

    def with_layers(self, diff_ids: list[str], entry: HistoryEntry, *, replaces_history: bool) -> ConfigFile:
        """The layers are now *diff_ids*, the last made as *entry* says. When one flattened layer replaces
        all the layers the history describes, those entries are kept, marked as making no layer."""
        history = [dict(h) for h in self.doc.get("history") or []]
        if replaces_history:
            for h in history:
                h["empty_layer"] = True
        return ConfigFile({**self.doc, "created": entry.created, "history": [*history, entry.to_json()],
                           "rootfs": {"type": "layers", "diff_ids": diff_ids}})

    def to_json(self) -> bytes:
        """Canonical JSON bytes, so the same config has the same digest."""
        return canonical_json(self.doc)
