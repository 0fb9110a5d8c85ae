"""``flashdreams-run``: run a registered pipeline slug through the Hydra config tree.

    flashdreams-run                                   # default tiny T2V pipeline on CPU
    flashdreams-run <slug> key=value ...              # any field, e.g. runner.num_chunks=4
    flashdreams-run --list                            # every slug (built-in and plugins)
    flashdreams-run <slug> --cfg job                  # print the composed config
    flashdreams-run <slug> -m runner.seed=0,1 ...     # sweep (add hydra/launcher=slurm for SLURM)

Overrides under ``pipeline.``, ``runner.`` and ``parallel.`` may name any field of
the config dataclasses, even fields the YAML leaves at their defaults; they
are checked against the dataclasses before anything is built. Heavy imports
(torch, the models) happen only when a job actually runs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DEFAULT_SLUG = "wan-tiny-t2v"
"""Slug run by a bare ``flashdreams-run``."""

CONFIG_NAME = "flashdreams"
"""Primary config file (``conf/flashdreams.yaml``)."""

CONF_DIR_ENV = "FLASHDREAMS_CONF_DIR"
"""Overrides where the Hydra tree is found."""

EXTRA_CONF_ENV = "FLASHDREAMS_CONF_PATH"
"""Extra config directories (``os.pathsep``-separated) added to Hydra's search path."""

TYPED_SECTIONS = ("pipeline.", "runner.", "parallel.")

HELP = """\
usage: flashdreams-run [SLUG] [KEY=VALUE ...] [--list] [--cfg job] [-m] [--help]

Run a FlashDreams streaming video pipeline (default slug: {default}).

  SLUG               pipeline slug, see --list
  KEY=VALUE          override any config field, e.g.
                       runner.prompt="a cat surfing" runner.num_chunks=4
                       runner.height=480 runner.width=832 runner.seed=1
                       pipeline.diffusion_model.scheduler.num_inference_steps=8
  --list             list every slug with a one-line description
  --cfg job          print the composed config and exit
  -m, --multirun     sweep comma-separated values (runner.seed=0,1 ...);
                     add hydra/launcher=slurm to submit each job to SLURM
  --hydra-help       Hydra's own options

Runner fields: prompt, prompts_file, image, num_chunks, height, width (pixels),
seed, output_dir (default outputs/<slug>/<time>/), fps, save_latents, profile.
Under torchrun or srun every rank runs the same command; the context-parallel
size is the world size.

Errors print one line (set FLASHDREAMS_TRACEBACK=1 for the Python traceback).
Exit codes: 2 bad input, 1 run-time failure, 143 SIGTERM (chunks written so far
are kept; stats.json says status: interrupted). See docs/errors.md.
"""


def find_conf_dir() -> Path:
    """The Hydra tree: $FLASHDREAMS_CONF_DIR, a checkout's conf/, or the installed copy."""
    candidates = []
    if os.environ.get(CONF_DIR_ENV):
        candidates.append(Path(os.environ[CONF_DIR_ENV]))
    package_dir = Path(__file__).resolve().parent.parent
    candidates.append(package_dir.parent / "conf")
    import site

    for prefix in (sys.prefix, site.getuserbase()):
        candidates.append(Path(prefix) / "share" / "flashdreams" / "conf")
    for candidate in candidates:
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "cannot find the flashdreams Hydra config tree (conf/flashdreams.yaml); looked in "
        + ", ".join(str(c) for c in candidates)
        + f". Set {CONF_DIR_ENV} to the conf/ directory of a flashdreams checkout."
    )


def _print_list() -> int:
    from flashdreams.runner.registry import discover_runners

    runners = discover_runners()
    width = max((len(slug) for slug in runners), default=0)
    for slug, registered in runners.items():
        marker = " (default)" if slug == DEFAULT_SLUG else ""
        print(f"{slug:<{width}}  {registered.entry.description}{marker}")
    return 0


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


SECTIONS = ("pipeline", "runner", "parallel", "hydra")
"""Top-level keys an override may start with (``hydra`` for Hydra's own settings)."""

