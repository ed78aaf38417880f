"""`vitclt push RUN_DIR org/repo`: publish a transcoder on the Hugging Face hub (see docs/hub.md).

Uploads the folded model.safetensors, config.json and a generated model card (README.md) in one
commit. `--dry-run DIR` writes exactly those files into DIR and uploads nothing. The config module
imports no torch: `--help` and bad flags stay fast; `run` loads the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from tyro.conf import OmitArgPrefixes, Positional, arg
from tyro.constructors import PrimitiveConstructorSpec

from vitclt.runtime import RuntimeConfig

TEMPORARY = Path("<temporary>")
"""`--dry-run` given without a directory: stage into a new temporary directory (printed)."""


def _dry_run_dir(values: list[str]) -> Path:
    if len(values) > 1:
        raise ValueError(f"--dry-run takes at most one directory, got {len(values)}: {' '.join(values)}")
    return Path(values[0]) if values else TEMPORARY


DRY_RUN = PrimitiveConstructorSpec(nargs="*", metavar="[DIR]", instance_from_str=_dry_run_dir,
                                   is_instance=lambda x: x is None or isinstance(x, Path),
                                   str_from_instance=lambda x: [] if x == TEMPORARY else [str(x)])
"""`--dry-run` and `--dry-run DIR` both parse (a plain `Path | None` flag demands a value)."""


@dataclass
class PushConfig:
    """`vitclt push RUN_DIR org/repo`: upload a transcoder's weights, config and a generated model card to the hub."""

    run_dir: Annotated[Path, Positional, arg(metavar="RUN_DIR")]
    """A transcoder directory (config.json + model.safetensors) or a run directory holding several (see --transcoder)."""
    repo_id: Annotated[str, Positional, arg(metavar="REPO_ID")]
    """Hub repository to create or update, as org/repo (or user/repo)."""
    transcoder: str | None = None
    """Name of the transcoder in RUN_DIR when it holds several (names as `vitclt eval` lists them)."""
    private: bool = False
    """Create the repository as private (an existing repository keeps its visibility)."""
    revision: str | None = None
    """Branch to commit to (default: the main branch); created from the main branch if missing."""
    commit_message: str | None = None
    """Commit message (default: "Upload NAME with vitclt VERSION")."""
    dry_run: Annotated[Path | None, DRY_RUN] = None
    """Upload nothing; write what would be uploaded (model.safetensors, config.json, README.md) into DIR or a new temp dir."""
    runtime: Annotated[RuntimeConfig, OmitArgPrefixes] = field(default_factory=lambda: RuntimeConfig(workers=0))
    """Device and threads for the check that loads the transcoder before anything is written."""


def pick_transcoder(run_dir: Path, name: str | None) -> tuple[str, Path]:
    """(name, directory) of the transcoder to publish: the only one in RUN_DIR, or the one named `name`."""
    from vitclt.errors import InputNotFoundError
    from vitclt.eval.suite import pick_transcoder as pick

    if not Path(run_dir).exists():
        raise InputNotFoundError(f"{run_dir} does not exist: pass the directory of a trained transcoder (vitclt train)")
    return pick(run_dir, name)


def stage(cfg: PushConfig, folder: Path) -> tuple[str, Path]:
    """Write the files to upload into `folder`: the checked weights and config, and the model card. Returns (name, source)."""
    import dataclasses
    import shutil

    from vitclt.io import write_text
    from vitclt.nn.formats import CONFIG_NAME, WEIGHTS_NAME
    from vitclt.nn.transcoder import Transcoder
    from vitclt.report.card import find_evaluation, missing_evaluation, model_card
    from vitclt.runtime import setup

    name, source = pick_transcoder(cfg.run_dir, cfg.transcoder)
    # A corrupt or mismatched file fails here, before anything is written.
    model = Transcoder.from_pretrained(source, device=setup(cfg.runtime))
    card = model_card(dataclasses.asdict(model.cfg), source, name, cfg.repo_id, Path(cfg.run_dir))
    if find_evaluation(Path(cfg.run_dir), source, name) is None:
        print(f"note: {missing_evaluation(Path(cfg.run_dir), source, name)}; the model card has no evaluation numbers")
    for file in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copyfile(source / file, folder / file)
    write_text(folder / "README.md", card)
    return name, source


def run(cfg: PushConfig) -> str:
    """Stage and upload (or, with --dry-run, only stage); print and return where it went."""
    import tempfile

    from vitclt import __version__
    from vitclt.errors import ConfigError, OutputError
    from vitclt.nn.hub import parse_hub_id, upload
    from vitclt.runtime import check_writable_dir

    if parse_hub_id(cfg.repo_id) is None or "@" in cfg.repo_id or cfg.repo_id.startswith("hf:"):
        raise ConfigError(f"{cfg.repo_id!r} is not a hub repository id: write org/repo (a branch goes in --revision)")
    if cfg.dry_run is not None:
        folder = cfg.dry_run
        if folder == TEMPORARY:
            try:
                folder = Path(tempfile.mkdtemp(prefix="vitclt-push-dry-run-"))
            except OSError as err:
                raise OutputError(f"cannot create a temporary directory in {tempfile.gettempdir()} ({err.strerror or err}): "
                                  "pass --dry-run DIR") from None
            print(f"dry run: staging into the temporary directory {folder}")
        folder = check_writable_dir(folder, "--dry-run")
        clash = [f for f in ("model.safetensors", "config.json", "README.md") if (folder / f).exists()]
        if clash:
            raise OutputError(f"{folder} already holds {', '.join(clash)}: pass an empty or new --dry-run directory")
        name, _ = stage(cfg, folder)
        print(f"dry run: wrote what would be uploaded to {cfg.repo_id} ({name}) into {folder}")
        return str(folder)
    try:
        staging = tempfile.TemporaryDirectory(prefix="vitclt-push-")
    except OSError as err:
        raise OutputError(f"cannot create a staging directory in {tempfile.gettempdir()} ({err.strerror or err}): "
                          "set TMPDIR to a writable directory") from None
    with staging as tmp:
        name, _ = stage(cfg, Path(tmp))
        message = cfg.commit_message or f"Upload {name} with vitclt {__version__}"
        url = upload(Path(tmp), cfg.repo_id, private=cfg.private, revision=cfg.revision, commit_message=message)
    print(f"pushed {name} to https://huggingface.co/{cfg.repo_id}" + (f" (branch {cfg.revision})" if cfg.revision else ""))
    print(f"commit: {url}")
    return url
