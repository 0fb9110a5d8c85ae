"""Cold start: building a component from its checkpoint vs reading the checkpoint's bytes.

For each component a checkpoint is written once (random weights, in the layout users
download), then two things are timed side by side, interleaved round by round, each in a
fresh child process (warm page cache, imports excluded):

* ``read``: reading every byte of the checkpoint file(s) into freshly allocated memory;
* ``setup``: building the component through its config, as a run does (checkpoint load,
  key remap, QKV fusion, dtype conversion, ...).

Reported per component: median seconds of both, their ratio (target <= 1.5 for the DiT),
the weight bytes, and the child's peak host memory during setup above its baseline
(VmHWM after imports), as a multiple of the weight bytes (target <= 1.3).

Components: ``dit`` (Wan 2.1 1.3B, one bf16 .safetensors in the original layout),
``dit-diffusers`` (the same network as a diffusers ``save_pretrained`` folder),
``vae`` (the Wan 2.1 VAE decoder, fp32 ``.pth`` as released), ``umt5`` (UMT5-XXL width,
bf16 ``.pth`` with ``UMT5EncoderModel`` keys, ``--umt5-layers`` blocks: the full 24-block
encoder is 11 GB).

    python bench/bench_coldstart.py [--components dit,dit-diffusers,vae,umt5] [--record]
    python bench/bench_coldstart.py --smoke          # tiny models: checks the code path

``--ttff SLUG [--ttff-overrides "k=v ..."]`` also runs ``flashdreams-run SLUG`` once and
prints its time to first frame, itemised from ``stats.json``'s ``startup`` section
(process launch, imports, config, distributed set-up, pipeline build with each
component's load, compile / CUDA-graph capture, first chunk).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_arguments, command_line, record  # noqa: E402

COMPONENTS = ("dit", "dit-diffusers", "vae", "umt5")
TARGET_RATIO, TARGET_PEAK = 1.5, 1.3


# ----------------------------------------------------------------- configs


def dit_network_config(smoke: bool):  # noqa: ANN201
    from flashdreams.recipes.wan.transformer import (
        WanDiTNetwork1pt3BConfig,
        WanDiTNetworkTinyConfig,
    )

    return WanDiTNetworkTinyConfig() if smoke else WanDiTNetwork1pt3BConfig()


def component_config(component: str, path: str, smoke: bool, device: str, umt5_layers: int):  # noqa: ANN201
    """The config a run would build ``component`` from, pointing at ``path``."""
    import torch

    if component in ("dit", "dit-diffusers"):
        from flashdreams.recipes.wan.transformer import (
            Wan21TransformerConfig,
            wan_diffusers_state_dict_transform,
        )

        transform = wan_diffusers_state_dict_transform if component == "dit-diffusers" else None
        return Wan21TransformerConfig(
            network=dit_network_config(smoke),
            checkpoint_path=path,
            state_dict_transform=transform,
            dtype=torch.bfloat16,
        )
    if component == "vae":
        from flashdreams.recipes.wan import WanVAEDecoderConfig

        fields = dict(base_dim=8) if smoke else {}
        return WanVAEDecoderConfig(checkpoint_path=path, dtype=torch.bfloat16, **fields)
    if component == "umt5":
        from flashdreams.recipes.wan.encoders.umt5 import UMT5TextEncoderConfig

        fields = (
            dict(model_dim=32, ffn_dim=64, num_heads=2, vocab_size=512, num_layers=2)
            if smoke
            else dict(num_layers=umt5_layers)
        )
        return UMT5TextEncoderConfig(
            checkpoint_path=path, tokenizer_path="builtin:bytes", text_len=16, **fields
        )
    raise ValueError(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")


# ----------------------------------------------------------------- checkpoint files


def _random_like(shapes: dict[str, tuple[int, ...]], dtype) -> dict:  # noqa: ANN001
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        key: (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        for key, shape in shapes.items()
    }


def _module_shapes(build) -> dict[str, tuple[int, ...]]:  # noqa: ANN001
    import torch

    with torch.device("meta"):
        module = build()
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def write_checkpoint(component: str, directory: Path, smoke: bool, umt5_layers: int) -> Path:
    """Write ``component``'s checkpoint (random weights, released layout); return its path."""
    import torch
    from safetensors.torch import save_file

    if component == "dit":
        from flashdreams.recipes.wan.transformer.impl.network import WanDiTNetwork

        config = dit_network_config(smoke)
        shapes = _module_shapes(lambda: WanDiTNetwork(config))
        path = directory / "wan21_t2v_1.3b.safetensors"
        save_file(_random_like(shapes, torch.bfloat16), str(path))
        return path
    if component == "dit-diffusers":
        import diffusers

        network = dit_network_config(smoke)
        kwargs = dict(
            patch_size=tuple(network.patch_size),
            num_attention_heads=network.num_heads,
            attention_head_dim=network.dim // network.num_heads,
            in_channels=network.in_dim,
            out_channels=network.out_dim,
            text_dim=network.text_dim,
            freq_dim=network.freq_dim,
            ffn_dim=network.ffn_dim,
            num_layers=network.num_layers,
            cross_attn_norm=network.cross_attn_norm,
            eps=network.eps,
        )
        shapes = _module_shapes(lambda: diffusers.WanTransformer3DModel(**kwargs))
        folder = directory / "transformer"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(kwargs))
        save_file(
            _random_like(shapes, torch.bfloat16),
            str(folder / "diffusion_pytorch_model.safetensors"),
        )
        return folder
    if component == "vae":
        from flashdreams.recipes.wan.autoencoder.vae import WanVAEDecoder

        config = component_config("vae", "", smoke, "cpu", umt5_layers)
        config.checkpoint_path = None
        # The released Wan2.1_VAE.pth holds the encoder and the decoder; a decoder-only
        # file loads the same way (the decoder keeps the keys it owns).
        shapes = _module_shapes(lambda: WanVAEDecoder(config))
        path = directory / "Wan2.1_VAE.pth"
        torch.save(_random_like(shapes, torch.float32), str(path))
        return path
    if component == "umt5":
        from flashdreams.recipes.wan.encoders.umt5 import UMT5TextEncoder

        config = component_config("umt5", "", smoke, "cpu", umt5_layers)
        config.checkpoint_path = None
        shapes = _module_shapes(lambda: UMT5TextEncoder(config).model)
        shapes.pop("encoder.embed_tokens.weight")
        state_dict = _random_like(shapes, torch.bfloat16)
        # One embedding shared by both names, as the tied weights are saved.
        state_dict["encoder.embed_tokens.weight"] = state_dict["shared.weight"]
        path = directory / "models_t5_umt5-xxl-enc-bf16.pth"
        torch.save(state_dict, str(path))
        return path
    raise ValueError(f"unknown component {component!r}")


