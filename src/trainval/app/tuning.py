"""Hyperparameter search on Optuna (the ``tune`` extra): ``trainval tune`` and :func:`tune`.

- A search space is a config key with a distribution: ``optim.lr=loguniform(1e-4,1e-2)``,
  ``model.dropout=uniform(0,0.5)``, ``train.batch_size=int(32,256)``,
  ``model.hidden=choice([64],[128,64])`` (choices are YAML values).
- The tuning folder is ``<run.out_dir>/<run.name>``: it holds ``study.db`` (the SQLite study, so that
  running the command again continues it), ``best.yaml`` (the best trial's config, ready for
  ``trainval fit best.yaml``) and ``trials/<number>/``, each an ordinary run folder.
- ``storage`` (``--storage URL``) puts the study in a shared database instead, so that workers on
  several machines run one study (Optuna's own distributed mode); trial numbers are unique in it.
- Pruning: :class:`PruningCallback` reports the monitored metric to Optuna after every epoch and sets
  ``trainer.should_stop`` when the pruner says the trial is hopeless (median pruner by default).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml

from trainval.app import config, runs
from trainval.errors import ConfigError
from trainval.fsio import atomic_write
from trainval.loop.callbacks import Callback
from trainval.run import runfolder
from trainval.untrusted import load_yaml, shown

if TYPE_CHECKING:
    from trainval.loop.trainer import Trainer

MARKER = ".trainval-tune"  # a tuning folder trainval made (it is not a run folder itself)
_DIST = re.compile(r"^(loguniform|uniform|int|choice)\((.*)\)$", re.DOTALL)
_SCALAR = (type(None), bool, int, float, str)
# Keys tune sets itself for every trial: a search on them would be silently overwritten.
_SET_PER_TRIAL = {
    "run.name": "it names the tuning folder <run.out_dir>/<run.name>, and each trial is trials/<number> in it",
    "run.out_dir": "it holds the tuning folder <run.out_dir>/<run.name>, and each trial is trials/<number> in it",
    "run.overwrite": "each trial is a new run folder",
    "train.progress": "trials print no progress bar",
}
HEARTBEAT_SECONDS = 60  # a running trial's heartbeat in the study; after 3 missed, Optuna marks it failed


def _say(message: str) -> None:
    print(message, flush=True)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("trainval tune needs Optuna: pip install 'trainval[tune]'.") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class Space:
    """One searched key: ``kind`` loguniform/uniform/int/choice and its arguments."""

    def __init__(self, key: str, text: str):
        match = _DIST.match(text.strip())
        if not match:
            raise ConfigError(
                f"{key}={text}: a search space is loguniform(a,b), uniform(a,b), int(a,b) or choice(x,y,...)."
            )
        self.key, self.kind, self.text = key, match.group(1), text.strip()
        try:
            args = load_yaml(f"[{match.group(2)}]", f"{key}={shown(text, 120)}")
        except ConfigError:
            raise ConfigError(f"{key}={text}: cannot read the arguments of {self.kind}(...).") from None
        args = [_number(a) for a in args]
        if self.kind == "choice":
            if not args:
                raise ConfigError(f"{key}={text}: choice(...) needs at least one value.")
            self.choices = args
            return
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{key}={text}: {self.kind}(a,b) takes two numbers, low and high.")
        self.low, self.high = args
        if self.kind == "int" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{key}={text}: int(a,b) takes two integers.")
        if self.low >= self.high:
            raise ConfigError(f"{key}={text}: the low end must be below the high end.")
        if self.kind == "loguniform" and self.low <= 0:
            raise ConfigError(f"{key}={text}: loguniform(a,b) needs 0 < a < b.")

    def values_to_check(self) -> list:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, float(self.low), float(self.high), log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, float(self.low), float(self.high))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high)
        if all(isinstance(c, _SCALAR) for c in self.choices):
            return trial.suggest_categorical(self.key, self.choices)
        # Optuna's categories are scalars: lists and mappings travel as their YAML text
        texts = [
            yaml.safe_dump(c, default_flow_style=True).strip().removesuffix("...").strip()
            for c in self.choices
        ]
        picked = trial.suggest_categorical(self.key, texts)
        return self.choices[texts.index(picked)]


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as text: numbers written that way are numbers here."""
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def split_arguments(items: Sequence[str]) -> tuple[str | None, list[str], dict[str, str]]:
    """``[CONFIG] [key=value ...] [key=dist(...) ...]`` -> (config file, fixed overrides, search spaces)."""
    spaces: dict[str, str]
    path, fixed, spaces = None, [], {}
    for item in items:
        key, eq, value = item.partition("=")
        if eq and not item.endswith((".yaml", ".yml")):
            if _DIST.match(value.strip()):
                if key.strip() in spaces:
                    raise ConfigError(
                        f"{shown(key.strip())} is searched twice ({shown(key.strip())}="
                        f"{shown(spaces[key.strip()])} and {shown(item)}); keep one."
                    )
                spaces[key.strip()] = value
            elif re.match(r"^[A-Za-z_]\w*\(.*\)$", value.strip()):
                raise ConfigError(
                    f"{item}: unknown search space {value.strip().split('(')[0]}(...); use "
                    "loguniform(a,b), uniform(a,b), int(a,b) or choice(x,y,...)."
                )
            else:
                fixed.append(item)
        elif path is None:
            path = item
        else:
            raise ConfigError(
                f"more than one config file given ({path}, {item}); overrides look like key=value."
            )
    return path, fixed, spaces