VERBATIM_KEYS = (
    "runner.prompt",
    "runner.prompts_file",
    "runner.prompt_timeline_file",
    "runner.image",
    "runner.output_dir",
)
"""Free-text values passed to the run exactly as the shell gave them (no Hydra grammar, no
``${...}`` interpolation); so is every key whose last part ends in ``_path``."""

SWEEP_FUNCTIONS = ("choice", "sort", "shuffle", "glob")
"""Hydra sweep functions still understood in a verbatim value: ``runner.prompt='choice(a,b)'``."""

FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path",
                    "-cp", "--config-dir", "-cd", "--experimental-rerun")  # fmt: skip
"""Hydra flags followed by a value (``--cfg job``)."""

LAUNCHER_ALIASES = {
    "hydra/launcher=submitit_local": "hydra/launcher=flashdreams_submitit_local",
    "hydra/launcher=submitit_slurm": "hydra/launcher=flashdreams_submitit_slurm",
}
"""hydra-submitit-launcher's own launcher names pick flashdreams' subclasses, which print
progress and one line per failed job (``hydra_plugins/flashdreams_submitit``)."""

SUBMITIT_LAUNCHERS = ("slurm", "submitit-local", "flashdreams_submitit_local",
                      "flashdreams_submitit_slurm")  # fmt: skip
"""``hydra/launcher`` choices served by ``hydra_plugins/flashdreams_submitit``."""

INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
"""Optional value of Hydra's ``--info`` flag."""


def _override_key(arg: str) -> str:
    """``++runner.prompt=x`` -> ``runner.prompt``."""
    return arg.split("=", 1)[0].lstrip("+~")


def _is_verbatim_key(key: str) -> bool:
    return key in VERBATIM_KEYS or (key.startswith(SECTIONS) and key.endswith("_path"))


def quote_verbatim(value: str) -> str:
    """``value`` as a quoted Hydra override value that composes back to exactly ``value``.

    Inside single quotes Hydra reads ``\\'`` as a quote and needs backslashes doubled only
    before a quote or at the end; OmegaConf reads ``\\${`` as a literal ``${``.
    """

    def escape(match: re.Match) -> str:
        backslashes, tail = match.group(1), match.group(2)
        replacement = {"'": "\\'", "${": "\\${", "": ""}[tail]
        return backslashes * 2 + replacement

    return "'" + re.sub(r"(\\*)('|\$\{|\Z)", escape, value) + "'"


def _verbatim_override(arg: str) -> str:
    """Quote the value of a free-text key, unless it is a list, ``null`` or a sweep function."""
    key_part, value = arg.split("=", 1)
    key = _override_key(arg)
    if not _is_verbatim_key(key):
        return arg
    stripped = value.strip()
    is_list = key == "runner.prompt" and stripped.startswith("[") and stripped.endswith("]")
    is_sweep = re.fullmatch(rf"({'|'.join(SWEEP_FUNCTIONS)})\(.*\)", stripped, re.DOTALL)
    if is_list or is_sweep or (value == "null" and key != "runner.prompt"):
        return arg
    return f"{key_part}={quote_verbatim(value)}"


def _typed_override(arg: str) -> str:
    """``pipeline.x.y=v`` -> ``++pipeline.x.y=v`` so fields missing from the YAML can be set.

    The dataclass schema (not Hydra's struct mode) then validates the key.
    """
    arg = _verbatim_override(arg)
    if arg.startswith(TYPED_SECTIONS):
        return "++" + arg
    return arg


def _check_override_key(arg: str) -> None:
    """A plain key must start with a known section (``runer.num_chunks`` is a typo)."""
    key = _override_key(arg)
    if "/" in key or "@" in key:
        return  # a config-group choice such as hydra/launcher=slurm
    section = key.split(".", 1)[0]
    if section in SECTIONS:
        return
    import difflib

    close = difflib.get_close_matches(section, SECTIONS, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}{key[len(section) :]}'?" if close else ""
    raise KeyError(
        f"unknown config key '{key}': every key starts with one of {', '.join(SECTIONS)}.{hint}"
    )


