"""Where rasters live: local paths, URLs and object stores, as paths GDAL opens.

A location is normalised once, where the user gives it, into a GDAL path that survives
``pathlib.Path`` (which collapses ``//``), so every layer can keep passing ``Path`` objects:

* ``http(s)://host/key`` -> ``/vsicurl/http(s)://host/key`` (``/vsicurl/http:/host`` after
  ``Path``, which GDAL reads the same);
* ``s3://bucket/key`` -> ``/vsis3/bucket/key``, ``gs://`` -> ``/vsigs/``, ``az://`` ->
  ``/vsiaz/``;
* ``/vsi...`` paths (``/vsicurl/``, ``/vsizip/``, ...) are kept; a local path stays a path.

GDAL's cloud settings (``docs/data.md#remote-rasters``) are applied once per process, as
environment defaults so DataLoader workers inherit them and the user's own settings win.
Directory listing on open is disabled only while a remote raster is opened (:func:`remote_env`):
for local files it would hide external ``.msk`` masks and ``.ovr`` overviews.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext

import rasterio

from geocmid.errors import InputError
from geocmid.types import PathLike

#: Network settings read by GDAL on every request: merge neighbouring byte ranges into one
#: request, and fail a dead server within 30 s (3 tries of 8 s, 1 s apart).
NETWORK_SETTINGS = {
    'GDAL_HTTP_MERGE_CONSECUTIVE_RANGES': 'YES',
    'GDAL_HTTP_TIMEOUT': '8',
    'GDAL_HTTP_CONNECTTIMEOUT': '8',
    'GDAL_HTTP_MAX_RETRY': '2',
    'GDAL_HTTP_RETRY_DELAY': '1',
    'CPL_VSIL_CURL_CACHE_SIZE': str(200 * 10**6),
}

#: Settings read when a remote raster is opened: no directory listing (one request per open
#: instead of a listing of the whole prefix), and a block cache on the file handle.
OPEN_SETTINGS = {'GDAL_DISABLE_READDIR_ON_OPEN': 'EMPTY_DIR', 'VSI_CACHE': 'TRUE'}

#: URL schemes and the GDAL virtual file system each maps to.
SCHEMES = {
    'http': '/vsicurl/http://',
    'https': '/vsicurl/https://',
    's3': '/vsis3/',
    'gs': '/vsigs/',
    'az': '/vsiaz/',
}

# ``scheme:/`` or ``scheme://``: pathlib (and click.Path) collapse the double slash.
_URL = re.compile(r'^(?P<scheme>[a-z0-9]+):/+(?P<rest>.*)$', re.IGNORECASE)

# A URL inside a GDAL path whose '//' pathlib collapsed.
_COLLAPSED = re.compile(r'^(/vsicurl/https?:)/(?!/)')

# GDAL virtual file systems that go over the network.
_REMOTE = ('/vsicurl', '/vsis3', '/vsigs', '/vsiaz', '/vsiadls', '/vsioss', '/vsiswift')


def normalise_location(location: PathLike) -> str:
    """The GDAL path of ``location`` (a local path, a URL or a ``/vsi`` path).

    Raises:
        ValueError: a URL scheme GDAL cannot read (the caller names the input).
    """
    text = os.fspath(location)
    match = _URL.match(text)
    if match is None or len(match['scheme']) == 1:  # 'C:/...' is a Windows drive
        if is_remote(text):
            apply_network_settings()
        # GDAL reads '/vsicurl/http:/host' too, but reports its errors as 'Missing url'.
        return _COLLAPSED.sub(r'\1//', text)
    scheme = match['scheme'].lower()
    if scheme == 'file':
        return '/' + match['rest']
    if scheme not in SCHEMES:
        known = ', '.join(f'{s}://' for s in SCHEMES)
        raise ValueError(f'unsupported URL scheme {scheme!r} (use {known} or a /vsi path)')
    apply_network_settings()
    return SCHEMES[scheme] + match['rest']


def gdal_path(location: PathLike) -> str:
    """:func:`normalise_location`, failing with an :class:`InputError` naming ``location``."""
    try:
        return normalise_location(location)
    except ValueError as exc:
        raise InputError(location, str(exc)) from None


def is_remote(location: PathLike) -> bool:
    """Whether ``location`` (normalised or not) is read over the network."""
    text = os.fspath(location)
    if _URL.match(text) and not re.match(r'^(file:|[a-z]:)', text, re.IGNORECASE):
        return True
    # /vsizip/, /vsigzip/... wrap another path, which may itself be remote.
    return any(f'{prefix}/' in text or f'{prefix}?' in text for prefix in _REMOTE)


def reads_remotely(location: PathLike) -> bool:
    """Whether reading ``location`` goes over the network.

    True for a remote raster, and for a local VRT (a band stack, a STAC Item's scene) whose
    sources are remote.
    """
    if is_remote(location):
        return True
    text = os.fspath(location)
    if not text.lower().endswith('.vrt') or not os.path.isfile(text):
        return False
    with open(text, encoding='utf-8', errors='replace') as vrt:
        return is_remote(vrt.read())


def is_location(location: PathLike) -> bool:
    """Whether ``location`` is a URL or a GDAL ``/vsi`` path rather than a plain local path."""
    text = os.fspath(location)
    return text.startswith('/vsi') or is_remote(text)


def location_name(location: PathLike) -> str:
    """How a location is shown to the user: the URL for ``/vsicurl/``, else the GDAL path."""
    text = os.fspath(location)
    for scheme in ('http', 'https'):
        for prefix in (f'/vsicurl/{scheme}://', f'/vsicurl/{scheme}:/'):
            if text.startswith(prefix):
                return f'{scheme}://' + text.removeprefix(prefix)
    return text


def apply_network_settings() -> None:
    """Set GDAL's network settings as environment defaults (the user's values win).

    Without any AWS credentials, S3 requests go unsigned (public buckets such as the
    Sentinel-2 and Landsat archives); with credentials, they are signed as usual.
    """
    for key, value in NETWORK_SETTINGS.items():
        os.environ.setdefault(key, value)
    if not _aws_credentials():
        os.environ.setdefault('AWS_NO_SIGN_REQUEST', 'YES')


def _aws_credentials() -> bool:
    """Whether AWS credentials are configured (environment or the AWS config files)."""
    if any(os.environ.get(k) for k in ('AWS_ACCESS_KEY_ID', 'AWS_PROFILE', 'AWS_ROLE_ARN')):
        return True
    home = os.path.expanduser('~')
    files = (
        os.environ.get('AWS_SHARED_CREDENTIALS_FILE', os.path.join(home, '.aws', 'credentials')),
        os.environ.get('AWS_CONFIG_FILE', os.path.join(home, '.aws', 'config')),
    )
    return any(os.path.isfile(f) for f in files)


def remote_env(location: PathLike) -> AbstractContextManager[object]:
    """The GDAL settings to open ``location`` with.

    :data:`OPEN_SETTINGS` when it is remote (the user's environment still wins), nothing for
    local files.
    """
    if not is_remote(location):
        return nullcontext()
    apply_network_settings()
    settings = {key: os.environ.get(key, value) for key, value in OPEN_SETTINGS.items()}
    return rasterio.Env(**settings)


def remote_reason(message: str) -> str:
    """GDAL's message for a failed remote read, shortened to what the user can act on."""
    text = ' '.join(message.split())
    code = re.search(r'HTTP (?:response )?code:? (\d{3})', text)
    if code is None:
        code = re.search(r'\b(40[0-9]|5\d\d)\b', text)
    if code is not None:
        status = int(code.group(1))
        meaning = {403: 'access denied', 404: 'not found', 401: 'authentication required'}
        return f'HTTP {status} ({meaning.get(status, "request failed")})'
    if 'timed out' in text.lower() or 'timeout' in text.lower():
        return f'server did not answer in time ({text})'
    if 'does not exist' in text or 'No such file' in text:
        return 'not found'
    return text