def _merge(cfg: dict, key: str, value: Any, source: str) -> dict:
    section, _, name = key.partition(".")
    return config.merge(cfg, {section: {name: value}}, source)


class PruningCallback(Callback):
    """Reports the monitored value to an Optuna trial after each epoch; stops a trial the pruner gives up on.

    The last epoch is reported but never pruned: the trial has spent its budget by then, so stopping
    saves nothing and would throw a finished result away.
    """

    def __init__(self, trial):
        self.trial = trial
        self.pruned = False

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        value = row.get(trainer.monitor)
        if value is None:
            return
        self.trial.report(float(value), row["epoch"])
        if row["epoch"] < trainer.max_epochs and self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True
            trainer.log(
                f"trial {self.trial.number} pruned at epoch {row['epoch']} ({trainer.monitor} {value:.4f})"
            )


def _study_folder(folder: str) -> None:
    """Make or adopt the tuning folder: refuse a folder trainval did not make that holds other files."""
    runfolder.make_folder(folder)
    marker = os.path.join(folder, MARKER)
    if not os.path.exists(marker):
        # another worker's marker may be half-written (its temp file): that is not a user's file
        if [e for e in os.listdir(folder) if not e.startswith(runfolder.TEMP_PREFIX)]:
            raise ConfigError(
                f"{folder} already exists and was not made by `trainval tune` (no {MARKER}); "
                "choose another run.name or run.out_dir for the search."
            )
        atomic_write(marker, lambda f: f.write(b'{"made_by": "trainval tune"}\n'), "tuning marker")


