"""``imgconv store ...`` and ``imgconv commit``: parse, call the store, render; converter/cli.py mounts them.

Kept beside the store rather than in converter/cli.py so that the main command line stays one screen per verb;
errors leave as ImgconvError through converter.cli.main like every other command's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from converter.errors import ReferenceError_
from converter.store.reference import parse_store_ref
from converter.store.store import Entry, Store, Tag, store_root

store_app = typer.Typer(
    name="store", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    short_help="The local store of read-only versions: list, history, rollback, tag, rm, gc.",
    help="The local store of read-only versions: store:NAME[:TAG] is accepted wherever a disk is (OUTPUT of "
         "oci-to-qcow2, DISK of boot and vm-to-oci, DEST of commit). The store is --store DIR, else "
         "$IMGCONV_STORE, else $XDG_DATA_HOME/imgconv/store.",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
RefArg = Annotated[str, typer.Argument(metavar="NAME[:TAG]", help="A tag (store: optional; TAG defaults to latest).")]


def _shown(text: str) -> str:
    """A string from a sidecar or tag file, with control characters escaped (the store's files can be edited)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text) or "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _entry_json(entry: Entry) -> dict[str, Any]:
    return dataclasses.asdict(entry)


@store_app.command("list")
def list_tags(json_output: JsonOpt = False) -> None:
    """Every tag: its name, tag, the version's sha256, the image it was made from and when."""
    tags = Store(store_root()).tags()
    if json_output:
        print(json.dumps([{"name": t.name, "tag": t.tag, **_entry_json(t.current)} for t in tags], indent=2))
        return
    rows = [["NAME", "TAG", "SHA256", "SOURCE", "CREATED"]]
    rows += [[t.name, t.tag, t.current.sha256, _shown(t.current.source), _shown(t.current.created)] for t in tags]
    print(_table(rows) if tags else f"(the store {store_root()} has no tags)")


@store_app.command()
def history(reference: RefArg, json_output: JsonOpt = False) -> None:
    """What a tag pointed at, newest first (* marks the current one): each version's sha256, source image, when
    it was made, and when and how the tag moved to it (write, commit, tag, rollback)."""
    tag = Store(store_root()).history(parse_store_ref(reference, prefixed=False))
    if json_output:
        print(json.dumps({"name": tag.name, "tag": tag.tag, "history": [_entry_json(e) for e in tag.entries]},
                         indent=2))
        return
    rows = [["", "SHA256", "SOURCE", "CREATED", "TAGGED", "HOW"]]
    rows += [["*" if i == 0 else "", e.sha256, _shown(e.source), _shown(e.created), _shown(e.tagged), e.how]
             for i, e in enumerate(tag.entries)]
    print(_table(rows))


@store_app.command()
def rollback(reference: RefArg) -> None:
    """Move the tag back to the version it held before its current one. Both stay in the history (and in the
    store): `imgconv store tag store:NAME@sha256:... NAME:TAG` rolls forward again."""
    ref = parse_store_ref(reference, prefixed=False, digest_ok=False)
    store = Store(store_root())
    before = store.history(ref).current
    entry = store.rollback(ref)
    print(f"{ref.name}:{ref.tag}: rolled back to {entry.sha256} (from {before.sha256})")


@store_app.command()
def tag(
    source: Annotated[str, typer.Argument(metavar="SRC", help="NAME[:TAG] or NAME@sha256:DIGEST.")],
    dest: Annotated[str, typer.Argument(metavar="DST", help="NAME[:TAG] to point at SRC's version.")],
) -> None:
    """Point DST at the version SRC names (DST's history keeps what it held before)."""
    dst = parse_store_ref(dest, prefixed=False, digest_ok=False)
    entry = Store(store_root()).tag(parse_store_ref(source, prefixed=False), dst)
    print(f"{dst.name}:{dst.tag} -> {entry.sha256}")


@store_app.command("rm")
def remove(reference: Annotated[str, typer.Argument(metavar="NAME:TAG", help="The tag to remove.")]) -> None:
    """Remove a tag and its history; its versions are deleted by `imgconv store gc` (once no tag keeps them)."""
    if ":" not in reference.removeprefix("store:"):
        raise ReferenceError_(f"store rm takes NAME:TAG (the tag to remove), not {reference!r}")
    removed: Tag = Store(store_root()).remove(parse_store_ref(reference, prefixed=False, digest_ok=False))
    print(f"removed {removed} (was {removed.current.sha256})")


@store_app.command()
def gc(json_output: JsonOpt = False) -> None:
    """Delete the versions no tag or history keeps (not those a running boot uses) and the temporary files of
    killed conversions; report what was freed."""
    report = Store(store_root()).gc()
    if json_output:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return
    print(f"deleted {len(report.versions)} version(s) and {len(report.temporary)} temporary file(s), freed "
          f"{report.freed} bytes" + (f"; {len(report.in_use)} unreferenced version(s) kept while in use"
                                     if report.in_use else ""))
    for digest in report.versions:
        print(f"  {digest}")


ImageArg = Annotated[str, typer.Argument(metavar="docker://REGISTRY/REPO:TAG", help="The registry image.")]
TlsOpt = Annotated[bool, typer.Option("--tls-verify/--no-tls-verify",
                                      help="Require HTTPS and valid certificates (as skopeo does).")]


def _moved_json(moved: Any) -> str:
    return json.dumps(dataclasses.asdict(moved), indent=2)


@store_app.command()
def push(reference: RefArg, image: ImageArg, tls_verify: TlsOpt = True, json_output: JsonOpt = False) -> None:
    """Push a version to a registry as a KubeVirt containerDisk (the disk at /disk/NAME.qcow2, owned 107:107),
    and its provenance statement as a second image tagged sha256-DIGEST.intoto after the disk image's digest."""
    from converter.store.registry import push_version

    moved = push_version(parse_store_ref(reference, prefixed=False), image, tls_verify)
    if json_output:
        print(_moved_json(moved))
        return
    print(f"{moved.version} -> {image} ({moved.manifest_digest}); disk {moved.sha256}; "
          + (f"statement tagged {moved.statement_tag}" if moved.statement_tag else "no statement to push"))


@store_app.command()
def pull(image: ImageArg, reference: RefArg, tls_verify: TlsOpt = True, json_output: JsonOpt = False) -> None:
    """Pull a containerDisk (one layer holding only /disk/NAME.qcow2) into the store as a version, with the
    statement pushed beside it; the disk must be the one the image's sidecar and statement name."""
    from converter.store.registry import pull_version

    moved = pull_version(image, parse_store_ref(reference, prefixed=False, digest_ok=False), tls_verify)
    if json_output:
        print(_moved_json(moved))
        return
    print(f"{image} -> {moved.version}: disk {moved.sha256}; "
          + (f"statement from {moved.statement_tag}" if moved.statement_tag else "no statement found"))


def commit_command(
    state: Annotated[Path, typer.Argument(metavar="STATE", readable=False,
                                          help="A --state file of imgconv boot.")],
    dest: Annotated[str, typer.Argument(metavar="DEST", help="store:NAME:TAG, or a disk file to create.")],
    base: Annotated[str | None, typer.Option("--base", metavar="DISK",
                                             help="The disk STATE was made over (default: the store's version "
                                                  "with the sha256 STATE's record names).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a DEST file if it exists.")] = False,
    json_output: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Make the writes a `boot --state STATE` kept, over their read-only base, a new read-only version.

    The result is one standalone qcow2 (no backing chain) with a sidecar whose `base` is the base version's
    sha256. STATE and the base are left as they were.

    Example: imgconv boot --state s.qcow2 store:app sh -c 'apk add curl' && imgconv commit s.qcow2 store:app:v2
    """
    from converter.cli import monitor_for
    from converter.records import dumps
    from converter.store.commit import CommitRequest, commit

    record = commit(CommitRequest(state, dest, base, force), monitor_for(json_output, quiet))
    if json_output:
        print(dumps(record))
    elif not quiet:
        print(f"{record.dest}: sha256 {record.sha256}, {record.size} bytes, over {record.base}")
