"""A file system whose URL carries a password, as fsspec's ftp, sftp and smb
take one: ``credfs://user:password@host/abs/path`` is local disk at
``/abs/path``, opened only with the right password.

Importing this module registers ``credfs://``, so a worker process that
unpickles the file system (by reference to this module) can open its URLs too.
"""

from __future__ import annotations

import re

import fsspec

from .flaky_fs import FlakyLocalFileSystem

PASSWORD = "S3CRET-pw"
_USERINFO = re.compile(r"^credfs://(?:([^:@/]*):([^@/]*)@)?[^/]*")


class CredFileSystem(FlakyLocalFileSystem):
    """Local disk (with flaky_fs's exclusive writes) behind a login, like ftp's."""

    protocol = "credfs"

    def __init__(self, username=None, password=None, **kwargs):
        if password != PASSWORD:  # as an FTP server's "530 Login incorrect"
            raise PermissionError(f"login incorrect for user {username!r}")
        super().__init__(**kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(_USERINFO.sub("", str(path), count=1))

    @staticmethod
    def _get_kwargs_from_urls(path):
        match = _USERINFO.match(str(path))
        return {"username": match[1], "password": match[2]} if match and match[2] is not None else {}


fsspec.register_implementation("credfs", CredFileSystem, clobber=True)