def _storage(url: str | None, folder: str):
    """The study's database: ``url`` (``--storage``) or ``study.db`` in the tuning folder.

    Running trials send Optuna's heartbeat, so that a trial whose worker died (SIGKILL, a lost machine)
    is marked failed by the next worker after :data:`HEARTBEAT_SECONDS` x 3. A bad URL, a missing
    driver or a database that cannot be opened is one ConfigError naming the URL.
    """
    optuna = _optuna()
    import sqlalchemy.exc

    given = url is not None
    url = url or "sqlite:///" + os.path.abspath(os.path.join(folder, "study.db"))
    # several workers on one SQLite file: wait for its lock instead of failing
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    what = f"--storage {_shown_url(url)}" if given else f"the study database {_shown_url(url)}"
    try:
        for attempt in itertools.count():
            try:
                with warnings.catch_warnings():  # the heartbeat is marked experimental
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine,
                        heartbeat_interval=HEARTBEAT_SECONDS,
                        grace_period=3 * HEARTBEAT_SECONDS,
                    )
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as e:
                # two workers making the tables at the same moment: the other's are there by now
                racing = isinstance(e, sqlalchemy.exc.IntegrityError) or any(
                    word in str(e) for word in ("already exists", "locked")
                )
                if not racing or attempt >= 5:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except sqlalchemy.exc.NoSuchModuleError:
        kind = url.partition(":")[0]
        raise ConfigError(
            f"{what}: unknown database kind {shown(kind)!r}; use sqlite:///PATH, postgresql://... or "
            "mysql+pymysql://... (SQLAlchemy URLs)."
        ) from None
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(
            f"{what}: not a database URL; write KIND://USER:PASSWORD@HOST/DATABASE, e.g. "
            "sqlite:////shared/study.db or postgresql://user@host/optuna."
        ) from None
    except ImportError as e:
        cause = e.__cause__ or e
        raise ConfigError(
            f"{what}: the database driver is not installed ({shown(cause)}); install that "
            "package, or name an installed driver in the URL (e.g. postgresql+psycopg2://...)."
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = shown(str(getattr(e, "orig", None) or e).splitlines()[0] if str(e) else type(e).__name__)
        if url.startswith("sqlite:"):
            raise ConfigError(
                f"{what}: cannot open the database ({reason}); its folder must exist and be "
                "writable, and the file must be an SQLite database."
            ) from None
        raise ConfigError(
            f"{what}: cannot connect to the database ({reason}); check the host, port, user and "
            "database name, and that the server is running."
        ) from None
    except RuntimeError as e:  # a database made by another Optuna version
        if "storage upgrade" not in str(e):
            raise
        raise ConfigError(f"{what}: {shown(str(e).splitlines()[0])}") from None


def _shown_url(url: str) -> str:
    """The URL as it may be printed: its password hidden, terminal-safe and bounded."""
    try:
        from sqlalchemy.engine import make_url

        return shown(make_url(url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - not parseable: it has no password field SQLAlchemy knows of
        return shown(re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url))


def fail_abandoned_trials(study) -> list[int]:
    """Mark failed the running trials of this machine whose worker is gone; return their numbers.

    A trial's worker holds the writer lock of the trial's run folder for the whole fit (the kernel
    releases it when the worker dies, SIGKILL included), so a running trial whose folder is not locked
    and whose worker's pid is no running process has no worker. (The pid alone covers the moment after
    the fit, when the lock is released and Optuna has not yet recorded the result.) Trials of other machines are left to Optuna's heartbeat (see :func:`_storage`).
    """
    optuna = _optuna()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        folder = t.user_attrs.get("run_folder")
        if t.user_attrs.get("host") != socket.gethostname() or not isinstance(folder, str):
            continue
        if runfolder.process_alive(
            t.user_attrs.get("pid")
        ):  # between the fit's end (lock released) and Optuna's tell
            continue
        if os.path.isdir(folder) and not runfolder.is_locked(folder):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            _say(f"trial {t.number}: its worker is gone (nothing holds {shown(folder)}); marked failed")
            failed.append(t.number)
    return failed


def tune(
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    space: Mapping[str, str] | None = None,
    *,
    trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    pruner: str = "median",
) -> dict:
    """Search hyperparameters with Optuna; every trial is an ordinary ``fit`` into its own run folder.

    Args:
        config_path: a YAML config (None: the embedded digits default, as for ``trainval fit``).
        overrides: fixed ``section.key=value`` overrides.
        space: ``{"optim.lr": "loguniform(1e-4,1e-2)", ...}``; also ``uniform``, ``int``, ``choice``.
        trials: trials this call runs (the study may hold more: earlier calls, other workers).
        storage: an Optuna storage URL shared by several workers (default: ``study.db`` in the folder).
        study_name: default ``run.name``.
        pruner: ``median`` (stop trials whose monitored value is worse than the median of earlier
            trials at the same epoch) or ``none``.

    Returns ``{"study", "folder", "best_yaml", "trials"}`` (the trials as table rows).

    Loop::

        for each of `trials` trials:
            values = sampled from the space (Optuna's TPE sampler, knowing every finished trial)
            fit(config + values) into <folder>/trials/<number>/, reporting the monitor each epoch
            pruned? -> stop the fit, mark the trial pruned; else its best monitored value is the result
        write best.yaml (the best trial's config) and print the table of trials
    """
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"--trials must be a positive integer, got {trials!r}.")
    if pruner not in ("median", "none"):
        raise ConfigError(f"pruner must be 'median' or 'none', got {pruner!r}.")
    for key, text in (space or {}).items():
        if key in _SET_PER_TRIAL:
            raise ConfigError(
                f"cannot search {key}: trainval tune sets it for every trial ({_SET_PER_TRIAL[key]}); "
                "give it as a fixed value or leave it out."
            )
        for item in overrides:
            if item.partition("=")[0].strip() == key:
                raise ConfigError(
                    f"{key} is given both as a fixed value ({shown(item)}) and as a search "
                    f"({key}={shown(text)}); keep one of them."
                )
    base = config.load(config_path, list(overrides))
    spaces = [Space(k, v) for k, v in (space or {}).items()]
    if not spaces:
        raise ConfigError(
            "nothing to search: give at least one key=dist(...), e.g. optim.lr=loguniform(1e-4,1e-2)."
        )
    for s in spaces:
        if s.key not in config.all_paths():
            _merge(
                copy.deepcopy(base), s.key, None, f"search space {s.key}"
            )  # the unknown-key error, with a hint
        for value in s.values_to_check():
            config.validate(
                _merge(copy.deepcopy(base), s.key, value, f"search space {s.key}={s.text}"),
                f"search space {s.key}={s.text}",
            )

    optuna = _optuna()
    from trainval.app import workflow  # torch and the models load when a search runs, not for --help

    folder = workflow.run_folder(base)
    shared = _storage(storage, folder) if storage is not None else None  # a bad URL before any folder is made
    _study_folder(folder)
    direction = (
        "maximize" if (base["train"]["mode"] or workflow.monitor_direction(base)) == "max" else "minimize"
    )
    name = study_name or base["run"]["name"]
    # median: once two trials have finished, from the second epoch on (Optuna counts steps from 0; ours
    # are epochs from 1, so warm-up 2 spares the first epoch)
    chosen_pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
        if pruner == "median"
        else optuna.pruners.NopPruner()
    )
    for attempt in range(6):
        try:
            study = optuna.create_study(
                study_name=name,
                storage=shared or _storage(None, folder),
                direction=direction,
                pruner=chosen_pruner,
                load_if_exists=True,
            )
            break
        except ValueError as e:  # e.g. an existing study with the other direction
            raise ConfigError(f"study {name!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - two workers creating one study at the same moment
            racing = any(
                word in type(e).__name__ for word in ("IntegrityError", "OperationalError", "Duplicated")
            )
            if not racing or attempt == 5:
                raise
            time.sleep(0.2 * (attempt + 1))  # the other worker's study is there by now: load it
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {name!r} in that storage is {study.direction.name.lower()}d; this config's "
            f"monitor is {direction}d. Use another run.name or --study."
        )

    def objective(trial) -> float:
        cfg = copy.deepcopy(base)
        params = {s.key: s.suggest(trial) for s in spaces}
        for key, value in params.items():
            _merge(cfg, key, value, f"trial {trial.number}: {key}")
        cfg["run"]["out_dir"] = os.path.join(folder, "trials")
        cfg["run"]["name"] = f"{trial.number:04d}"
        cfg["run"]["overwrite"] = True  # trial numbers are unique in the study
        cfg["train"]["progress"] = False
        config.validate(cfg, f"trial {trial.number}")
        # the trial holds its run folder's lock from before it names the folder in the study: a running
        # trial whose folder is not locked has lost its worker (fail_abandoned_trials)
        with runfolder.locked(workflow.run_folder(cfg), "trial"):
            trial.set_user_attr("run_folder", workflow.run_folder(cfg))
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("config", json.loads(json.dumps(cfg)))
            _say(f"trial {trial.number}: " + " ".join(f"{k}={v}" for k, v in params.items()))
            pruning = PruningCallback(trial)
            summary = workflow.fit(cfg, callbacks=[pruning], test_if=lambda: not pruning.pruned)
        trial.set_user_attr("best_epoch", summary.get("best_epoch"))
        trial.set_user_attr("epochs", summary.get("epochs"))
        if summary.get("test"):
            trial.set_user_attr("test", summary["test"])
        if pruning.pruned:
            runs.update_summary(workflow.run_folder(cfg), pruned=True)  # `trainval runs` shows it as pruned
            raise optuna.TrialPruned()  # Optuna's way to end a trial as pruned, outside the training loop
        if summary.get("best_value") is None:
            raise ConfigError(f"trial {trial.number} has no best value of {summary.get('monitor')}.")
        return float(summary["best_value"])

    fail_abandoned_trials(study)
    study.optimize(objective, n_trials=trials, catch=())
    fail_abandoned_trials(study)
    rows = trial_rows(study)
    best_yaml = write_best(study, folder)
    _say(format_trials(rows, study))
    if best_yaml:
        _say(f"best trial written to {best_yaml}: trainval fit {best_yaml}")
    return {"study": study, "folder": folder, "best_yaml": best_yaml, "trials": rows}


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "epochs": t.user_attrs.get("epochs"),
                "best_epoch": t.user_attrs.get("best_epoch"),
                "params": dict(t.params),
                "run_folder": t.user_attrs.get("run_folder"),
            }
        )
    return rows


