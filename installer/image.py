"""Making sure the worker image is on this machine: already here, pulled, loaded or built.

Volunteers normally pull the image the scientist published. A scientist can also hand out a
`docker save` archive (--image-archive), and in a dockercomp checkout the image is built from
source, which is what makes the installer work with no image registry at all.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors

from dockercomp.installer.defaults import IMAGE
from dockercomp.installer.errors import ImageUnavailable

Say = Callable[[str], None]

# A dockercomp source checkout, when the installer runs from one (None for a pip install).
_CHECKOUT = Path(__file__).resolve().parents[1]


def find_checkout(root: Path = _CHECKOUT) -> Path | None:
    """The repository root if the installer runs from a source checkout that can build images."""
    if (root / "Dockerfile").is_file() and (root / "scripts" / "build-image.sh").is_file():
        return root
    return None


def local_image(client: Any, name: str) -> Any | None:
    """The image called `name` on this machine, or None."""
    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        return None


def ensure_image(
    client: Any,
    name: str,
    *,
    archive: Path | None = None,
    refresh: bool = False,
    say: Say = lambda _: None,
    checkout: Path | None = None,
    allow_build: bool = True,
) -> Any:
    """The image `name`, fetched if needed; ImageUnavailable (with the fix) if impossible.

    refresh=True (for `upgrade`) looks for a newer image even when one is here: it loads the
    archive, pulls, or rebuilds from the checkout, and falls back to the local image if
    none of those is possible. Building needs a source checkout (found next to this package
    unless `checkout` is given) and the default image name; allow_build=False never builds.
    """
    if archive is not None:
        return _load(client, name, archive, say)
    present = local_image(client, name)
    if present is not None and not refresh:
        return present
    pull_error = _pull(client, name, say)
    if pull_error is None:
        image = local_image(client, name)
        if image is not None:
            return image
    source = checkout if checkout is not None else find_checkout()
    # A checkout builds the plain worker image only: building it under another name (a
    # scientist's image with task packages) would silently replace that image.
    if source is not None and allow_build and name == IMAGE:
        _build(source, name, say)
        image = local_image(client, name)
        if image is not None:
            return image
    if present is not None:
        say(f"no newer image for {name} ({pull_error}); keeping the one on this machine")
        return present
    raise ImageUnavailable(
        f"the worker image {name} is not on this machine and could not be pulled ({pull_error})",
        "check --image, or load an image archive with --image-archive FILE "
        "(docker load), or build it in a dockercomp checkout with `make image`",
    )


def _pull(client: Any, name: str, say: Say) -> str | None:
    """None on success, else the reason in one line."""
    say(f"pulling {name}")
    try:
        client.images.pull(name)  # the SDK splits off a tag or digest, defaulting to latest
    except docker.errors.APIError as exc:
        return str(exc.explanation or exc).splitlines()[0][:200]
    except docker.errors.DockerException as exc:
        return str(exc).splitlines()[0][:200]
    return None


def _load(client: Any, name: str, archive: Path, say: Say) -> Any:
    say(f"loading {archive}")
    try:
        with open(archive, "rb") as stream:
            client.images.load(stream.read())
    except OSError as exc:
        raise ImageUnavailable(f"cannot read the image archive {archive}: {exc.strerror}", "check the path") from None
    except docker.errors.APIError as exc:
        raise ImageUnavailable(
            f"docker could not load {archive}: {exc.explanation}", "make it with `docker save IMAGE -o FILE`"
        ) from None
    image = local_image(client, name)
    if image is None:
        raise ImageUnavailable(
            f"{archive} does not contain the image {name}",
            "pass --image with the name the archive holds (docker load -i FILE shows it)",
        )
    return image


def _build(checkout: Path, name: str, say: Say) -> None:
    say(f"building {name} from the sources in {checkout} (scripts/build-image.sh)")
    result = subprocess.run(
        ["sh", str(checkout / "scripts" / "build-image.sh"), name],
        cwd=checkout,
        capture_output=True,
        text=True, check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ImageUnavailable(f"building {name} failed:\n{tail}", "run `make image` in the checkout to see why")