def _split_slug_and_check(args: list[str]) -> tuple[str | None, list[str]]:
    """Take the slug off the front; reject a word that is neither a flag nor KEY=VALUE."""
    slug = None
    if args and not args[0].startswith("-") and "=" not in args[0]:
        slug, args = args[0], args[1:]
    expects_value = False
    for index, arg in enumerate(args):
        if expects_value:
            expects_value = False
            continue
        if arg.startswith("-"):
            next_arg = args[index + 1] if index + 1 < len(args) else ""
            expects_value = arg in FLAGS_WITH_VALUE or (
                arg in ("--info", "-i") and next_arg in INFO_CHOICES
            )
            continue
        if _is_override(arg):
            _check_override_key(arg)
            continue
        from flashdreams.runner.registry import discover_runners

        if arg in discover_runners():
            raise ValueError(
                f"the slug '{arg}' must come first: flashdreams-run {arg} "
                f"{' '.join(a for a in args if a != arg)}".rstrip()
            )
        if "." in arg:
            raise ValueError(f"'{arg}' is not KEY=VALUE: write {arg}=<value>")
        raise ValueError(
            f"unknown argument '{arg}': the slug goes first (flashdreams-run --list shows "
            "them) and every other argument is KEY=VALUE"
        )
    return slug, args


def build_hydra_args(args: list[str]) -> tuple[list[str], str | None]:
    """Translate flashdreams-run arguments into Hydra arguments; returns (args, slug)."""
    from flashdreams.runner.registry import get_runner_entry

    slug, args = _split_slug_and_check(args)
    chosen_groups = {arg.split("=", 1)[0] for arg in args if _is_override(arg)}
    args = [LAUNCHER_ALIASES.get(arg, arg) for arg in args]
    hydra_args = [_typed_override(arg) if _is_override(arg) else arg for arg in args]
    search_path = [
        f"file://{Path(p).resolve()}"
        for p in os.environ.get(EXTRA_CONF_ENV, "").split(os.pathsep)
        if p
    ]
    if slug is None and "pipeline" in chosen_groups:
        pass  # the user chose a pipeline option directly
    else:
        slug = slug or DEFAULT_SLUG
        entry = get_runner_entry(slug).entry
        hydra_args.append(f"pipeline={entry.pipeline_option}")
        if "runner" not in chosen_groups:
            hydra_args.append(f"runner={entry.runner}")
        if entry.conf_package:
            search_path.append(f"pkg://{entry.conf_package}")
    if search_path and "hydra.searchpath" not in chosen_groups:
        hydra_args.append(f"hydra.searchpath=[{','.join(search_path)}]")
    # Hydra's argparse wants every flag (--cfg job, -m, ...) before the overrides.
    flags = [arg for arg in hydra_args if not _is_override(arg)]
    overrides = [arg for arg in hydra_args if _is_override(arg)]
    return flags + overrides, slug


def check_submitit_launcher(hydra_args: list[str]) -> None:
    """A submitit launcher choice needs hydra-submitit-launcher and our plugin importable."""
    import importlib.util

    chosen = [a.split("=", 1)[1] for a in hydra_args if a.startswith("hydra/launcher=")]
    if not chosen or chosen[-1] not in SUBMITIT_LAUNCHERS:
        return
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        raise ValueError(
            f"hydra/launcher={chosen[-1]} needs hydra-submitit-launcher, which is not "
            "installed: pip install -e '.[slurm]' in the flashdreams checkout"
        )
    if importlib.util.find_spec("hydra_plugins.flashdreams_submitit") is None:
        raise ValueError(
            f"hydra/launcher={chosen[-1]} needs flashdreams' launcher plugin "
            "(hydra_plugins/flashdreams_submitit), which this installation does not have: "
            "reinstall flashdreams (pip install -e '.[slurm]' in the checkout)"
        )


def _wants_job_config(args: list[str]) -> bool:
    """``--cfg job`` (or ``-c job``) outside a sweep: printed by us, after validation."""
    if "-m" in args or "--multirun" in args:
        return False
    return any(flag in ("--cfg", "-c") and value == "job" for flag, value in zip(args, args[1:]))