def format_trials(rows: list[dict], study) -> str:
    best = _best_trial(study)
    lines = [["trial", "state", "value", "epochs", "params"]]
    for r in rows:
        mark = " *" if best is not None and r["trial"] == best.number else ""
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        params = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()
        )
        lines.append([f"{r['trial']}{mark}", r["state"], value, str(r["epochs"] or "-"), params])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def _best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no finished trial yet
        return None


def write_best(study, folder: str) -> str | None:
    """``best.yaml``: the best finished trial's config, its run named ``<tuning run>-best`` beside the search."""
    best = _best_trial(study)
    if best is None or not isinstance(best.user_attrs.get("config"), dict):
        return None
    cfg = copy.deepcopy(best.user_attrs["config"])
    cfg["run"]["out_dir"] = os.path.dirname(os.path.abspath(folder))
    cfg["run"]["name"] = f"{os.path.basename(os.path.abspath(folder))}-best"
    cfg["run"]["overwrite"] = False
    cfg["train"]["progress"] = True
    header = (
        f"# trainval tune: trial {best.number} of study {study.study_name!r}, "
        f"{study.direction.name.lower()} -> {best.value}\n"
    )
    text = (header + yaml.safe_dump(cfg, sort_keys=False)).encode()
    path = os.path.join(folder, "best.yaml")
    atomic_write(path, lambda f: f.write(text), "best config")
    return path


__all__ = ["tune", "PruningCallback", "split_arguments", "trial_rows", "fail_abandoned_trials"]
