"""The local store of versions: content-addressed, read-only disks under names and tags (``store:NAME[:TAG]``).

reference.py parses ``store:NAME[:TAG|@sha256:HEX]`` (Docker's repository and tag grammar), store.py keeps the
versions, tags and their history consistent under concurrent writers, readers and kills, and commit.py makes a
``boot --state`` file plus its read-only base into a new version.
"""
