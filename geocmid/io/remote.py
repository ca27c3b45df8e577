"""Outputs in object storage: written locally, then uploaded whole.

An output named ``s3://bucket/key`` is written to a local staging folder with the same file
name; when the command succeeds, every file it wrote there is uploaded under the key's prefix
with boto3, one whole object each, so no partial object ever exists under a final key. The
endpoint and credentials are the ones GDAL reads (``AWS_S3_ENDPOINT``, ``AWS_HTTPS``,
``AWS_ACCESS_KEY_ID``...), so reading and writing use the same store.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geocmid.errors import InputError

# 's3://' or, after pathlib collapsed the '//', 's3:/'.
_S3 = re.compile(r'^s3:/+(?P<bucket>[^/]+)/(?P<key>.+)$', re.IGNORECASE)


@dataclass(frozen=True)
class S3Output:
    """An output object: ``s3://bucket/key``."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f's3://{self.bucket}/{self.key}'


def s3_output(path: str | os.PathLike[str]) -> S3Output | None:
    """The S3 object ``path`` names, or None for a local path."""
    match = _S3.match(os.fspath(path))
    return None if match is None else S3Output(match['bucket'], match['key'].rstrip('/'))


def s3_client() -> Any:
    """A boto3 S3 client on GDAL's endpoint (``AWS_S3_ENDPOINT``), if one is set."""
    import boto3

    endpoint = os.environ.get('AWS_S3_ENDPOINT')
    url = None
    if endpoint:
        scheme = (
            'http' if os.environ.get('AWS_HTTPS', 'YES').upper() in ('NO', 'FALSE') else 'https'
        )
        url = endpoint if '://' in endpoint else f'{scheme}://{endpoint}'
    return boto3.client('s3', endpoint_url=url)


def check_s3_output(output: S3Output, overwrite: bool, client: Any | None = None) -> None:
    """Fail before any work if the bucket is missing or the object exists (without overwrite).

    Raises:
        InputError: naming the output.
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
    )

    client = client or s3_client()
    try:
        client.head_bucket(Bucket=output.bucket)
    except ClientError as exc:
        code = exc.response.get('Error', {}).get('Code', '')
        problem = 'bucket does not exist' if code in ('404', 'NoSuchBucket') else f'bucket {code}'
        raise InputError(str(output), problem) from None
    except BotoCoreError as exc:
        raise InputError(str(output), ' '.join(str(exc).split())) from None
    if overwrite:
        return
    listed = client.list_objects_v2(Bucket=output.bucket, Prefix=output.key, MaxKeys=1)
    if listed.get('KeyCount', 0):
        raise InputError(str(output), 'already exists; add --overwrite to replace it')


@contextmanager
def staged_output(output: S3Output, overwrite: bool) -> Iterator[Path]:
    """Yield a local path to write ``output`` to; upload what was written when the block ends.

    Every file under the staging folder (the output itself and any files written beside it,
    or inside it for a folder output) is uploaded to the same relative key. Nothing is uploaded
    when the block fails.

    Raises:
        InputError: see :func:`check_s3_output`.
    """
    client = s3_client()
    check_s3_output(output, overwrite, client)
    prefix = output.key.rsplit('/', 1)[0] + '/' if '/' in output.key else ''
    with tempfile.TemporaryDirectory(prefix='geocmid-upload-') as staging:
        local = Path(staging) / output.key.rsplit('/', 1)[-1]
        yield local
        for path in sorted(Path(staging).rglob('*')):
            if path.is_file() and not path.name.startswith('.'):
                key = prefix + path.relative_to(staging).as_posix()
                client.upload_file(str(path), output.bucket, key)
