"""The scientist's kit: everything a volunteer's one line downloads, in one folder.

`dockercomp coordinator kit build` writes the folder; any static web server can serve it
(`kit serve` does, for a try). Its files:

- install_me.sh: the installer (installer/install_me.sh) with the kit's URL baked in;
- kit.env: which images to run (KEY=VALUE lines the installer reads, never executes);
- images.tar.gz: `docker save` of the worker and installer images, for projects without an
  image registry; with --registry the images are instead references pinned by digest
  (NAME@sha256:...), which Docker itself verifies when it pulls them;
- ca.crt: the broker's private CA certificate, when it has one;
- the dockercomp wheel, when given (for volunteers who run the agent without Docker);
- SHA256SUMS: the checksum of every file above (`sha256sum -c` reads it);
- kit.json: the kit's URL and the SHA-256 of SHA256SUMS. `volunteers add` puts that hash in
  the one line it prints, so the line pins every byte the volunteer downloads.

Images are saved under kit-specific tags (REPO:kit-IMAGEID), removed again from the
scientist's Docker afterwards: a volunteer's machine then holds tags that only the kit
made, which `install_me.sh --uninstall` can remove without touching anything else.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dockercomp.broker.defaults import INSTALL_SCRIPT, KIT_INFO_FILE
from dockercomp.coordinator import defaults as d
from dockercomp.coordinator.errors import CoordinatorError
from dockercomp.exits import Exit

Say = Callable[[str], None]

SUMS = "SHA256SUMS"
KIT_ENV = "kit.env"
KIT_JSON = KIT_INFO_FILE
ARCHIVE = "images.tar.gz"
CA = "ca.crt"
# The line of install_me.sh that kit build replaces with the kit's URL.
_URL_LINE = 'KIT_URL="${DOCKERCOMP_KIT_URL:-}"'
# Every name kit build writes: a rebuild removes the previous kit's files and nothing else.
_OWN_FILES = (INSTALL_SCRIPT, SUMS, KIT_ENV, KIT_JSON, ARCHIVE, CA)


class KitError(CoordinatorError):
    """The kit cannot be built or served as asked; ``hint`` says what to do."""

    exit_code = Exit.USAGE

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)


class KitImageError(KitError):
    exit_code = Exit.IMAGE


@dataclass
class Kit:
    """What kit build made: where, for which URL, and the hash the one line pins."""

    directory: Path
    url: str
    sums_sha256: str
    worker_image: str
    installer_image: str
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256

    def to_json(self) -> dict[str, object]:
        return {"url": self.url, "sha256": self.sums_sha256,
                "worker_image": self.worker_image, "installer_image": self.installer_image, "files": self.files}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _docker(*args: str, timeout: float = d.KIT_DOCKER_TIMEOUT, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, input=stdin,
                              check=False)
    except FileNotFoundError:
        raise KitImageError("the docker command is not installed", "install Docker to build a kit") from None
    except subprocess.TimeoutExpired:
        raise KitImageError(f"docker {args[0]} took more than {timeout:g} s", "check `docker info`") from None
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise KitImageError(f"docker {' '.join(args[:2])} failed: {detail}",
                            "build the images first with `make image` (or pass --image)")
    return done.stdout.strip()


def _image_id(name: str) -> str:
    return _docker("image", "inspect", "--format", "{{.Id}}", name)


def build_tasks_image(tasks: Path, base: str) -> str:
    """The worker image with a scientist's task package (a folder like examples/custom-tasks/).

    Built FROM `base` whatever the folder's own Dockerfile says: the worker image's ONBUILD
    steps install the package, so the FROM line is all a task image needs.
    """
    if not (tasks / "pyproject.toml").exists() and not (tasks / "setup.py").exists():
        raise KitError(f"{tasks} holds no Python package (no pyproject.toml or setup.py)",
                       "pass a folder like examples/custom-tasks/")
    blob = hashlib.sha256()
    for path in sorted(p for p in tasks.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        blob.update(str(path.relative_to(tasks)).encode() + b"\0" + path.read_bytes())
    tag = f"{_repository(base)}:tasks-{blob.hexdigest()[:12]}"
    _docker("build", "-q", "-t", tag, "-f", "-", str(tasks), stdin=f"FROM {base}\n", timeout=d.KIT_BUILD_TIMEOUT)
    return tag


def _repository(name: str) -> str:
    """An image name without its tag or digest (a registry's host:port is not a tag)."""
    name = name.split("@", 1)[0]
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def _kit_tag(name: str) -> str:
    return f"{_repository(name)}:kit-{_image_id(name).removeprefix('sha256:')[:12]}"


def _save(images: list[str], target: Path) -> None:
    """`docker save IMAGES | gzip` into target (gzip level 1: most of the gain, little of the time)."""
    with gzip.open(target, "wb", compresslevel=1) as out:
        process = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None
        shutil.copyfileobj(process.stdout, out, 1 << 20)
        error = process.stderr.read().decode() if process.stderr else ""
        if process.wait() != 0:
            raise KitImageError(f"docker save failed: {error.strip()[-300:]}", "check `docker image ls`")


def _pinned(name: str) -> str:
    """NAME@sha256:... of an image pushed to a registry, which Docker verifies on pull."""
    digests = _docker("image", "inspect", "--format", "{{join .RepoDigests \"\\n\"}}", name).split()
    if not digests:
        raise KitImageError(f"{name} has no registry digest (it was never pushed or pulled)",
                            f"docker push {name}, then build the kit again")
    return digests[0]


def install_script(url: str) -> str:
    """installer/install_me.sh with this kit's URL as its default."""
    text = (resources.files("dockercomp.installer") / INSTALL_SCRIPT).read_text()
    if _URL_LINE not in text:
        raise KitError("install_me.sh has no KIT_URL line to fill in", "reinstall dockercomp")
    return text.replace(_URL_LINE, f'KIT_URL="${{DOCKERCOMP_KIT_URL:-{url}}}"', 1)


def build_kit(out: Path, url: str, *, worker_image: str = d.KIT_WORKER_IMAGE,
              installer_image: str = d.KIT_INSTALLER_IMAGE, tasks: Path | None = None, registry: bool = False,
              ca_file: Path | None = None, wheel: Path | None = None, say: Say = lambda _: None) -> Kit:
    """Writes the kit into `out` (see the module's docstring) and returns what it made."""
    url = url.rstrip("/")
    if not url.startswith(("https://", "http://")):
        raise KitError(f"the kit URL {url!r} is not http(s)", "pass --url https://HOST/PATH (where the kit is served)")
    out.mkdir(parents=True, exist_ok=True)
    for name in _OWN_FILES:
        (out / name).unlink(missing_ok=True)
    if tasks is not None:
        say(f"building the worker image with the tasks in {tasks}")
        worker_image = build_tasks_image(tasks, worker_image)
    files: list[str] = []
    if registry:
        worker, installer = _pinned(worker_image), _pinned(installer_image)
        archive = ""
    else:
        worker, installer = _kit_tag(worker_image), _kit_tag(installer_image)
        _docker("tag", worker_image, worker)
        _docker("tag", installer_image, installer)
        try:
            say(f"saving {worker} and {installer} into {ARCHIVE}")
            _save([worker, installer], out / ARCHIVE)
        finally:  # the kit tags are for volunteers' machines, not the scientist's (gone already: fine)
            subprocess.run(["docker", "image", "rm", worker, installer], capture_output=True,
                           timeout=d.KIT_DOCKER_TIMEOUT, check=False)
        archive = ARCHIVE
        files.append(ARCHIVE)
    if ca_file is not None:
        if "-----BEGIN CERTIFICATE-----" not in ca_file.read_text():
            raise KitError(f"{ca_file} is not a PEM certificate", "pass the broker's ca.crt (certs/ca.crt)")
        shutil.copyfile(ca_file, out / CA)
        files.append(CA)
    if wheel is not None:
        shutil.copyfile(wheel, out / wheel.name)
        files.append(wheel.name)
    (out / INSTALL_SCRIPT).write_text(install_script(url))
    (out / INSTALL_SCRIPT).chmod(0o755)
    env = {"KIT_WORKER_IMAGE": worker, "KIT_INSTALLER_IMAGE": installer, "KIT_ARCHIVE": archive,
           "KIT_CA": CA if ca_file is not None else "", "KIT_VERSION": "1"}
    (out / KIT_ENV).write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    files += [INSTALL_SCRIPT, KIT_ENV]
    sums = {name: sha256_file(out / name) for name in sorted(files)}
    (out / SUMS).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))
    kit = Kit(out, url, sha256_file(out / SUMS), worker, installer, sums)
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False) as temporary:
        json.dump(kit.to_json(), temporary, indent=2)
    Path(temporary.name).replace(out / KIT_JSON)
    return kit
