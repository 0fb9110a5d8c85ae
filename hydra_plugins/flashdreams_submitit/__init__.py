"""flashdreams' submitit launchers: hydra-submitit-launcher's, plus progress and one-line errors.

Hydra loads launchers only from the ``hydra_plugins`` namespace package, so these two
thin subclasses live here; the watching is :mod:`flashdreams.launch.sweep_jobs`. The
job mapping, submission and requeueing stay the plugin's. ``hydra/launcher=submitit_local``
and ``hydra/launcher=submitit_slurm`` pick them through ``conf/hydra/launcher/`` (which
also has the ``submitit-local`` and ``slurm`` shorthands); the config nodes registered
here are ``flashdreams_submitit_local`` and ``flashdreams_submitit_slurm``.

Without the ``slurm`` extra (``hydra-submitit-launcher``) this module defines nothing, so
Hydra's plugin scan stays quiet.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.config import (
        BaseQueueConf,
        LocalQueueConf,
        SlurmQueueConf,
    )
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        BaseSubmititLauncher,
        LocalLauncher,
        SlurmLauncher,
    )
except ImportError:  # the slurm extra is not installed
    BaseSubmititLauncher = None

if BaseSubmititLauncher is not None:
    import os

    from hydra.core.config_store import ConfigStore
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn
    from omegaconf import OmegaConf

    OUR_PARAMS = ("progress_interval_s",)
    """Launcher settings read here rather than passed to submitit."""

    class _WatchedLaunch:
        """``launch`` of the plugin, except that the jobs are watched by flashdreams."""

        _EXECUTOR: str
        params: dict[str, Any]
        config: Any
        RESULT_GRACE_S = 0.0
        """How long an ended job's result file may take to appear (shared filesystems)."""
        AFTER_INTERRUPT = ""
        """Appended to the Ctrl-C line (``{job_ids}`` is replaced)."""

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            import submitit

            from flashdreams.launch.sweep_jobs import (
                SweepJob,
                swept_keys_of,
                swept_values,
                watch_sweep_jobs,
            )

            assert self.config is not None and len(job_overrides) > 0
            params = {k: v for k, v in self.params.items() if k not in OUR_PARAMS}
            executor_keys = {"max_num_timeout"}
            executor = submitit.AutoExecutor(
                cluster=self._EXECUTOR,
                folder=params["submitit_folder"],
                **{f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k in executor_keys},
            )
            shared = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(
                **{
                    k if k in shared else f"{self._EXECUTOR}_{k}": v
                    for k, v in params.items()
                    if k not in executor_keys | {"submitit_folder"}
                }
            )
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            numbers = [initial_job_idx + index for index in range(len(job_overrides))]
            job_params = [
                (list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}",
                 Singleton.get_state())
                for number, overrides in zip(numbers, job_overrides)
            ]  # fmt: skip
            submitted = executor.map_array(self, *zip(*job_params))
            submitted_at = time.monotonic()
            swept_keys = swept_keys_of(self.config.hydra.overrides.task)
            jobs = [
                SweepJob(number, swept_values(overrides, swept_keys), job, submitted_at)
                for number, overrides, job in zip(numbers, job_overrides, submitted)
            ]
            return watch_sweep_jobs(
                jobs,
                progress_interval_s=float(self.params.get("progress_interval_s", 60)),
                result_grace_s=self.RESULT_GRACE_S,
                after_interrupt=self.AFTER_INTERRUPT,
            )

    class FlashdreamsLocalLauncher(_WatchedLaunch, LocalLauncher):
        """Local submitit processes (no SLURM); they receive a Ctrl-C with this process."""

    class FlashdreamsSlurmLauncher(_WatchedLaunch, SlurmLauncher):
        """One SLURM job per sweep job; they keep running when this process is stopped."""

        RESULT_GRACE_S = 15.0  # submitit's own wait for a result on a shared filesystem
        AFTER_INTERRUPT = "; they keep running in SLURM (scancel {job_ids} stops them)"

    @dataclass
    class FlashdreamsLocalConf(LocalQueueConf):
        _target_: str = "hydra_plugins.flashdreams_submitit.FlashdreamsLocalLauncher"
        progress_interval_s: float = 60.0
        """Seconds between the ``N of M jobs done`` lines while jobs run."""

    @dataclass
    class FlashdreamsSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.flashdreams_submitit.FlashdreamsSlurmLauncher"
        progress_interval_s: float = 60.0
        """Seconds between the ``N of M jobs done`` lines while jobs run."""

    for _name, _node in (
        ("flashdreams_submitit_local", FlashdreamsLocalConf),
        ("flashdreams_submitit_slurm", FlashdreamsSlurmConf),
    ):
        ConfigStore.instance().store(
            group="hydra/launcher", name=_name, node=_node, provider="flashdreams"
        )
