"""An output folder belongs to one run at a time.

A run holds an exclusive ``flock`` on ``OUTPUT_DIR/.lock`` (holding its pid) while it writes; the
kernel drops the lock when the process ends however it ends, so a lock file left by a killed run is
stale by construction and simply taken over. Before anything is built, :func:`check_free` refuses
a folder that another live run holds, or that holds a run already when neither ``--resume`` nor
``--overwrite`` was given; :func:`check_resume` refuses a resume whose settings change the run's
identity. The run writes into the folder only after its config, data and model were validated.

``config_history.jsonl`` is append-only: one line per start or resume, with the first round the
config applies to, the settings changed since the previous line, the whole config and the
fingerprint of the package's code that ran it (:func:`code_fingerprint`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from fedlora_jax import checkpoint
from fedlora_jax import config as config_lib
from fedlora_jax import metrics

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
LABELS_FILE = "labels.json"
CHECKPOINT_DIR = "checkpoints"
# What a run writes (and --overwrite removes); anything else in the folder is left alone.
RUN_FILES = (CONFIG_FILE, HISTORY_FILE, LABELS_FILE, metrics.METRICS_FILE, "metrics.csv",
             metrics.ALLOCATION_FILE, "learning_curves.png", "round_times.png", "allocation.png",
             CHECKPOINT_DIR)


def holder(out: Path) -> str | None:
    """The pid (as written in the lock file) of a live run that holds ``out``, else None.
    Reads only: a lock file nobody holds is stale."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _busy(out: Path, pid: str) -> ValueError:
    return ValueError(f"{out} is in use by another run (pid {pid}): wait for it to finish, or "
                      "give another --output-dir.")


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds the files of a run (finished, interrupted or failed)."""
    return any((out / name).exists()
               for name in (CONFIG_FILE, metrics.METRICS_FILE, CHECKPOINT_DIR))


def check_free(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses (ValueError, with the fix) a folder held by a live run, then what
    :func:`check_contents` refuses. Writes nothing."""
    if (pid := holder(out)) is not None:
        raise _busy(out, pid)
    check_contents(out, resume=resume, overwrite=overwrite)


def check_contents(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses a resume with nothing to resume and a new run over an existing one without
    ``overwrite``."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite "
                         "replaces it: give one of them.")
    if resume and not saved_rounds(out):
        fix = "start it again with --overwrite" if holds_run(out) else "start it without --resume"
        raise FileNotFoundError(f"Nothing to resume: {out / CHECKPOINT_DIR} holds no checkpoint; "
                                f"{fix}.")
    if not resume and not overwrite and holds_run(out):
        raise ValueError(f"{out} holds a run already: continue it with --resume, replace it with "
                         "--overwrite, or give another --output-dir.")


def saved_rounds(out: Path) -> list[int]:
    """The rounds of the complete checkpoints in ``out`` (orbax names each by its round)."""
    folder = out / CHECKPOINT_DIR
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def saved_config(out: Path) -> dict:
    """The config the run in ``out`` last ran with (``config.json``)."""
    file = out / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"Nothing to resume: {file} does not exist.")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}, line {e.lineno}: not valid JSON ({e.msg}); restore the file "
                         "or start again with --overwrite.") from None


def check_resume(out: Path, cfg: dict) -> dict[str, tuple]:
    """The settings of ``cfg`` that differ from the saved run's: ValueError naming each one the
    run cannot change (:data:`fedlora_jax.config.RESUMABLE`) with both values, or a round count
    below the latest checkpoint's, or checkpoints of an earlier version
    (:func:`fedlora_jax.checkpoint.check_layout`); else the allowed changes,
    ``{setting: (old, new)}`` (the folder's own path aside)."""
    checkpoint.check_layout(out / CHECKPOINT_DIR)
    changed = config_lib.differences(saved_config(out), cfg)
    changed.pop("output_dir", None)  # a moved or copied folder: where the run is now
    fixed = {k: v for k, v in changed.items() if k not in config_lib.RESUMABLE}
    if fixed:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in fixed.items())
        raise ValueError(f"Cannot resume {out} with other settings of the run: {listed}. Resume "
                         "without them, or start a new run (--overwrite or another --output-dir).")
    latest, rounds = max(saved_rounds(out)), cfg["federation"]["rounds"]
    if rounds < latest:
        raise ValueError(f"--rounds {rounds} is below round {latest}, where {out} was saved: a "
                         f"resumed run can only extend; give --rounds above {latest}.")
    return changed


def clear(out: Path) -> None:
    """Removes the files a run wrote in ``out`` (for ``--overwrite``); keeps anything else."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def record_config(out: Path, cfg: dict, from_round: int, changed: dict[str, tuple]) -> None:
    """Writes ``config.json`` and appends the config, the round it applies from, what changed and
    the code's fingerprint to ``config_history.jsonl``."""
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    entry = {"from_round": from_round,
             "changed": {k: {"old": old, "new": new} for k, (old, new) in changed.items()},
             "config": cfg, "code": code_fingerprint()}
    with open(out / HISTORY_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


@functools.cache
def code_fingerprint() -> str:
    """A short hash of the package's source files: a run's results depend on its code as much as
    on its config (a registered strategy's constants, a fix), so reusing a finished run
    (``fedlora-jax compare``) needs both equal."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def finished_rows(cfg: config_lib.RunConfig) -> list[dict] | None:
    """The metrics rows of a run that finished all ``cfg.federation.rounds`` in
    ``cfg.output_dir`` with the same config and, at every start and resume, the same code; else
    None. What ``compare`` and ``sweep`` reuse, so an interrupted one continues where it stopped
    and a changed setting or package reruns."""
    out = Path(cfg.output_dir)
    try:
        same = (json.loads((out / CONFIG_FILE).read_text())
                == json.loads(json.dumps(config_lib.to_dict(cfg)))
                and {entry.get("code") for entry in config_history(out)} == {code_fingerprint()})
        rows = metrics.read_rows(out) if same else []
    except (OSError, ValueError):
        return None
    return rows if rows and rows[-1].get("round") == cfg.federation.rounds else None


def config_history(out: str | Path) -> list[dict]:
    """The entries of ``config_history.jsonl``, oldest first."""
    return [json.loads(line) for line in (Path(out) / HISTORY_FILE).read_text().splitlines()]


@contextlib.contextmanager
def lock(out: Path):
    """Holds ``out`` for this process (creating the folder); ValueError if another run holds it.
    The lock file is removed on exit."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise _busy(out, pid) from None
            raise
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # else the holder removed this file as we opened it: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)