def checkpoint_bytes(path: Path) -> int:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return sum(file.stat().st_size for file in files)


# ----------------------------------------------------------------- child measurements


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_main(mode: str, component: str, path: str, smoke: bool, device: str, layers: int) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import time

    import torch

    torch.set_num_threads(2)
    target = Path(path)
    if mode == "setup":
        config = component_config(component, path, smoke, device, layers)
        import flashdreams.recipes.wan  # noqa: F401  (imports outside the timed region)

        if component == "umt5":
            import transformers.models.umt5  # noqa: F401

    baseline = _peak_rss_bytes()
    started = time.perf_counter()
    if mode == "read":
        files = [target] if target.is_file() else sorted(p for p in target.iterdir())
        total = 0
        for file in files:
            buffer = bytearray(file.stat().st_size)
            with open(file, "rb", buffering=0) as handle:
                total += handle.readinto(buffer)
            del buffer
    else:
        built = config.setup()
        if device == "cuda":
            built.to("cuda")
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_bytes": _peak_rss_bytes() - baseline}))


def measure(mode: str, component: str, path: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--components",
        component,
        "--path",
        str(path),
        "--device",
        args.device,
        "--umt5-layers",
        str(args.umt5_layers),
    ] + (["--smoke"] if args.smoke else [])
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} {component} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- main


