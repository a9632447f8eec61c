"""The guest init's user resolution (runc's GetExecUser, as docker uses it), run on the host.

``init --resolve-user SPEC PASSWD GROUP`` (a test mode, only when not PID 1) prints what the init
would switch to: ``uid= gid= groups= home=``, where groups is the list given to setgroups (docker
puts the primary gid first). Tables adapted from runc's libcontainer/user/user_test.go, with
docker's defaults (uid 0, gid 0, HOME "/" from the runtime's second lookup by uid).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from converter.boot.initbin import init_binary

RUNC_PASSWD = """
root:x:0:0:root user:/root:/bin/bash
adm:x:42:43:adm:/var/adm:/bin/false
111:x:222:333::/var/garbage
odd:x:111:112::/home/odd:::::
this is just some garbage data
"""
RUNC_GROUP = """
root:x:0:root
adm:x:43:
grp:x:1234:root,adm
444:x:555:111
odd:x:444:
this is just some garbage data
"""
INVALID_PASSWD = """
root:x:0:0:root user:/root:/bin/bash
adm:x:42:43:adm:/var/adm:/bin/false
-42:x:12:13:broken:/very/broken
this is just some garbage data
"""
INVALID_GROUP = """
root:x:0:root
adm:x:43:
grp:x:1234:root,adm
this is just some garbage data
"""


def resolve(tmp_path: Path, spec: str, passwd: str | None, group: str | None) -> tuple[int, str]:
    paths = []
    for name, content in (("passwd", passwd), ("group", group)):
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        paths.append(str(path))
    proc = subprocess.run([init_binary(), "--resolve-user", spec, *paths], capture_output=True, text=True, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("root", "uid=0 gid=0 groups=0,0,1234 home=/root"),
        ("adm", "uid=42 gid=43 groups=43,1234 home=/var/adm"),
        ("root:adm", "uid=0 gid=43 groups=43 home=/root"),
        ("adm:1234", "uid=42 gid=1234 groups=1234 home=/var/adm"),
        ("42:1234", "uid=42 gid=1234 groups=1234 home=/var/adm"),
        ("1337:1234", "uid=1337 gid=1234 groups=1234 home=/"),
        ("1337", "uid=1337 gid=0 groups=0 home=/"),
        ("", "uid=0 gid=0 groups=0,0,1234 home=/root"),
        # runc #695: a numeric spec is always a uid, never a name
        ("111", "uid=111 gid=112 groups=112 home=/home/odd"),
        ("111:444", "uid=111 gid=444 groups=444 home=/home/odd"),
        ("adm:", "uid=42 gid=43 groups=43,1234 home=/var/adm"),  # an empty group is no group
        ("adm:43:ignored", "uid=42 gid=43 groups=43 home=/var/adm"),
    ],
)
def test_valid(tmp_path: Path, spec: str, expected: str) -> None:
    assert resolve(tmp_path, spec, RUNC_PASSWD, RUNC_GROUP) == (0, expected)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("notuser", "unable to find user notuser: no matching entries in passwd file"),
        ("notuser:notgroup", "unable to find user notuser: no matching entries in passwd file"),
        ("root:notgroup", "unable to find group notgroup: no matching entries in group file"),
        ("notuser:adm", "unable to find user notuser: no matching entries in passwd file"),
        ("8888:notgroup", "unable to find group notgroup: no matching entries in group file"),
        ("notuser:8888", "unable to find user notuser: no matching entries in passwd file"),
        ("-1:0", "uids and gids must be in range 0-2147483647"),
        ("0:-3", "uids and gids must be in range 0-2147483647"),
        ("-5:-2", "uids and gids must be in range 0-2147483647"),
        ("-42", "uids and gids must be in range 0-2147483647"),
        ("-43", "uids and gids must be in range 0-2147483647"),
        ("2147483648", "uids and gids must be in range 0-2147483647"),
    ],
)
def test_invalid(tmp_path: Path, spec: str, error: str) -> None:
    assert resolve(tmp_path, spec, INVALID_PASSWD, INVALID_GROUP) == (125, f"imgconv-init: error: {error}")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", "uid=0 gid=0 groups=0 home=/"),
        ("0", "uid=0 gid=0 groups=0 home=/"),
        ("0:0", "uid=0 gid=0 groups=0 home=/"),
        ("1000:50", "uid=1000 gid=50 groups=50 home=/"),
    ],
)
def test_no_passwd_no_group(tmp_path: Path, spec: str, expected: str) -> None:
    assert resolve(tmp_path, spec, None, None) == (0, expected)


def test_names_need_a_passwd_file(tmp_path: Path) -> None:
    code, said = resolve(tmp_path, "root", None, None)
    assert code == 125 and "unable to find user root" in said
    code, said = resolve(tmp_path, "0:wheel", "root:x:0:0::/root:/bin/sh\n", None)
    assert code == 125 and "unable to find group wheel" in said


def test_home_comes_from_the_first_entry_with_that_uid(tmp_path: Path) -> None:
    # docker resolves the name, then the runtime finds HOME by the numeric uid.
    passwd = "a:x:5:5::/home/a:/bin/sh\nb:x:5:6::/home/b:/bin/sh\n"
    assert resolve(tmp_path, "b", passwd, "") == (0, "uid=5 gid=6 groups=6 home=/home/a")


def test_file_quirks(tmp_path: Path) -> None:
    # CRLF line ends and padding around passwd lines are tolerated; group lines are not trimmed,
    # malformed numbers count as 0, the first match wins, member lists match exactly.
    passwd = "  alice:x:1000:1000::/home/alice:/bin/sh  \r\nalice:x:2000:2000::/other:/bin/sh\nbad:x:zz:zz::/bad:\n"
    group = " staff:x:50:alice\r\nwheel:x:10:alice,bob\nweird:x:abc:alice \ndev:x:60:alice\r\n"
    assert resolve(tmp_path, "alice", passwd, group) == (0, "uid=1000 gid=1000 groups=1000,50,10,60 home=/home/alice")
    assert resolve(tmp_path, "alice:staff", passwd, group)[0] == 125  # " staff" is not "staff"
    assert resolve(tmp_path, "bad", passwd, group) == (0, "uid=0 gid=0 groups=0 home=/bad")