def _print_job_config(hydra_args: list[str]) -> int:
    """Compose, build and validate the typed config, then print what ``config.yaml`` would hold."""
    from flashdreams.launch.run_config import (
        build_run_config,
        run_config_to_container,
        run_config_yaml,
    )
    from flashdreams.runner.preflight import validate_before_work

    container = _compose_overrides([a for a in hydra_args if _is_override(a)])
    run_config = build_run_config(container)
    validate_before_work(run_config, checkpoints=False, memory=False)
    print(run_config_yaml(run_config_to_container(run_config)), end="")
    return 0


def validate_sweep(overrides: list) -> None:
    """Compose and check every job of a ``-m`` sweep before the first is launched or queued.

    The per-machine memory check is left to each job (it runs where the job runs).
    """
    import itertools

    from flashdreams.launch.run_config import build_run_config
    from flashdreams.runner.preflight import validate_before_work

    fixed, swept = [], []
    for override in overrides:
        if override.is_sweep_override():
            key = override.get_key_element()
            swept.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            fixed.append(override.input_line)
    for number, chosen in enumerate(itertools.product(*swept)):
        try:
            run_config = build_run_config(_compose_overrides([*fixed, *chosen]))
            validate_before_work(run_config, memory=False)
        except Exception as error:
            shown = " ".join(c.lstrip("+") for c in chosen)
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            kind = (
                error.__class__ if isinstance(error, (KeyError, FileNotFoundError)) else ValueError
            )
            raise kind(f"sweep job {number} ({shown}): {message}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("flashdreams-run: interrupted by SIGINT before the run started", file=sys.stderr)
        return 128 + 2
    if argv is None and "TORCHELASTIC_RUN_ID" in os.environ:
        _leave_torchrun_worker(code)
    return code


def _leave_torchrun_worker(code: int) -> None:
    """End a torchrun worker process that finished its work without the interpreter's
    teardown. Seen with torch 2.13 on CPU: a gloo background thread occasionally aborts
    the process while C++ static destructors run ("terminate called without an active
    exception"), turning a finished run into a failed torchrun job. Everything the run
    wrote is closed by now; flush the streams and logs and leave."""
    import logging

    from loguru import logger

    logger.remove()  # flushes and closes every sink
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(HELP.format(default=DEFAULT_SLUG))
        return 0
    if "--list" in args:
        return _print_list()
    from flashdreams.launch.app import EXIT_USER_ERROR, USER_ERRORS, format_user_error

    try:
        conf_dir = find_conf_dir()
        if "--hydra-help" in args:
            return _run_hydra(conf_dir, ["--hydra-help"])
        hydra_args, _slug = build_hydra_args(args)
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(
            [a for a in hydra_args if _is_override(a)]
        )
        if _wants_job_config(args):
            return _print_job_config(hydra_args)
        if "-m" in args or "--multirun" in args:
            check_submitit_launcher(hydra_args)
            validate_sweep(parsed)
    except USER_ERRORS as error:
        print(format_user_error(error), file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:  # noqa: BLE001 - Hydra's composition errors, one line each
        if type(error).__module__.split(".")[0] != "hydra":
            raise
        print(format_user_error(ValueError(str(error).strip().splitlines()[0])), file=sys.stderr)
        return EXIT_USER_ERROR
    return _run_hydra(conf_dir, hydra_args)


def _run_hydra(conf_dir: Path, hydra_args: list[str]) -> int:
    import hydra

    from flashdreams.launch.app import hydra_task

    program = sys.argv[0] if sys.argv else "flashdreams-run"
    saved_argv = sys.argv
    sys.argv = [program, *hydra_args]
    try:
        hydra.main(version_base="1.3", config_path=str(conf_dir), config_name=CONFIG_NAME)(
            hydra_task
        )()
    finally:
        sys.argv = saved_argv
    return 0


def _compose_overrides(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(find_conf_dir())):
        cfg = hydra_compose(config_name=CONFIG_NAME, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def compose(slug: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Compose the config of ``flashdreams-run [slug] [overrides]`` as plain data, running nothing.

    ``flashdreams.launch.run_config.build_run_config`` turns the result into typed configs.
    """
    args = [slug, *overrides] if slug else list(overrides)
    hydra_args, _ = build_hydra_args(args)
    return _compose_overrides([a for a in hydra_args if _is_override(a)])


if __name__ == "__main__":
    raise SystemExit(main())
