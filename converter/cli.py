"""The `imgconv` command line: parse options, call one library function per verb, render the result.

No logic lives here. Errors from the library arrive as :class:`ImgconvError` and leave as one
line on stderr with the error's exit code; nothing else is ever printed as a traceback.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from converter import __version__
from converter.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, ImgconvError, Interrupted, UsageError, one_line
from converter.progress import JsonMonitor, Monitor, NullMonitor, TextMonitor
from converter.store.store import build_output, check_disk_reference, disk_input

if TYPE_CHECKING:
    from converter.boot.runspec import RunOverrides
    from converter.boot.sshkeys import SshAccess
    from converter.boot.volumes import Volume
    from converter.oci.config import ConfigOverrides

app = typer.Typer(
    name="imgconv",
    help=(
        "Convert OCI container images into bootable VM disks, and VM disks back into OCI images.\n\n"
        "Image references use the containers-transports syntax: oci:DIR[:TAG], "
        "docker-archive:PATH[:NAME:TAG], docker-daemon:NAME[:TAG], docker://REGISTRY/NAME[:TAG|@DIGEST]."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"imgconv {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Log every external command and library call.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    store: Annotated[Path | None, typer.Option("--store", metavar="DIR",
                                               help="The store of versions (store:NAME[:TAG]). Default: "
                                                    "$IMGCONV_STORE, else $XDG_DATA_HOME/imgconv/store.")] = None,
) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="imgconv: %(message)s",
                        stream=sys.stderr)
    if store is not None:
        from converter.store.store import choose_root

        choose_root(store)


PlatformOpt = Annotated[
    str | None,
    typer.Option("--platform", metavar="OS/ARCH[/VARIANT]",
                 help="Platform to pick from a multi-platform image (default: this machine's)."),
]
TlsOpt = Annotated[
    bool,
    typer.Option("--tls-verify/--no-tls-verify",
                 help="Require HTTPS and valid certificates for docker:// registries (as skopeo does)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
FirmwareOpt = Annotated[str, typer.Option("--firmware", metavar="bios|uefi|both",
                                          help="What the disk boots under: bios (MBR, extlinux), uefi (GPT, a "
                                               "unified kernel image on an EFI system partition) or both.")]

IncrementalOpt = Annotated[bool, typer.Option(
    "--incremental/--no-incremental",
    help="Into store:NAME[:TAG]: when the store holds a version made with the same options from the image's "
         "older layers (a prefix of them), start from its disk and apply only the new layers, on the host with "
         "no appliance; anything that cannot be applied so falls back to a full build, saying why.")]
InitOpt = Annotated[str, typer.Option(
    "--init", metavar="auto|container|system",
    help="Who is PID 1. container: imgconv's init runs Entrypoint + Cmd, as docker run; system: the image's own "
         "init system boots (systemd...) and the command, unless it is the init, runs as its service; auto: "
         "system when the command is an init (/sbin/init, /lib/systemd/systemd...), else container.")]


def monitor_for(json_output: bool, quiet: bool) -> Monitor:
    if quiet:
        return NullMonitor()
    if json_output:
        return JsonMonitor()
    return TextMonitor()


def _text(value: object) -> str:
    """Show an untrusted string safely: JSON quoting escapes control characters and spaces stay visible."""
    return json.dumps(value, ensure_ascii=False)


@app.command()
def inspect(
    reference: Annotated[str, typer.Argument(metavar="REF", help="The image, e.g. oci:./layout:latest.")],
    json_output: JsonOpt = False,
    platform: PlatformOpt = None,
    tls_verify: TlsOpt = True,
    quiet: QuietOpt = False,
) -> None:
    """Show an image's identity, platform, layers and run configuration.

    Every blob is verified (size and sha256) while it is read; a corrupt image is an error.
    """
    from converter.inspect import inspect_image
    from converter.records import dumps, to_json

    report = inspect_image(reference, platform=platform, tls_verify=tls_verify,
                           monitor=monitor_for(json_output, quiet or json_output))
    if json_output:
        print(dumps(report))
    else:
        print(render_inspect(to_json(report)))


def render_inspect(report: dict[str, Any]) -> str:
    lines = [
        f"Source:      {report['source']}",
        f"Image ID:    {report['image_id']}",
        f"Manifest:    {report['manifest_digest'] or '(none: a docker archive has no registry manifest)'}",
    ]
    if report.get("index_digest"):
        lines.append(f"Index:       {report['index_digest']}")
    lines.append(f"Platform:    {report['platform']}")
    if report.get("created"):
        lines.append(f"Created:     {_text(report['created'])}")
    total = sum(layer["size"] for layer in report["layers"])
    lines.append(f"Layers:      {len(report['layers'])} ({human_size(total)})")
    for i, layer in enumerate(report["layers"], 1):
        lines.append(f"  {i:>3}  {layer['digest']}  {human_size(layer['size']):>10}  {layer['media_type']}")
    cfg = report["config"]
    lines.append("Config:")
    lines.append(f"  Entrypoint:   {_text(cfg['Entrypoint'])}")
    lines.append(f"  Cmd:          {_text(cfg['Cmd'])}")
    env = cfg["Env"] or []
    lines.append(f"  Env:          {_text(env[0]) if env else '(none)'}")
    lines.extend(f"                {_text(e)}" for e in env[1:])
    lines.append(f"  WorkingDir:   {_text(cfg['WorkingDir']) if cfg['WorkingDir'] else '(/)'}")
    lines.append(f"  User:         {_text(cfg['User']) if cfg['User'] else '(root)'}")
    lines.append(f"  ExposedPorts: {', '.join(_text(p) for p in cfg['ExposedPorts']) or '(none)'}")
    labels = cfg["Labels"]
    if labels:
        items = list(labels.items())
        lines.append(f"  Labels:       {_text(items[0][0])}={_text(items[0][1])}")
        lines.extend(f"                {_text(k)}={_text(v)}" for k, v in items[1:])
    else:
        lines.append("  Labels:       (none)")
    return "\n".join(lines)


FORMATS = "qcow2, raw, vmdk, vhdx, vpc"


def parse_size(text: str) -> int:
    """`4G`, `512M`, `1.5GiB`, `2000000000` -> bytes (binary units, as qemu-img reads them)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise UsageError(f"invalid size {text!r}: expected a number with an optional K, M, G or T suffix")
    number, unit = float(match.group(1)), match.group(2).upper()
    value = int(number * (1024 ** " KMGT".index(unit or " ")))
    if value < 64 * 1024 * 1024:
        raise UsageError(f"size {text!r} is too small: a bootable disk needs at least 64M")
    return value


