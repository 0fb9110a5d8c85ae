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


def _typed_override(arg: str) -> str:
    """``pipeline.x.y=v`` -> ``++pipeline.x.y=v`` so fields missing from the YAML can be set.

    The dataclass schema (not Hydra's struct mode) then validates the key.
    """
    if arg.startswith(TYPED_SECTIONS):
        return "++" + arg
    return arg


def build_hydra_args(args: list[str]) -> tuple[list[str], str | None]:
    """Translate flashdreams-run arguments into Hydra arguments; returns (args, slug)."""
    from flashdreams.runner.registry import get_runner_entry

    slug = None
    if args and not args[0].startswith("-") and "=" not in args[0]:
        slug, args = args[0], args[1:]
    chosen_groups = {arg.split("=", 1)[0] for arg in args if _is_override(arg)}
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


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(HELP.format(default=DEFAULT_SLUG))
        return 0
    if "--list" in args:
        return _print_list()
    from flashdreams.launch.app import EXIT_USER_ERROR, format_user_error

    try:
        hydra_args, _slug = build_hydra_args(args)
        conf_dir = find_conf_dir()
    except (KeyError, ValueError, FileNotFoundError) as error:
        print(format_user_error(error), file=sys.stderr)
        return EXIT_USER_ERROR

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


def compose(slug: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Compose the config of ``flashdreams-run [slug] [overrides]`` as plain data, running nothing.

    ``flashdreams.launch.run_config.build_run_config`` turns the result into typed configs.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    args = [slug, *overrides] if slug else list(overrides)
    hydra_args, _ = build_hydra_args(args)
    with initialize_config_dir(version_base="1.3", config_dir=str(find_conf_dir())):
        cfg = hydra_compose(
            config_name=CONFIG_NAME, overrides=[a for a in hydra_args if _is_override(a)]
        )
    return OmegaConf.to_container(cfg, resolve=True)


if __name__ == "__main__":
    raise SystemExit(main())
