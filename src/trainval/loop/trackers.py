"""Experiment trackers as callbacks: MLflow and Weights & Biases (optional extras, imported on first use).

Both log the same scalars as ``metrics.csv`` (every numeric column of an epoch's row, at step = epoch),
the config as parameters, and ``best.pt`` as an artifact on request. Only rank 0 logs. The tracker's
run id travels in ``last.pt`` (the callback's state), so that a resumed fit continues the same run.
"""

from __future__ import annotations

import math
import os
import socket
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, Literal

from trainval.errors import ConfigError
from trainval.loop.callbacks import Callback
from trainval.loop.summary import trainer_arguments
from trainval.run import runfolder
from trainval.untrusted import check_regular, shown

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from trainval.loop.trainer import Trainer


def flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.001}}`` -> ``{"optim.lr": "0.001"}`` (tracker parameters are text)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


def scalars(row: dict) -> dict[str, float]:
    """The numeric columns of a row (``epoch`` is where it is, not a scalar; ``step`` is one, as in metrics.csv)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _at(trainer: Trainer, row: dict) -> int:
    """A row's step for a tracker: its optimizer step with ``val_every_steps``, else its epoch."""
    return int(row["step"] if trainer.options.val_every_steps else row["epoch"])


def _params(trainer: Trainer, given: dict | None) -> dict[str, str]:
    if given is not None:
        return flatten(given)
    if isinstance(trainer.config, dict):
        return flatten(trainer.config)
    return flatten(trainer_arguments(trainer))


def default_mlflow_uri(out_dir: str) -> str:
    """A SQLite store beside the run folders: ``<parent of the run folder>/mlflow.db``."""
    return "sqlite:///" + os.path.join(os.path.dirname(os.path.abspath(out_dir)), "mlflow.db")


REACH_SECONDS = 3.0  # a tracker's server must accept a connection within this, checked once before training


def check_reachable(uri: str, what: str, hint: str, timeout: float = REACH_SECONDS) -> None:
    """Refuse an ``http(s)`` URI whose server (or the proxy that reaches it) accepts no connection.

    Trackers' clients retry for minutes without a word (MLflow ~4 min, W&B ~2 min); this is one
    connection attempt of at most ``timeout`` seconds (plus name resolution), before training. Any
    other URI (a file, ``sqlite:``, ``databricks``) is left to the tracker.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{what} {_shown_uri(uri)}: not a valid URL (its port); {hint}.") from None
    if not host:
        raise ConfigError(f"{what} {_shown_uri(uri)}: not a valid URL (no host); {hint}.")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):  # the client goes through the proxy: check that
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        try:
            host, port = proxied.hostname or host, proxied.port or 80
        except ValueError:
            return  # the client will say what is wrong with the proxy
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = (
            f"no answer within {timeout:g} s"
            if isinstance(e, TimeoutError)
            else e.strerror or type(e).__name__
        )
        via = f" through the proxy {_shown_uri(proxy)}" if proxy and host != parts.hostname else ""
        raise ConfigError(
            f"{what} {_shown_uri(uri)}: cannot connect{via} ({shown(reason)}); {hint}."
        ) from None


def _shown_uri(uri: str) -> str:
    """A URI as it may be printed: a password in it hidden, terminal-safe and bounded."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        uri = parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@", 1)).geturl()
    return shown(uri)