def _check_build_flags(compress_not_qcow2: bool, firmware: str, init: str, kernel: Path | None,
                       initrd: Path | None) -> None:
    from converter.disk.plan import InitMode
    from converter.disk.uefi import Firmware

    if compress_not_qcow2:
        raise UsageError("--compress applies to qcow2 only")
    if firmware not in tuple(Firmware):
        raise UsageError(f"unknown firmware {firmware!r}; choose one of bios, uefi, both")
    if init not in tuple(InitMode):
        raise UsageError(f"unknown --init {init!r}; choose one of auto, container, system")
    if initrd is not None and kernel is None:
        raise UsageError("--initrd needs --kernel")
    if kernel is not None and not kernel.is_file():
        raise UsageError(f"kernel {kernel} does not exist")


@app.command("oci-to-qcow2")
def oci_to_qcow2(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="The image, e.g. docker-daemon:myapp:latest.")],
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="The disk to create: myapp.qcow2, store:NAME[:TAG].")],
    disk_format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT",
                                             help=f"Disk format: {FORMATS}.")] = "qcow2",
    compress: Annotated[bool, typer.Option("--compress", help="zstd-compress the qcow2 clusters.")] = False,
    size: Annotated[str | None, typer.Option("--size", metavar="SIZE",
                                             help="Virtual disk size (e.g. 4G). Default: content plus headroom.")
                    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    kernel: Annotated[Path | None, typer.Option("--kernel", metavar="PATH", readable=False,
                                                help="Kernel to boot: a kernel file, or a Debian linux-image-*.deb "
                                                     "(its kernel and modules are used; nothing is installed). "
                                                     "Default: the image's own, else this machine's newest "
                                                     "under /boot.")] = None,
    initrd: Annotated[Path | None, typer.Option("--initrd", metavar="PATH", readable=False,
                                                help="Initramfs for --kernel (default: imgconv builds one).")
                      ] = None,
    hostname: Annotated[str, typer.Option("--hostname", help="The VM's hostname.")] = "imgconv",
    kernel_modules: Annotated[bool | None, typer.Option(
        "--kernel-modules/--no-kernel-modules", show_default=False,
        help="Place a host kernel's modules tree in the guest (about 90 MiB). Default: only with --init "
             "system; imgconv's initramfs already loads what a boot needs.")] = None,
    firmware: FirmwareOpt = "bios",
    init: InitOpt = "auto",
    incremental: IncrementalOpt = True,
    platform: PlatformOpt = None,
    tls_verify: TlsOpt = True,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a container image into a bootable, read-only VM disk that runs its ENTRYPOINT.

    The disk boots under QEMU/KVM (BIOS, extlinux) and runs Entrypoint + Cmd with the image's
    Env, WorkingDir and User exactly as `docker run` would, then powers off. OUTPUT is written
    atomically with mode 0444, next to a sidecar OUTPUT.json (source, digests, kernel, sha256).

    Example: imgconv oci-to-qcow2 docker-daemon:myapp:latest myapp.qcow2 && imgconv boot myapp.qcow2
    """
    from converter.disk.build import BuildOptions, DiskFormat, convert
    from converter.disk.plan import InitMode
    from converter.disk.uefi import Firmware
    from converter.oci.model import Platform

    try:
        fmt = DiskFormat(disk_format)
    except ValueError as exc:
        raise UsageError(f"unknown disk format {disk_format!r}; choose one of {FORMATS}") from exc
    _check_build_flags(compress and fmt is not DiskFormat.QCOW2, firmware, init, kernel, initrd)
    out_path, target = build_output(output)
    options = BuildOptions(
        output=out_path, format=fmt, compress=compress, size=parse_size(size) if size else None, force=force,
        kernel=kernel, initrd=initrd, hostname=validate_hostname(hostname), store=target,
        platform=Platform.parse(platform) if platform else None, tls_verify=tls_verify,
        kernel_modules=kernel_modules, firmware=Firmware(firmware), init=InitMode(init), incremental=incremental,
    )
    record = convert(source, options, monitor_for(json_output, quiet))
    if json_output or not quiet:
        _result(record, json_output, f"{output}: {record.format}, {human_size(record.size)} on disk, "
                                     f"kernel {record.kernel.release}, sha256 {record.sha256}")


@app.command("vm-to-oci")
def vm_to_oci(
    # readable=False: imgconv checks the disk itself and says what is wrong in one line
    disk: Annotated[str, typer.Argument(metavar="DISK", help="The VM disk: qcow2, raw, vmdk, vhdx, vpc or vdi "
                                                             "(or store:NAME[:TAG]).",
                                         readable=False)],
    dest: Annotated[str, typer.Argument(metavar="DEST",
                                        help="Where to write the image, e.g. oci:./out:latest or docker://host/name:tag.")],
    compression: Annotated[str, typer.Option("--compression", help="Layer compression: gzip or zstd.")] = "gzip",
    reproducible: Annotated[bool, typer.Option("--reproducible",
                                               help="Fixed timestamps (SOURCE_DATE_EPOCH, else 1970), "
                                                    "so the same disk gives the same digests.")] = False,
    keep_boot: Annotated[bool, typer.Option("--keep-boot", help="Keep /boot and kernel modules.")] = False,
    root: Annotated[str | None, typer.Option("--root", metavar="DEVICE",
                                             help="The OS root to export when the disk holds several.")] = None,
    base: Annotated[str | None, typer.Option("--base", metavar="REF",
                                             help="Reuse this image's layers; add one layer with the differences.")
                    ] = None,
    entrypoint: Annotated[str | None, typer.Option("--entrypoint", metavar="JSON|CMD",
                                                   help='Entrypoint, as a JSON array (["/app","-v"]) or one path.')
                          ] = None,
    cmd: Annotated[str | None, typer.Option("--cmd", metavar="JSON|CMD",
                                            help='Cmd, as a JSON array or a single program.')] = None,
    env: Annotated[list[str] | None, typer.Option("--env", metavar="KEY=VALUE", help="Add or replace an Env entry.")
                   ] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", help="WorkingDir.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="User (name, uid, uid:gid).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="Add a label.")] = None,
    expose: Annotated[list[str] | None, typer.Option("--expose", metavar="PORT[/PROTO]", help="Expose a port.")
                      ] = None,
    platform: PlatformOpt = None,
    tls_verify: TlsOpt = True,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn a VM disk into an OCI image that Docker, skopeo and registries accept.

    The disk is opened read-only inside a libguestfs appliance (no network, no guest code run).
    A disk made by oci-to-qcow2 gets its original config back and everything imgconv added is
    taken out again; other disks get their OS found by inspection, mounted at its own mountpoints,
    and a config from the flags (default Cmd ["/bin/sh"]).

    Example: imgconv vm-to-oci legacy.qcow2 docker-daemon:legacy:latest
    """
    from converter.disk.export import ExportOptions, export
    from converter.oci.model import Platform

    options = ExportOptions(
        compression=compression, reproducible=reproducible, keep_boot=keep_boot, root=root, base=base,
        platform=Platform.parse(platform) if platform else None, tls_verify=tls_verify,
        overrides=config_overrides(entrypoint, cmd, env or [], workdir, user, label or [], expose or []),
    )
    with disk_input(disk) as disk_path:
        record = export(disk_path, dest, options, monitor_for(json_output, quiet))
    if json_output or not quiet:
        image = record.identity
        _result(record, json_output, f"{image.source}: {len(image.layers)} layer(s), image {image.image_id}"
                + (f", manifest {image.manifest_digest}" if image.manifest_digest else ""))


def _result(record: object, json_output: bool, line: str) -> None:
    """A verb's typed result on stdout: as JSON with --json, else as one line for people."""
    from converter.records import dumps

    print(dumps(record) if json_output else line)


def config_overrides(entrypoint: str | None, cmd: str | None, env: list[str], workdir: str | None,
                     user: str | None, labels: list[str], expose: list[str]) -> ConfigOverrides:
    from converter.oci.config import ConfigOverrides

    return ConfigOverrides(
        entrypoint=parse_argv(entrypoint, "--entrypoint"), cmd=parse_argv(cmd, "--cmd"),
        env=tuple(key_value(e, "--env") and e for e in env), workdir=workdir, user=user,
        labels=tuple(key_value(item, "--label") for item in labels), expose=tuple(port_spec(p) for p in expose),
    )


def parse_argv(value: str | None, flag: str) -> tuple[str, ...] | None:
    """A JSON array of strings, or one program path; "" or [] clears the setting."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{flag} is not a valid JSON array: {exc}") from exc
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise UsageError(f"{flag} must be a JSON array of strings")
        return tuple(parsed)
    return (value,) if value else ()


def key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"{flag} takes KEY=VALUE, not {item!r}")
    return key, value


def port_spec(text: str) -> str:
    import re

    match = re.fullmatch(r"(\d{1,5})(?:/(tcp|udp|sctp))?", text)
    if not match or not 0 < int(match.group(1)) < 65536:
        raise UsageError(f"--expose takes PORT[/tcp|udp|sctp], not {text!r}")
    return f"{match.group(1)}/{match.group(2) or 'tcp'}"


# docker run's flags for `boot`, one line each in its signature (converter.boot.runspec, converter.boot.state).
CommandArg = Annotated[list[str] | None, typer.Argument(
    metavar="COMMAND [ARG...]", show_default=False,
    help="Replaces the image's Cmd, as `docker run IMAGE COMMAND...` (everything after DISK, options too).")]
EntrypointOpt = Annotated[str | None, typer.Option(
    "--entrypoint", metavar="CMD", help="Replaces the image's Entrypoint (and drops its Cmd, as Docker).")]
EnvOpt = Annotated[list[str] | None, typer.Option(
    "--env", "-e", metavar="KEY=VALUE", help="Set a variable (KEY alone: the host's value, if it has one).")]
EnvFileOpt = Annotated[list[Path] | None, typer.Option(
    "--env-file", metavar="FILE", help="Read variables from FILE (Docker's format: KEY=VALUE lines, # comments).")]
WorkdirOpt = Annotated[str | None, typer.Option("--workdir", "-w", metavar="DIR", help="Working directory.")]
UserOpt = Annotated[str | None, typer.Option("--user", "-u", metavar="USER[:GROUP]", help="User to run as.")]
HostnameOpt = Annotated[str | None, typer.Option("--hostname", metavar="NAME", help="The guest's hostname.")]
StateOpt = Annotated[Path | None, typer.Option(
    "--state", metavar="FILE", help="Keep the workload's writes in FILE (a qcow2 over DISK, made on first use; "
                                    "refused if it belongs to another disk). Without it, writes are thrown away.")]
StopTimeoutOpt = Annotated[float, typer.Option(
    "--stop-timeout", metavar="SECONDS", help="After Ctrl-C/SIGTERM asks the workload to stop (SIGTERM in the "
                                              "guest), power the VM off when this expires (exit 137), as Docker.")]


InteractiveOpt = Annotated[bool, typer.Option(
    "--interactive", "-i", help="Forward stdin to the workload, byte for byte; its end reaches the workload.")]
TtyOpt = Annotated[bool, typer.Option(
    "--tty", "-t", help="Give the workload a terminal (with -i: this terminal goes raw, Ctrl-C reaches the "
                        "workload; the size follows).")]

VolumeOpt = Annotated[list[str] | None, typer.Option(
    "--volume", "-v", metavar="HOSTDIR:GUESTDIR[:ro|:rw]",
    help="Share a host directory with the guest (virtiofs; needs root), read-only with :ro; files the guest "
         "creates get its uid/gid, as with Docker. HOSTDIR must exist (Docker would create it; imgconv "
         "refuses); a relative one starts with '.' (a bare name would be a Docker named volume); GUESTDIR is "
         "absolute, created when missing. Repeatable.")]

SshKeyOpt = Annotated[Path | None, typer.Option(
    "--ssh-key", metavar="FILE", help="Authorise these public keys for --ssh-user in a system-mode guest "
                                      "(oci-to-qcow2 --init system), for this boot only.")]
SshUserOpt = Annotated[str, typer.Option("--ssh-user", metavar="USER", help="Whose keys --ssh-key sets.")]


def _volumes_and_ssh(specs: list[str], ssh_key: Path | None,
                     ssh_user: str) -> tuple[tuple[Volume, ...], SshAccess | None]:
    from converter.boot.sshkeys import read_ssh_access
    from converter.boot.volumes import check_host, parse_volumes

    volumes = parse_volumes(specs)
    if volumes:
        check_host()
    return volumes, read_ssh_access(ssh_key, ssh_user) if ssh_key is not None else None


def _check_boot_numbers(memory: int, cpus: int, timeout: float | None, stop_timeout: float) -> None:
    if memory < 64:
        raise UsageError("--memory must be at least 64 (MiB)")
    if cpus < 1:
        raise UsageError("--cpus must be at least 1")
    if timeout is not None and timeout <= 0:
        raise UsageError("--timeout must be positive")
    if stop_timeout < 0:
        raise UsageError("--stop-timeout must not be negative")


def _stdio_flags(overrides: RunOverrides, interactive: bool, tty: bool) -> RunOverrides:
    """-i and -t as Docker takes them: -it needs a terminal on stdin."""
    import dataclasses

    from converter.boot.streams import window_size

    if interactive and tty and not sys.stdin.isatty():
        raise UsageError("the input device is not a TTY (-t with -i needs a terminal on stdin; "
                         "drop -t to pipe input)")
    size = window_size()
    tty_size = (size[0] << 8 | size[1], size[2] << 8 | size[3]) if tty else None
    return dataclasses.replace(overrides, interactive=interactive, tty_size=tty_size)


def _run_overrides(command: list[str] | None, entrypoint: str | None, env: list[str] | None,
                   env_file: list[Path] | None, workdir: str | None, user: str | None,
                   hostname: str | None) -> RunOverrides:
    from converter.boot.runspec import build_overrides, check_hostname

    return build_overrides(cmd=command or [], entrypoint=entrypoint, env=env or [], env_files=env_file or [],
                           workdir=workdir, user=user, hostname=None if hostname is None else check_hostname(hostname))


@app.command(context_settings={"allow_interspersed_args": False})
def boot(
    disk: Annotated[str, typer.Argument(metavar="DISK", help="A disk made by oci-to-qcow2 (any format), or "
                                                             "store:NAME[:TAG].", callback=check_disk_reference)],
    timeout: Annotated[float | None, typer.Option("--timeout", metavar="SECONDS",
                                                  help="Stop the VM after this long (exit code 124).")] = None,
    memory: Annotated[int, typer.Option("--memory", "-m", metavar="MIB", help="Guest memory in MiB.")] = 512,
    cpus: Annotated[int, typer.Option("--cpus", help="Guest CPUs.")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose",
                                          help="Show the qemu command line and the boot messages.")] = False,
    network: Annotated[str, typer.Option("--network", metavar="user|none",
                                         help="user: a NIC on QEMU's user network (eth0, 10.0.2.15/24, outbound "
                                              "works, as Docker's default network); none: loopback only.")] = "user",
    publish: Annotated[list[str] | None, typer.Option("--publish", "-p", metavar="[IP:]HOSTPORT:GUESTPORT[/PROTO]",
                                                      help="Forward a host port to the guest (tcp or udp). IP "
                                                           "defaults to 127.0.0.1, not Docker's 0.0.0.0: only this "
                                                           "machine can connect unless you give 0.0.0.0.")] = None,
    entrypoint: EntrypointOpt = None, env: EnvOpt = None, env_file: EnvFileOpt = None, workdir: WorkdirOpt = None,
    user: UserOpt = None, hostname: HostnameOpt = None, state: StateOpt = None, stop_timeout: StopTimeoutOpt = 10.0,
    interactive: InteractiveOpt = False, tty: TtyOpt = False, ssh_key: SshKeyOpt = None, ssh_user: SshUserOpt = "root",
    volume: VolumeOpt = None,
    command: CommandArg = None,
) -> None:
    """Boot a disk under QEMU and run its workload; exit with the workload's exit code.

    The disk is never written: the VM runs on a throwaway overlay (or --state FILE). Options are
    docker run's: the workload's stdout and stderr come apart, byte for byte, as they come; Ctrl-C
    asks the workload to stop (SIGTERM), as `docker stop` does (with -it, Ctrl-C goes to it).

    Example, a dev environment: imgconv boot -it -v "$PWD:/work" -w /work -p 8080:8080 dev.qcow2 bash

    Exit codes:

    * the workload's own (128+N if it was killed by signal N);
    * 124 when --timeout expired;
    * 125 when the VM ended without a workload status (kernel panic, init failure);
    * 137 when a stop was requested and the workload did not end in time.
    """
    import math

    from converter.boot.qemu import boot as boot_disk

    _check_boot_numbers(memory, cpus, timeout, stop_timeout)
    overrides = _stdio_flags(_run_overrides(command, entrypoint, env, env_file, workdir, user, hostname),
                             interactive, tty)
    from converter.boot.network import parse_network

    guest_network = parse_network(network, publish or [])
    volumes, ssh = _volumes_and_ssh(volume or [], ssh_key, ssh_user)
    # qemu.boot turns KeyboardInterrupt into a graceful guest stop; let both signals arrive as one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    result = boot_disk(Path(disk), timeout=timeout if timeout is not None else math.inf, memory_mib=memory, cpus=cpus,
                       verbose=verbose, stdout=sys.stdout.buffer, stderr=sys.stderr, network=guest_network,
                       stdin=sys.stdin.fileno() if interactive else None,
                       overrides=overrides, state=state, stop_grace=stop_timeout, volumes=volumes, ssh=ssh)
    sys.stdout.flush()
    if result.message:
        print(f"imgconv: {result.message}", file=sys.stderr)
    raise typer.Exit(result.status)


def _store_commands() -> None:
    """`imgconv commit` and the `imgconv store` sub-app (converter/store/cli.py)."""
    from converter.store.cli import commit_command, store_app

    app.command("commit")(commit_command)
    app.add_typer(store_app, name="store")


_store_commands()

# A str, not a Path: a Path would fold store:'s "//" away; disk_input reads a store: reference (a one-line error,
# exit 2, if it names nothing) and takes anything else for a file (./store:x is a file).
DiskArg = Annotated[str, typer.Argument(metavar="DISK", help="A disk made by oci-to-qcow2 or commit, or "
                                                             "store:NAME[:TAG].", readable=False)]


@app.command()
def provenance(disk: DiskArg) -> None:
    """Print the disk's provenance: an in-toto Statement v1 with a SLSA provenance v1 predicate (DISK.intoto.json).

    Its subject is the disk's sha256; it names the source image's config and manifest digests, the kernel, imgconv's
    init and version, and the options: what `imgconv verify --rebuild` builds it again from. A version made by
    `imgconv commit` names its base version and the state file instead.
    """
    from converter.artifact import statement_path
    from converter.provenance import read_json

    with disk_input(disk) as path:
        print(json.dumps(read_json(statement_path(path), "provenance statement"), indent=2, sort_keys=True))


@app.command()
def verify(
    disk: DiskArg,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Also build the disk again from its recorded source "
                                                            "and say whether the bytes are identical.")] = False,
    tls_verify: TlsOpt = True,
    quiet: QuietOpt = False,
) -> None:
    """Check a disk against its sidecar and provenance statement: exit 0 and one line OK, or 1 and what differs.

    With --rebuild, the recorded source is converted again (same options, same SOURCE_DATE_EPOCH) into a temporary
    file: exit 0 when its bytes are the disk's, 1 when they are not.
    """
    from converter.provenance import rebuild_disk, verify_disk
    from converter.store.reference import is_store_ref
    from converter.store.store import Store, store_root

    with disk_input(disk) as path:
        verdict = verify_disk(path)
        if not verdict.ok:
            for problem in verdict.problems:
                print(f"{printable(disk)}: FAILED: {printable(problem)}")
            raise typer.Exit(1)
        if not rebuild:
            print(f"{printable(disk)}: OK ({verdict.sha256}, from {printable(verdict.source)})")
            return
        # A store version is rebuilt in the store's tmp/, not among its objects.
        work = Store(store_root()).tmp if is_store_ref(disk) else None
        again = rebuild_disk(path, tls_verify, monitor_for(False, quiet), work)
    if not again.identical:
        print(f"{printable(disk)}: FAILED: rebuilt from {printable(again.source)}, the bytes differ: {again.recorded} "
              f"recorded, {again.rebuilt} rebuilt")
        raise typer.Exit(1)
    print(f"{printable(disk)}: OK, rebuilt identical ({again.rebuilt}) from {printable(again.source)}")


def validate_hostname(name: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", name):
        raise UsageError(f"invalid hostname {name!r}: letters, digits and '-', at most 63 characters")
    return name


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _on_signal(signum: int, _frame: object) -> None:
    # Raised as our own error (not KeyboardInterrupt) so cleanup runs and the exit code is 130.
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}; nothing was left at the output")


def printable(text: str) -> str:
    """Control characters in a message (from an image, a tool's output, a path) are shown, never interpreted."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def main() -> None:
    """Console entry point: run the app and turn every failure into one line and an exit code.

    Usage errors (an unknown option, a missing argument) follow the same one-line contract as imgconv's own
    errors. Anything unexpected is a bug: one line too, and its traceback with --debug.
    """
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    command = typer.main.get_command(app)
    try:
        status = command.main(prog_name="imgconv", standalone_mode=False)
    except ImgconvError as exc:
        _fail(str(exc), exc.exit_code, exc)
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        _usage_error(exc)
    except (BrokenPipeError, typer.Abort):
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        _fail(f"unexpected {type(exc).__name__}: {exc} (a bug in imgconv; --debug shows where)", EXIT_FAILED, exc)
    sys.exit(status if isinstance(status, int) else 0)


def _fail(message: str, code: int, exc: BaseException) -> None:
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"imgconv: error: {printable(one_line(message))}", file=sys.stderr)
    sys.exit(code)


def _usage_error(exc: Exception) -> None:
    if type(exc).__name__ == "NoArgsIsHelpError":  # `imgconv` alone: the help, as a usage error
        print(getattr(exc, "format_message", lambda: "")(), file=sys.stderr)
        sys.exit(EXIT_USAGE)
    message = getattr(exc, "format_message", lambda: str(exc))()
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "imgconv"
    _fail(f"{message} (see {where} --help)", int(getattr(exc, "exit_code", EXIT_USAGE)), exc)


if __name__ == "__main__":
    main()