def time_to_first_frame(slug: str, overrides: list[str], workdir: str | None) -> list[str]:
    """Run the CLI once; the markdown rows of its ``startup`` section."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ttff-") as directory:
        run_dir = Path(directory) / "run"
        command = [sys.executable, "-m", "flashdreams.launch.cli", slug]
        command += [*overrides, f"runner.output_dir={run_dir}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"flashdreams-run {slug} failed:\n{result.stderr}")
        startup = json.loads((run_dir / "stats.json").read_text())["startup"]
    rows = [f"Time to first frame: `flashdreams-run {' '.join([slug, *overrides])}`", ""]
    rows += ["| phase | seconds |", "|---|---|"]
    for key, value in startup.items():
        if key == "component_load_s":
            rows += [f"| load {name} | {seconds:.3f} |" for name, seconds in value.items()]
        elif value is not None:
            rows.append(f"| {key.removesuffix('_s')} | {value:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--components", default=",".join(COMPONENTS))
    parser.add_argument("--smoke", action="store_true", help="tiny models: code path only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--umt5-layers", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where checkpoints are written")
    parser.add_argument("--ttff", default=None, metavar="SLUG", help="also time a CLI run")
    parser.add_argument("--ttff-overrides", default="", help="key=value overrides for --ttff")
    parser.add_argument("--child", default=None, choices=("read", "setup"), help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child_main(
            args.child, args.components, args.path, args.smoke, args.device, args.umt5_layers
        )
        return
    components = [name.strip() for name in args.components.split(",") if name.strip()]
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        parser.error(f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
    num_repeats = args.repeats or (1 if args.smoke else 3)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="coldstart-") as directory:
        for component in components:
            path = write_checkpoint(component, Path(directory), args.smoke, args.umt5_layers)
            weight_bytes = checkpoint_bytes(path)
            measure("read", component, path, args)  # warm the page cache
            read_times, setup_times, peaks = [], [], []
            for _ in range(num_repeats):
                read_times.append(measure("read", component, path, args)["seconds"])
                setup = measure("setup", component, path, args)
                setup_times.append(setup["seconds"])
                peaks.append(setup["peak_bytes"])
            read_s, setup_s = statistics.median(read_times), statistics.median(setup_times)
            rows.append((component, weight_bytes, read_s, setup_s, max(peaks)))
            if path.is_file():
                path.unlink()

    header = "SMOKE RUN (code path only, not a measurement)\n\n" if args.smoke else ""
    lines = [
        f"{header}Device: {args.device}; {num_repeats} interleaved rounds, medians; "
        f"targets: setup / read <= {TARGET_RATIO} (DiT), peak host memory <= "
        f"{TARGET_PEAK} x weight bytes",
        "",
        "| component | weight MB | read s | setup s | setup / read | peak host MB | peak / weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for component, weight_bytes, read_s, setup_s, peak in rows:
        lines.append(
            f"| {component} | {weight_bytes / 2**20:.1f} | {read_s:.3f} | {setup_s:.3f} | "
            f"{setup_s / read_s:.2f} | {peak / 2**20:.0f} | {peak / weight_bytes:.2f} |"
        )
    if args.ttff:
        lines += ["", *time_to_first_frame(args.ttff, args.ttff_overrides.split(), args.workdir)]
    text = "\n".join(lines)
    print(text)
    for component, weight_bytes, read_s, setup_s, peak in rows:
        print(f"ratio {component}: {setup_s / read_s:.2f} (peak {peak / weight_bytes:.2f}x)")
    if args.record and not args.smoke:
        record(
            "Cold start: component setup vs reading the checkpoint",
            command_line(),
            text,
            label=args.label,
        )


if __name__ == "__main__":
    main()