class MLflowLogger(Callback):
    """Log a fit to MLflow (``pip install 'trainval[mlflow]'``).

    Args:
        tracking_uri: an MLflow tracking URI (a server ``http://...``, ``sqlite:///...``, ``databricks``);
            default: ``sqlite:///<parent of the run folder>/mlflow.db``, artifacts in ``mlartifacts/`` beside it.
        experiment: the experiment's name (made if missing).
        run_name: default: the run folder's name.
        params: the parameters to log (nested dicts are flattened); default: the Trainer's ``config``,
            else its plain arguments.
        log_best_checkpoint: log ``best.pt`` (and ``metrics.csv``) as artifacts at the end of the fit.
        uri_name: what names ``tracking_uri`` in messages (the CLI: ``log.mlflow_uri``).

    A server (``http(s)://``) must accept a connection within a few seconds at the start of the fit.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "trainval",
        run_name: str | None = None,
        params: dict | None = None,
        log_best_checkpoint: bool = False,
        *,
        uri_name: str = "tracking_uri",
    ):
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.uri_name = uri_name
        self.params, self.log_best_checkpoint = params, log_best_checkpoint
        self.client: MlflowClient | None = None
        self.run_id: str | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("log.mlflow=true needs MLflow: pip install 'trainval[mlflow]'.") from None
        uri = self.tracking_uri or default_mlflow_uri(trainer.out_dir)
        check_reachable(uri, self.uri_name, f"start the MLflow server, or fix {self.uri_name}")
        if uri.startswith("sqlite:///"):  # a FIFO there would stall SQLite's open for minutes
            database = uri[len("sqlite:///") :]
            if os.path.lexists(database):
                check_regular(database, f"the MLflow database of {self.uri_name}", ConfigError)
        try:
            self.client = MlflowClient(uri)
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                artifacts = None
                if self.tracking_uri is None:  # beside the database, not in the current folder
                    artifacts = "file://" + os.path.join(
                        os.path.dirname(os.path.abspath(trainer.out_dir)), "mlartifacts"
                    )
                experiment_id = self.client.create_experiment(self.experiment, artifact_location=artifacts)
            if self.run_id is not None:  # resumed: the same MLflow run
                self.client.update_run(self.run_id, status="RUNNING")
                return
            run = self.client.create_run(
                experiment_id,
                run_name=self.run_name or os.path.basename(trainer.out_dir),
                tags={"trainval.run_folder": os.path.abspath(trainer.out_dir)},
            )
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _params(trainer, self.params).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        except MlflowException as e:
            raise ConfigError(f"MLflow ({shown(uri)}): {shown(e.message)}") from None
        except Exception as e:  # noqa: BLE001 - its store's own errors (a file that is no database, ...): one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(
                f"MLflow could not open its store {shown(uri)} ({self.uri_name}): {type(e).__name__}: "
                f"{shown(first)}; fix or move that store, or set {self.uri_name} to another one."
            ) from None

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.client is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, _at(trainer, row)) for k, v in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.client is None or self.run_id is None:
            return
        if self.log_best_checkpoint:
            for name in ("best.pt", "metrics.csv"):
                path = os.path.join(trainer.out_dir, name)
                if os.path.exists(path):
                    self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, "FINISHED")

    def state_dict(self) -> dict:
        return {"mlflow_run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and isinstance(state.get("mlflow_run_id"), str):
            self.run_id = state["mlflow_run_id"]


class WandbLogger(Callback):
    """Log a fit to Weights & Biases (``pip install 'trainval[wandb]'``).

    Args:
        project: the W&B project.
        run_name: default: the run folder's name.
        mode: ``online``, ``offline`` (no account needed: files under ``<run folder>/wandb``, to
            ``wandb sync`` later) or ``disabled``; default: W&B's own (``WANDB_MODE``, else online).
        params: the config to log; default: the Trainer's ``config``, else its plain arguments.
        log_best_checkpoint: log ``best.pt`` as a model artifact at the end of the fit.
    """

    def __init__(
        self,
        project: str = "trainval",
        run_name: str | None = None,
        mode: Literal["online", "offline", "disabled"] | None = None,
        params: dict | None = None,
        log_best_checkpoint: bool = False,
    ):
        self.project, self.run_name, self.mode = project, run_name, mode
        self.params, self.log_best_checkpoint = params, log_best_checkpoint
        self.run: Any = None
        self.run_id: str | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "log.wandb=true needs Weights & Biases: pip install 'trainval[wandb]'."
            ) from None
        self._check_server()
        # wandb.init(dir=...) writes into <run folder>/wandb: the run folder's own, never a link out of it
        runfolder.own_subfolder(
            trainer.out_dir, "wandb", "cannot log to Weights & Biases", "writes W&B's run files"
        )
        config = (
            self.params
            if self.params is not None
            else (trainer.config if isinstance(trainer.config, dict) else None)
        )
        if config is None:
            config = trainer_arguments(trainer)
        try:
            self.run = wandb.init(
                project=self.project,
                name=self.run_name or os.path.basename(trainer.out_dir),
                dir=trainer.out_dir,
                mode=self.mode,
                config=config,
                id=self.run_id,
                resume="allow" if self.run_id else None,
                reinit="finish_previous",
            )
        except Exception as e:  # noqa: BLE001 - no account, no network...: one line, not a traceback
            raise ConfigError(
                f"Weights & Biases could not start a run ({type(e).__name__}: {e}); "
                "log.wandb_mode=offline works without an account."
            ) from None
        self.run_id = self.run.id

    def _check_server(self) -> None:
        """Online: the W&B server must accept a connection (else wandb.init retries for minutes)."""
        from wandb.sdk import wandb_setup

        try:
            settings = wandb_setup.singleton().settings  # env vars and the settings file; starts nothing
        except Exception:  # noqa: BLE001 - a bad WANDB_* value: wandb.init says what is wrong
            return
        if (self.mode or settings.mode) in ("online", "run"):
            check_reachable(
                settings.base_url,
                "the W&B server",
                "check the network and WANDB_BASE_URL, or use log.wandb_mode=offline",
            )

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.run is not None:
            self.run.log(scalars(row), step=_at(trainer, row))

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.run is None:
            return
        best = os.path.join(trainer.out_dir, "best.pt")
        if self.log_best_checkpoint and os.path.exists(best):
            import wandb

            artifact = wandb.Artifact(f"{self.run.name or 'run'}-best".replace("/", "-"), type="model")
            artifact.add_file(best)
            self.run.log_artifact(artifact)
        self.run.finish()
        self.run = None

    def state_dict(self) -> dict:
        return {"wandb_run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and isinstance(state.get("wandb_run_id"), str):
            self.run_id = state["wandb_run_id"]


def from_config(cfg: dict) -> list[Callback]:
    """The trackers a config's ``log`` section asks for."""
    log, params = cfg["log"], {k: v for k, v in cfg.items() if k != "resolved"}
    found: list[Callback] = []
    if log["mlflow"]:
        found.append(
            MLflowLogger(
                log["mlflow_uri"],
                log["mlflow_experiment"],
                cfg["run"]["name"],
                params,
                log["artifacts"],
                uri_name="log.mlflow_uri",
            )
        )
    if log["wandb"]:
        found.append(
            WandbLogger(log["wandb_project"], cfg["run"]["name"], log["wandb_mode"], params, log["artifacts"])
        )
    return found


__all__ = ["MLflowLogger", "WandbLogger", "from_config", "check_reachable"]
